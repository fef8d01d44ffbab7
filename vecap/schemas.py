"""Arrow schemas of every stage's Parquet: the on-disk contract of docs/architecture.md.

Flat, typed, pandas-friendly, no image bytes. The values of ``status``, ``reason`` and the
``*_source`` columns are the words of :mod:`vecap.vocab`.
"""

from __future__ import annotations

import pyarrow as pa

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
        ("reason", pa.string()),  # why the caption is not the model's accepted answer (vecap.vocab)
        ("error", pa.string()),  # the human-readable detail
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
        ("reason", pa.string()),  # why the caption is not the model's accepted answer (vecap.vocab)
        ("error", pa.string()),  # the human-readable detail
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
        ("reason", pa.string()),  # why the caption is not the model's accepted answer (vecap.vocab)
        ("error", pa.string()),  # the human-readable detail
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
