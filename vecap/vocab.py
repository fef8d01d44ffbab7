"""The project's words, in one place: stage names, per-sample statuses, caption sources, and the
reasons a row records.

Every other module spells these through here (``vocab.OK``, ``vocab.CAPTION``), so a reader finds
each value's meaning once, and the Parquet columns, the markers' stats, the metrics and the report
count the same things by the same names. The names of the validators' checks (``truncated``,
``refusal`` …) are reasons too; they live with their checks in :mod:`vecap.validation.checks`
(its ordered registry is what a recipe's ``skip`` names and the docs' table come from).
"""

from __future__ import annotations

# --- stages, in pipeline order ----------------------------------------------------------------
CAPTION, FUSE, WRITE = "caption", "fuse", "write"
STAGES = (CAPTION, FUSE, WRITE)
# The model stages, streamed through one dataset in this order (each takes the rows of the one before);
# the write stage runs per shard once the last of them is committed.
STREAM_STAGES = (CAPTION, FUSE)

# --- per-sample statuses (the ``status`` column) ----------------------------------------------
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
# The image format is not one CLIP loaders read (open_clip: jpg/png/webp; the recipe's write.image_exts),
# decided when the image is read, before any GPU time; bytes are never re-encoded, so the sample
# stays out of the tar (its row says why). The write stage checks again (the input may have changed).
UNSUPPORTED_FORMAT = "unsupported_format"
# The image is fine but a model step failed; the row can be retried alone.
MODEL_ERROR = "model_error"
ENGINE_CRASH = "engine_crash"  # the sample made the engine process exit, every time (isolated)
CAPTION_REJECTED = "caption_rejected"  # the VLM answered, but its caption failed validation (reason: the check)
NO_TEXT = "no_text"  # neither alt-text nor a caption: nothing to train on

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

# --- where a caption came from ----------------------------------------------------------------
# vec_source: the VeC caption is the LLM's fusion, the VLM caption (the alt-text had nothing
# usable, or the fusion was rejected) or the alt-text.
FUSED_SOURCE, VLM_SOURCE, ALT_SOURCE = "fused", "vlm", "alt"
VEC_SOURCES = (FUSED_SOURCE, VLM_SOURCE, ALT_SOURCE)
FALLBACK_SOURCES = (VLM_SOURCE, ALT_SOURCE)  # vec_source values that mean the fusion fell back
# txt_source: which caption a vecap sample's .txt holds.
TXT_SOURCES = (ALT_SOURCE, "vec", VLM_SOURCE)
# caption_source: this row's own engine call, another copy of the same image in the run, or the
# caption cache (vecap.reuse); caption_from names that key.
COMPUTED, DUPLICATE, CACHE = "computed", "duplicate", "cache"
CAPTION_SOURCES = (COMPUTED, DUPLICATE, CACHE)

# --- reasons (the ``reason`` column) ------------------------------------------------------------
# A row's ``reason`` says, as one of these codes, why its caption is not the model's accepted
# answer (null when it is); ``error`` holds the human-readable detail. In captions/: the status
# of a failed row, or the check that rejected the VLM's answer. In fused/ and vecap/: why the VeC
# caption fell back (a check's name, or one of the reasons below), or the row's own status.
# Fallbacks no validator decided:
NO_ALT_TEXT = "no_alt_text"  # no alt-text to fuse (settled without the LLM)
NO_VLM_CAPTION = "no_vlm_caption"  # no VLM caption to fuse (settled without the LLM)
CAPTION_FAILED = "caption_failed"  # the VLM caption was unusable (its status in ``error``)
# Fallbacks caused by the infrastructure rather than by a model's output: never silent (the
# shard's stats count them apart, the summary and the report show them).
INFRA_REASONS = frozenset({MODEL_ERROR, ENGINE_CRASH, CAPTION_FAILED})
# Settled without a model: nothing to fuse on one side.
SETTLED_WITHOUT_MODEL = frozenset({NO_ALT_TEXT, NO_VLM_CAPTION})
# Fallback reasons that are not a rejected LLM output (the rest are the validator's checks).
NOT_REJECTIONS = INFRA_REASONS | SETTLED_WITHOUT_MODEL


def caption_reason(status: str | None, rejected_by: str | None = None) -> str | None:
    """A captions row's ``reason``: the check that rejected the VLM's answer, the status of any
    other failure, None for an accepted caption."""
    if status == CAPTION_REJECTED:
        return rejected_by
    return None if status in (OK, None) else status


# --- where a shard's rows are read from (plans and the work rows' ``source``) ------------------
FROM_IMAGES, FROM_CAPTIONS = "images", "captions"  # the input tar, or the committed captions
# Where a stream that starts at a stage reads a shard: its first stage's input.
READS_FROM = {CAPTION: FROM_IMAGES, FUSE: FROM_CAPTIONS}
