"""Alt-text cleaning, fused-caption validation and the fallback chain (pure functions).

The fuse stage asks an LLM to merge the alt-text (real-world knowledge) with the VLM
caption (visual detail). LLMs fail in known ways; each is a named ``reason`` here, and
a rejected output falls back to the VLM caption, then to the alt-text, with the reason
recorded in the row's ``error`` and counted in the shard's stats.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

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


# --- validation -------------------------------------------------------------------------
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i cannot|i can'?t|i can not|i'?m unable|i am unable"
    r"|as an ai|i'?m not able|i won'?t|unfortunately,? i)",
    re.I,
)
_LABEL_ECHO = re.compile(
    r"(?:alt[\s_-]?text|vlm[\s_-]?caption|web[\s_-]text|visual[\s_-]description|image description"
    r"|raw caption|synthetic caption|consolidated caption|merged caption|fused caption|caption\s*:|instructions?\s*:"
    r"|<\s*/?\s*(?:alt_text|web_text|visual_description|description|caption|raw|synthetic)\s*>)",
    re.I,
)
_PREAMBLE = re.compile(r"^\s*(?:here is|here's|sure[,!]|certainly[,!]|caption\s*:|output\s*:)[^:\n]*:?\s*", re.I)

REASONS = (
    "empty",
    "refusal",
    "echo",
    "truncated",
    "garbage",
    "too_long",
    "lost_entities",
    "model_error",
)


def tidy_output(text: str | None) -> str:
    """Strip what models wrap around an answer: quotes, a 'Here is ...:' preamble, extra lines."""
    if not text:
        return ""
    text = text.strip()
    text = _PREAMBLE.sub("", text, count=1).strip()
    first = text.split("\n\n", 1)[0]
    text = _SPACE.sub(" ", first).strip().strip('"“”\'')
    return text.strip()


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
    """Why a (tidied) fused caption must not be used, or None if it is acceptable."""
    if not output.strip():
        return "empty"
    if finish_reason == "length":
        return "truncated"
    if _REFUSAL.search(output):
        return "refusal"
    printable = sum(1 for ch in output if ch.isprintable() and unicodedata.category(ch)[0] in "LNPZS")
    letters = sum(1 for ch in output if ch.isalpha())
    if printable < 0.95 * len(output) or letters < 0.5 * len(output.replace(" ", "")):
        return "garbage"
    if _LABEL_ECHO.search(output) or _echoes(output, instructions):
        return "echo"
    if len(output.split()) > max_words:
        return "too_long"
    if require_entities:
        kept, total = kept_entities(alt_text, output)
        if total and kept == 0:
            return "lost_entities"
    return None


def _echoes(output: str, instructions: str, n: int = 6) -> bool:
    """True if the output repeats any run of ``n`` words of the instructions."""
    words = instructions.lower().split()
    if len(words) < n:
        return False
    out = " ".join(output.lower().split())
    return any(" ".join(words[i : i + n]) in out for i in range(len(words) - n + 1))


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
