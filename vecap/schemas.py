"""Arrow schemas of every stage's Parquet, and the per-sample status vocabulary.

The on-disk contract of docs/architecture.md: flat, typed, pandas-friendly, no image bytes.
"""

from __future__ import annotations

import pyarrow as pa

# --- per-sample statuses -------------------------------------------------------------
OK = "ok"
# The image is unusable: the sample stays in every Parquet, never in the output tar.
DOWNLOAD_FAILED = "download_failed"  # img2dataset could not fetch it (input Parquet only)
MISSING_FROM_TAR = "missing_from_tar"  # listed as a success in the Parquet, absent from the tar
MISSING_IMAGE = "missing_image"  # tar members for the key, but no image member
DUPLICATE_KEY = "duplicate_key"  # a second sample with a key already seen in the shard
INVALID_KEY = "invalid_key"  # member name not a plain file name (e.g. '../x.jpg')
IMAGE_TOO_LARGE = "image_too_large"  # bytes or pixels over the configured limits
IMAGE_EMPTY = "image_empty"  # zero bytes or zero width/height
IMAGE_UNDECODABLE = "image_undecodable"  # not an image, truncated, unsupported
# The image is fine but a model step failed; the row can be retried alone.
MODEL_ERROR = "model_error"
ENGINE_CRASH = "engine_crash"  # the sample made the engine process exit, every time (isolated)
CAPTION_REJECTED = "caption_rejected"  # the VLM answered, but its caption failed validation (error says why)
NO_TEXT = "no_text"  # neither alt-text nor a caption: nothing to train on
# The image format is not one CLIP loaders read (open_clip: jpg/png/webp; the recipe's write.image_exts),
# decided when the image is read, before any GPU time; bytes are never re-encoded, so the sample
# stays out of the tar (its row says why). The write stage checks again (the input may have changed).
UNSUPPORTED_FORMAT = "unsupported_format"

IMAGE_FAILURES = frozenset(
    {
        DOWNLOAD_FAILED,
        MISSING_FROM_TAR,
        MISSING_IMAGE,
        DUPLICATE_KEY,
        INVALID_KEY,
        IMAGE_TOO_LARGE,
        IMAGE_EMPTY,
        IMAGE_UNDECODABLE,
        UNSUPPORTED_FORMAT,
    }
)

# Statuses whose VLM caption is unusable, and of those, the ones --retry-failed redoes.
CAPTION_FAILURES = frozenset({MODEL_ERROR, ENGINE_CRASH, CAPTION_REJECTED})
RETRYABLE = frozenset({MODEL_ERROR, ENGINE_CRASH})

# Where the VeC caption came from, and which caption a vecap sample's .txt holds ("vlm": the VLM caption,
# when the alt-text has nothing usable and the VeC caption is the VLM's fallback).
VEC_SOURCES = ("fused", "vlm", "alt")
TXT_SOURCES = ("alt", "vec", "vlm")

_PROVENANCE = [
    ("finish_reason", pa.string()),
    ("n_prompt_tokens", pa.int32()),
    ("n_output_tokens", pa.int32()),
    ("model", pa.string()),
    ("prompt_id", pa.string()),
    ("prompt_sha256", pa.string()),
    ("params_sha256", pa.string()),
    ("seed", pa.int64()),
]

# Per-row quality columns (vecap.validation.caption_quality / fuse_quality), for filtering in
# pandas without rerunning; every one nullable. They describe the model's output as judged.
QUALITY_CAPTION = [
    ("q_repetition", pa.float32()),  # 0 none … 1 a loop
    ("q_lang_out", pa.string()),  # "en", "fr", "ja", "zh", "ko" … or a script code ("latn", "cyrl", "arab")
    ("q_words", pa.int32()),  # CJK counted as one word per two characters
]
QUALITY_FUSE = [
    ("q_entity_recall", pa.float32()),  # weighted share of alt-text names/numbers kept; null: none checkable
    ("q_visual_overlap", pa.float32()),  # share of the VLM caption's content words kept; null: other script
    ("q_novel", pa.int32()),  # names, numbers, URLs found in neither source
    ("q_novel_terms", pa.string()),  # those, joined with "|"
    ("q_repetition", pa.float32()),
    ("q_lang_alt", pa.string()),
    ("q_lang_vlm", pa.string()),
    ("q_lang_out", pa.string()),
    ("q_words", pa.int32()),
    ("q_words_alt", pa.int32()),
    ("q_words_vlm", pa.int32()),
]

# Where a row's VLM caption comes from (vecap.reuse): this row's own engine call, another
# copy of the same image in the run, or the caption cache; caption_from names that key.
CAPTION_SOURCES = ("computed", "duplicate", "cache")
_REUSE = [
    ("sha256", pa.string()),  # img2dataset's sha256 of the image bytes
    ("caption_source", pa.string()),
    ("caption_from", pa.string()),
    ("caption_from_shard", pa.string()),
]

CAPTIONS = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("vlm_caption", pa.string()),
        *_PROVENANCE,
        *QUALITY_CAPTION,
        *_REUSE,
    ]
)

FUSED = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("alt_text", pa.string()),
        ("vlm_caption", pa.string()),
        ("vec_caption", pa.string()),
        ("vec_source", pa.string()),
        *_PROVENANCE,
        *QUALITY_FUSE,
    ]
)

VECAP = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("url", pa.string()),
        ("alt_text", pa.string()),
        ("vlm_caption", pa.string()),
        ("vec_caption", pa.string()),
        ("vec_source", pa.string()),
        ("txt", pa.string()),
        ("txt_source", pa.string()),
        ("image_ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        # provenance of both models
        ("caption_model", pa.string()),
        ("caption_prompt_id", pa.string()),
        ("caption_prompt_sha256", pa.string()),
        ("caption_params_sha256", pa.string()),
        ("fuse_model", pa.string()),
        ("fuse_prompt_id", pa.string()),
        ("fuse_prompt_sha256", pa.string()),
        ("fuse_params_sha256", pa.string()),
        # optional CLIPScore (write.clip_model): 100 * max(cos, 0); null when off or no text/image
        ("clip_score_alt", pa.float32()),
        ("clip_score_vlm", pa.float32()),
        ("clip_score_vec", pa.float32()),
    ]
)


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows → a table with exactly ``schema``'s columns, in order; missing fields are null."""
    names = schema.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)
