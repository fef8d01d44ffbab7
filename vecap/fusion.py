"""Alt-text cleaning and the fallback chain (pure functions).

The fuse stage asks an LLM to merge the alt-text (real-world knowledge) with the VLM
caption (visual detail). LLMs fail in known ways, each a named ``reason`` of
:mod:`vecap.validation`; a rejected output falls back to the VLM caption, then to the
alt-text, with the reason recorded in the row's ``error`` and counted in the shard's stats.
"""

from __future__ import annotations

from dataclasses import dataclass

from vecap import validation, vocab
from vecap.config import FuseChecks

# --- alt-text cleaning (vecap.validation.tidy: one cleaned form for the fusion and the write stage) ---
clean_alt_text = validation.clean_alt_text
light_clean = validation.light_clean


# --- entities (vecap.validation.measures: the one definition, also the report's and the checks') ---
def entities(text: str) -> list[str]:
    """The alt-text's names and numbers, as written (:func:`vecap.validation.entities`)."""
    return validation.entities(text)


def kept_entities(source: str, output: str) -> tuple[int, int]:
    """How many of ``source``'s names and numbers ``output`` keeps, and of how many
    (:func:`vecap.validation.entity_counts`)."""
    return validation.entity_counts(source, output)


# --- validation (vecap.validation; these two keep the stages' former interface) ------------
REASONS = validation.REASONS


def tidy_output(text: str | None) -> str:
    """Strip what models wrap around a fused caption (see :func:`vecap.validation.tidy_fused`)."""
    return validation.tidy_fused(text)


def rejection_reason(
    output: str,
    *,
    finish_reason: str | None,
    alt_text: str,
    vlm_caption: str,
    instructions: str = "",
    max_words: int = 80,
    require_entities: bool = True,
) -> str | None:
    """Why a fused caption must not be used, or None (:func:`vecap.validation.check_fused`'s reason)."""
    checks = FuseChecks(max_words=max_words, skip=[] if require_entities else ["lost_entities"])
    return validation.check_fused(output, finish_reason, alt_text, vlm_caption, instructions, checks).reason


@dataclass(frozen=True)
class Fused:
    vec_caption: str | None
    vec_source: str | None  # vocab.VEC_SOURCES, or None (nothing usable)
    reason: str | None  # why not the fusion (vocab: a check's name, no_alt_text …)


def fall_back(alt_text: str, vlm_caption: str, reason: str) -> Fused:
    """VLM caption first (it describes the image), then the alt-text."""
    if vlm_caption.strip():
        return Fused(vlm_caption.strip(), vocab.VLM_SOURCE, reason)
    if alt_text.strip():
        return Fused(alt_text.strip(), vocab.ALT_SOURCE, reason)
    return Fused(None, None, reason)


def pre_decision(alt_text: str, vlm_caption: str) -> Fused | None:
    """Cases settled without an LLM call: a missing source means there is nothing to fuse."""
    if not alt_text.strip():
        return fall_back("", vlm_caption, "no_alt_text")
    if not vlm_caption.strip():
        return fall_back(alt_text, "", "no_vlm_caption")
    return None
