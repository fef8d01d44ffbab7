"""Alt-text cleaning and the fallback chain (pure functions).

The fuse stage asks an LLM to merge the alt-text (real-world knowledge) with the VLM
caption (visual detail). LLMs fail in known ways, each a named ``reason`` of
:mod:`vecap.validation`; a rejected output falls back to the VLM caption, then to the
alt-text, with the reason recorded in the row's ``error`` and counted in the shard's stats.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from vecap import validation
from vecap.config import FuseChecks

# --- alt-text cleaning ------------------------------------------------------------------
_TAG = re.compile(r"<[^>]{0,200}>")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
_FILENAME = re.compile(r"\b[\w\-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic)\b", re.I)
_CAMERA_NAME = re.compile(r"\b(?:IMG|DSC|DSCN|DCIM|PXL|MVIMG)[_\-]?\d+\b", re.I)
_STOCK = re.compile(
    r"\s*[-|–—:]?\s*\b(?:stock (?:photo|image|picture|illustration|vector)s?(?: and images?)?"
    r"|royalty[- ]free(?: stock)?(?: photo| image)?|alamy|shutterstock|getty ?images|istock(?:photo)?"
    r"|dreamstime|123rf|depositphotos|adobe stock)\b(?: - [\w .]+$)?",
    re.I,
)
_SPACE = re.compile(r"\s+")


def clean_alt_text(text: str | None, max_words: int = 64) -> str:
    """Web alt-text → plain text fit for a prompt: entities decoded, markup, URLs, camera
    file names and stock-site boilerplate removed, whitespace collapsed, length capped."""
    if not text:
        return ""
    text = html.unescape(html.unescape(text))
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _FILENAME.sub(" ", text)
    text = _CAMERA_NAME.sub(" ", text)
    text = _STOCK.sub(" ", text)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\t\n")
    text = _SPACE.sub(" ", text).strip(" -|–—:,;")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def light_clean(text: str | None) -> str:
    """What a training caption needs from raw alt-text: entities decoded, tags dropped, spaces collapsed."""
    if not text:
        return ""
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()


# --- entities ---------------------------------------------------------------------------
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_STOP = {
    "a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "for", "with", "by", "from",
    "this", "that", "these", "those", "is", "are", "was", "it", "its", "my", "our", "your",
    "photo", "image", "picture", "new", "best", "top", "free", "how", "what", "why", "when",
}


def entities(text: str) -> set[str]:
    """Proper-noun-like words (capitalised, not sentence-initial stop words) and numbers, lower-cased."""
    found = {m.group(0) for m in _NUMBER.finditer(text)}
    for i, m in enumerate(_WORD.finditer(text)):
        w = m.group(0)
        if w[0].isupper() and w.lower() not in _STOP and not (i == 0 and len(w) <= 2):
            found.add(w.lower())
        elif not w.isascii() and w.isalpha() and not w.islower():
            found.add(w.lower())  # non-Latin scripts have no case: keep them as names
    return found


def kept_entities(source: str, output: str) -> tuple[int, int]:
    """How many of ``source``'s entities appear in ``output`` (case-insensitive), and of how many."""
    ents = entities(source)
    if not ents:
        return 0, 0
    low = output.lower()
    words = {m.group(0) for m in _WORD.finditer(low)} | {m.group(0) for m in _NUMBER.finditer(low)}
    # whole words for Latin text ("air" is not kept by "pair"); substrings for unspaced scripts
    return sum(1 for e in ents if (e in words if e.isascii() else e in low)), len(ents)


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
    vec_source: str | None  # "fused" | "vlm" | "alt" | None (nothing usable)
    reason: str | None  # why not "fused"


def fall_back(alt_text: str, vlm_caption: str, reason: str) -> Fused:
    """VLM caption first (it describes the image), then the alt-text."""
    if vlm_caption.strip():
        return Fused(vlm_caption.strip(), "vlm", reason)
    if alt_text.strip():
        return Fused(alt_text.strip(), "alt", reason)
    return Fused(None, None, reason)


def pre_decision(alt_text: str, vlm_caption: str) -> Fused | None:
    """Cases settled without an LLM call: a missing source means there is nothing to fuse."""
    if not alt_text.strip():
        return fall_back("", vlm_caption, "no_alt_text")
    if not vlm_caption.strip():
        return fall_back(alt_text, "", "no_vlm_caption")
    return None
