"""Tidying: what models wrap around an answer (chat tokens, "Here is the caption:", "The image
shows", quotes, Markdown, trailing notes) comes off before any check reads it; evidence of several
answers (lists, labelled lines, paraphrasing blocks) is kept, so that they can be rejected.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from vecap.validation.text import _stem, _text, _word_count

# --- tidying ----------------------------------------------------------------------------
_SPECIAL_TOKENS = re.compile(
    r"<\|[^|<>\n]{1,40}\|>|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|<image>|<unk>|<pad>|<eos>|<bos>|<end_of_turn>"
    r"|<start_of_turn>\w*",
    re.I,
)
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_ROLE = re.compile(r"^\s*(?:(?:assistant|gpt|model|bot)\s*(?::|\n)|(?:answer|response|output|result)\s*:)\s*", re.I)
_LABEL_LINE = re.compile(
    r"\W*(?:(?:final|fused|merged|combined|consolidated|new|enriched|vec|image|short)\s+)*(?:caption|description|answer"
    r"|output|result)\W*",
    re.I,
)
_FENCE = re.compile(r"```[\w-]*")
_SOURCE_LABEL = (
    r"(?:web[\s_-]?text|visual[\s_-]description|alt[\s_-]?text|vlm[\s_-]?caption|raw[\s_-]caption"
    r"|synthetic[\s_-]caption)"
)
_LABEL_ECHO = re.compile(
    rf"{_SOURCE_LABEL}\s*[:=]|\binstructions?\s*:|<\s*/?\s*(?:web_text|visual_description|alt_text|vlm_caption|raw"
    rf"|synthetic|caption|description)\s*>",
    re.I,
)
_PREAMBLE_NOUN = (
    r"(?:caption|description|version|attempt|output|answer|result|response|sentence|rewrite|summary|text|one|it|this)"
)
_PREAMBLE = re.compile(
    r"^\W*(?:"
    r"(?:sure|certainly|of course|okay|ok|absolutely|great|alright|no problem)\b[^:\n]{0,80}?\b"
    + _PREAMBLE_NOUN
    + r"\b[^:\n]{0,40}"
    r"|(?:here(?:'s|’s| is| are)?|below is|this is)\b[^:\n]{0,80}?\b" + _PREAMBLE_NOUN + r"\b[^:\n]{0,40}"
    r"|(?:(?:the|my|a|an|your|one)\s+)?(?:(?:final|fused|merged|combined|consolidated|new|improved|enriched|rewritten|"
    r"resulting|concise|single|suggested|possible|updated|vec|image|short|one[- ]sentence|proposed|refined)\s+)*"
    r"(?:caption|description|answer|output|result|response)\b(?!\s*#?\s*\d)[^:\n]{0,20}"
    r")\s*[:：]\s*",
    re.I,
)
_INTERJECTION = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|alright|great question|good question|no problem)"
    r"|(?:i['’]?d be |i am |i['’]?m )?(?:happy|glad) to help)\s*[!.,]\s+",
    re.I,
)
_IMAGE_PREAMBLE = re.compile(
    r"^\s*(?:"
    r"in\s+(?:this|the)\s+(?:image|picture|photo(?:graph)?|scene|illustration)\s*,?\s*(?:(?:we|you|i)\s+(?:can\s+)?see"
    r"|there\s+(?:is|are)|(?:is|are)\s+shown)?"
    r"|(?:the|this)\s+(?:image|picture|photo(?:graph)?|scene|illustration|shot|frame|snapshot)\s+"
    r"(?:(?:appears|seems)\s+to\s+)?(?:shows?|depicts?|features?|displays?|captures?|presents?|portrays?|contains?"
    r"|illustrates?|showcases?|highlights?|is\s+of)"
    r"|(?:the|this)\s+(?:image|picture|photo(?:graph)?)\s+is(?=\s+(?:an?|the)\s)"
    r"|this\s+is\s+(?:an?\s+)?(?:image|picture|photo(?:graph)?|snapshot)\s+of"
    r"|(?:here\s+)?(?:we|you|i)\s+(?:can\s+)?see"
    r")\s*(?:that\s+)?[:,]?\s*",
    re.I,
)
_MD_LINK = re.compile(r"!?\[([^\]\n]{0,300})\]\([^)\n]{0,500}\)")
_MD_EMPH = [
    re.compile(r"\*\*\*(.+?)\*\*\*"),
    re.compile(r"\*\*(.+?)\*\*"),
    re.compile(r"__(.+?)__"),
    re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"),
    re.compile(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])"),
    re.compile(r"~~(.+?)~~"),
    re.compile(r"`([^`\n]+)`"),
]
_HTML_FORMAT = re.compile(r"</?(?:b|i|u|em|strong|p|span|div|br|small|mark|sup|sub|h[1-6])\b[^>]{0,80}>", re.I)
_LINE_MARK = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|(?:[-*+•●▪◦–]|\d{1,2}[.)]|\(\d{1,2}\)|[a-hA-H][.)])\s+)")
_LIST_ITEM = re.compile(
    r"^\s*(?:[-*+•●▪◦–]\s+|\d{1,2}[.)]\s+|\(\d{1,2}\)\s*|[a-hA-H][.)]\s+|(?:\*\*)?(?:option|version|caption|alternative"
    r"|variant|choice)\s*#?\s*(?:\d{1,2}|[a-h]|one|two|three)\b)",
    re.I,
)
_INLINE_ALTERNATIVES = re.compile(
    r"(?:^|[\s:;])(?:1[.)]|\(1\)|#1)\s+\S.{2,}?(?:^|\s)(?:2[.)]|\(2\)|#2)\s+\S"
    r"|(?:^|\s)(?:A\)|\([aA]\))\s+\S.{2,}?\s(?:B\)|\([bB]\))\s+\S"
    r"|\b(?:option|version|alternative|variant|caption)\s*#?\s*(?:1|one|a)\b.{3,}?\b(?:option|version|alternative"
    r"|variant|caption)\s*#?\s*(?:2|two|b)\b"
    r"|(?:^|[.;!?]\s+|\s)(?:alternatively|or alternatively|another option(?: would be| is)?|another version(?: would be"
    r"| is)?|or perhaps)\s*[,:]",
    re.I | re.S,
)
_QUOTE_PAIRS = {'"': '"', "“": "”", "„": "“", "'": "'", "‘": "’", "«": "»", "「": "」", "『": "』", "‹": "›"}
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？])[\"”’»」』)]*\s+(?=\S)|(?<=[。！？])(?=\S)")
_META = re.compile(
    r"^\W*(?:note|nb|n\.b\.|p\.s\.|ps|disclaimer|explanation|rationale|reasoning|comment|remarks?"
    r"|translation)\b\s*[:\-–—]"
    r"|\b(?:i|i've|i’ve|i have|i'd|we|we've|we have)\s+(?:also\s+|just\s+|have\s+|simply\s+)?"
    r"(?:merged|combined|kept|included|added|used|removed|omitted|dropped|preserved|retained|ignored|incorporated"
    r"|integrated|"
    r"focused|chose|made sure|tried|avoided|left out|excluded|fused|rewrote|rephrased|corrected|translated|followed"
    r"|noted|"
    r"assumed|inferred|did not|didn't|replaced|mentioned|described|limited|kept it|stuck)\b"
    r"|\b(?:this|the above|the|my|your)\s+(?:fused\s+|merged\s+|final\s+|consolidated\s+|combined\s+|resulting\s+"
    r"|new\s+|updated\s+|vec\s+|image\s+)?"
    r"(?:caption|description|sentence|version|output|response|answer)\s+(?:combines|merges|keeps|includes|retains"
    r"|preserves|uses|"
    r"integrates|incorporates|adds|omits|is|was|has|contains|captures|highlights|mentions|focuses|reflects|stays|meets"
    r"|follows|avoids|does|should|would|could)\b"
    r"|\b(?:both|the two|the given|the provided|these|the original|each)\s+(?:sources|texts|captions|descriptions"
    r"|inputs)\b"
    r"|^\W*(?:this|it|that)\s+(?:version\s+|one\s+|wording\s+)?(?:keeps|combines|merges|retains|preserves|integrates"
    r"|incorporates|"
    r"mentions|reflects|follows|avoids|stays within|meets|sticks to)\b"
    r"|\b(?:keeps|retains|preserves|combines|merges)\s+(?:the|both|all)\s+(?:\w+\s+)?(?:names?|details?|sources?"
    r"|information|facts|entities)\b"
    r"|\b(?:the\s+)?" + _SOURCE_LABEL + r"\b"
    r"|\b(?:hope this helps|i hope|let me know|feel free to|happy to help|if you need|if you'd like|would you like"
    r"|you can adjust|"
    r"what you (?:were|are) looking for|as (?:requested|instructed|you asked))\b"
    r"|\(\s*\d+\s+words?\s*\)|\bword count\b|\bwords? long\b",
    re.I,
)
_META_PAREN = re.compile(r"\s*[(\[]([^()\[\]\n]{1,400})[)\]]")


@dataclass
class _Tidy:
    text: str
    items: int = 1  # captions found (more than one: alternatives)
    commentary: bool = False  # meta talk that could not be cut off
    notes: list[str] = field(default_factory=list)  # what was cut off
    preamble_only: bool = False  # the output was only wrappers (a preamble, a label)


def _strip_quotes(text: str) -> str:
    """Quotes around the whole caption go (also '"A red bus".'); quotes inside it stay."""
    for _ in range(3):
        t = text.strip()
        if len(t) < 2 or t[0] not in _QUOTE_PAIRS:
            break
        close = _QUOTE_PAIRS[t[0]]
        if t.endswith(close):
            body, end = t[1:-1], ""
        elif t[-2:-1] == close and t[-1] in ".!":
            body, end = t[1:-2], t[-1]
        else:
            break
        if close in body or (t[0] != close and t[0] in body):
            break  # 'a "b" c "d"': the quotes are the caption's own
        text = body.strip() + end
    return text


_MARKDOWN_CHARS = frozenset("[<*_~`\\")  # every pattern of _strip_markdown needs one of them


def _strip_markdown(text: str) -> str:
    if _MARKDOWN_CHARS.isdisjoint(text):
        return text
    text = _MD_LINK.sub(r"\1", text)
    text = _HTML_FORMAT.sub(" ", text)
    for _ in range(2):
        for rx in _MD_EMPH:
            text = rx.sub(r"\1", text)
    text = re.sub(r"\*{2,}|_{2,}|~~|`+", "", text)  # stray markers
    text = re.sub(r"(?<!\w)\*(?!\w)", "", text)
    text = re.sub(r"\\([*_`#~\[\]()])", r"\1", text)
    return text


def _clean_line(line: str) -> str:
    line = _LINE_MARK.sub("", line)
    line = _strip_markdown(line)
    return re.sub(r"\s+", " ", line).strip()


@lru_cache(maxsize=4096)  # tidying asks about the same sentence more than once (first, last, any)
def _is_meta(sentence: str) -> bool:
    return bool(_META.search(sentence)) and not _LABEL_ECHO.search(sentence)


def _split_sentences(text: str) -> list[str]:
    return [s for s in _SENT_SPLIT.split(text) if s.strip()]


def _n_words(text: str) -> int:
    return max(1, _word_count(text))


def _cut_commentary(text: str, tidy: _Tidy) -> str:
    """Meta parentheticals anywhere and trailing meta sentences go; meta elsewhere is flagged."""

    def drop_paren(m: re.Match) -> str:
        inner = m.group(1)
        if (
            _is_meta(inner)
            or re.match(r"\s*(?:source|based on|from the|\d+\s+words?)\b", inner, re.I)
            or re.fullmatch(r"\s*(?:\w+\s+){0,2}(?:caption|version|description)\s*", inner, re.I)
        ):
            tidy.notes.append(m.group(0).strip())
            return ""
        return m.group(0)

    text = _META_PAREN.sub(drop_paren, text)
    sents = _split_sentences(text)
    if not sents:
        return text
    # a leading meta sentence that introduces the caption ("I combined both sources:") is a preamble
    while len(sents) > 1 and _is_meta(sents[0]) and sents[0].rstrip().endswith((":", "：")):
        tidy.notes.append(sents.pop(0))
    if len(sents) == 1 and _is_meta(sents[0]):
        m = re.match(r"^(.*?[^\W\d_].*?)[\s]*[:：]\s+(.+)$", sents[0])
        if m and _is_meta(m.group(1)) and not _is_meta(m.group(2)):
            tidy.notes.append(m.group(1))
            return m.group(2)
    # a note after a dash on the last sentence ("… in fog — I hope this is what you needed.")
    parts = re.split(r"\s[—–-]\s", sents[-1])
    if len(parts) > 1 and _is_meta(parts[-1]) and not _is_meta(" ".join(parts[:-1])):
        tidy.notes.append(parts[-1])
        sents[-1] = sents[-1][: sents[-1].rfind(parts[-1])].rstrip(" —–-") + "."
        text = " ".join(sents)
    tail: list[str] = []
    while sents and _is_meta(sents[-1]):
        tail.insert(0, sents.pop())
    kept = " ".join(sents)
    if tail and sents and sum(map(_n_words, tail)) <= 1.5 * _n_words(kept):
        tidy.notes.extend(tail)
        text = kept
    elif tail:
        tidy.commentary = True
        return text
    if any(_is_meta(s) for s in sents):
        tidy.commentary = True
    return text


def _units(lines: list[str]) -> list[str]:
    """Lines → blocks of text: a blank line, or a line that ends a sentence before one that starts
    another, separates blocks; a line broken mid-sentence is joined to the next."""
    units: list[str] = []
    cur = ""
    for ln in lines + [""]:
        c = _clean_line(ln) if ln else ""
        if not c:
            if cur:
                units.append(cur)
            cur = ""
        elif cur and re.search(r"[.!?。！？\"”»」]$", cur) and not c[:1].islower():
            units.append(cur)
            cur = c
        else:
            cur = (cur + " " + c).strip()
    return units


def _paraphrases(units: list[str]) -> bool:
    """Whether two blocks say the same thing (alternative captions) rather than continue each other."""
    bags = []
    for u in units:
        t = _text(u)
        bags.append({_stem(w) for w in t.content()} | t.content_grams())
    for i in range(len(bags)):
        for j in range(i + 1, len(bags)):
            a, b = bags[i], bags[j]
            if min(len(a), len(b)) >= 2 and len(a & b) >= 0.5 * min(len(a), len(b)):
                return True
    return False


# A preamble that announces several answers, and list items named as answers ("Option 2", "Caption B").
_SEVERAL = re.compile(
    r"\b(?:captions|descriptions|options|versions|alternatives|variants|suggestions|possibilities|choices)\b"
    r"|\b(?:two|three|four|five|several|a few|some|multiple|different)\s+(?:\w+\s+)?(?:captions?|options?|versions?"
    r"|ways|takes)\b",
    re.I,
)
_NAMED_ITEM = re.compile(
    r"^\W*(?:option|version|caption|alternative|variant|choice|description)\s*#?\s*(?:\d{1,2}|[a-h]|one|two|three)\b",
    re.I,
)
# A line that opens with a short label: one to three words, then a colon or a dash ("Short caption: …").
_LABEL = re.compile(r"^\W*([^\W\d_][\w'’]*(?:\s+[\w'’]+){0,2})\s*(?:[:：]|\s[-–—])\s+(?=\S)")


def _labelled(line: str) -> str | None:
    """The text after a short label that opens the line, when it is a caption of its own (3 words or more)."""
    plain = _strip_markdown(line).strip()
    m = _LABEL.match(plain)
    if not m or re.match(r"\W*" + _SOURCE_LABEL, plain, re.I):
        return None
    body = plain[m.end() :]
    return body if _word_count(body) >= 3 else None


def _same_subject(items: list[str]) -> bool:
    """Whether list items describe one subject over again (alternative captions) rather than parts of one
    scene: every item shares a content word, or two of them paraphrase each other."""
    if len(items) < 2:
        return False
    bags = []
    for item in items:
        t = _text(item)
        bags.append({_stem(w) for w in t.content()} | t.content_grams())
    if all(bags) and set.intersection(*bags):
        return True
    return _paraphrases(items)


def _tidy(raw: str | None, stage: str) -> _Tidy:
    """Remove what models wrap around an answer; keep evidence of several answers."""
    if not raw:
        return _Tidy("")
    text = _ZERO_WIDTH.sub("", raw)
    text = _SPECIAL_TOKENS.sub(" ", text)
    text = _FENCE.sub("\n", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.strip()
    tidy = _Tidy("")
    had_text = bool(text)
    text = _ROLE.sub("", text)
    # lines: drop horizontal rules, then a preamble ("Here is the caption:", "## Caption") on the first
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if not re.fullmatch(r"[-=*_~]{3,}", ln)]
    while lines and not lines[0]:
        lines.pop(0)
    if lines:
        first = _strip_markdown(lines[0]).strip()
        first = _INTERJECTION.sub("", first)
        m = _PREAMBLE.match(first)
        if m and not re.match(r"\W*" + _SOURCE_LABEL, first, re.I):
            rest = first[m.end() :].strip()
            tidy.notes.append(first[: m.end()].strip())
            lines[0] = rest
        elif (
            len(lines) > 1
            and (first.endswith((":", "：")) or _LABEL_LINE.fullmatch(first))
            and _word_count(first) <= 16
            and not re.match(r"\W*" + _SOURCE_LABEL, first, re.I)
        ):
            tidy.notes.append(first)
            lines[0] = ""
        else:
            lines[0] = _INTERJECTION.sub("", lines[0])
    # trailing lines that are notes go ("I hope this helps!", "Note: …")
    while sum(1 for ln in lines if ln) > 1:
        last = max(i for i, ln in enumerate(lines) if ln)
        cleaned = _clean_line(lines[last])
        if not (_is_meta(cleaned) or re.match(r"\W*(?:note|explanation|rationale)\b", cleaned, re.I)):
            break
        tidy.notes.append(cleaned)
        del lines[last:]
    content = [ln for ln in lines if ln]
    announced = any(_SEVERAL.search(note) for note in tidy.notes)  # "Here are three possible captions:"
    marked = [ln for ln in content if _LIST_ITEM.match(ln)]
    labelled = [ln for ln in content if _labelled(ln)]
    if len(marked) >= 2 and len(marked) >= len(content) - 1:
        # a list: a caption split into points (caption stage) or several captions (fuse stage)
        items = [_clean_line(ln) for ln in content if _clean_line(ln)]
        if stage != "caption" or announced or any(_NAMED_ITEM.match(ln) for ln in marked) or _same_subject(items):
            tidy.items = len(marked)
            tidy.text = "\n".join(re.sub(r"\s+", " ", _strip_markdown(ln)).strip() for ln in content)
            return tidy
        text = " ".join(i if re.search(r"[.!?。]$", i) else i + "." for i in items)
    elif (
        len(labelled) >= 2
        and len(labelled) >= len(content) - 1
        and (stage != "caption" or announced or _same_subject([_labelled(ln) or "" for ln in labelled]))
    ):
        # captions under labels on separate lines ("Short: … / Long: …", "English: … / French: …")
        tidy.items = len(labelled)
        tidy.text = "\n".join(re.sub(r"\s+", " ", _strip_markdown(ln)).strip() for ln in content)
        return tidy
    elif announced and len(_units(lines)) >= 2:
        tidy.items = len(_units(lines))
        tidy.text = "\n\n".join(_units(lines))
        return tidy
    else:
        units = _units(lines)
        plain = [u for u in units if not _is_meta(u)]
        if stage == "fuse" and len(plain) > 1 and _paraphrases(plain):
            tidy.items = len(plain)
            tidy.text = "\n\n".join(units)
            return tidy
        text = " ".join(units)
    text = _strip_quotes(text)
    text = _cut_commentary(text, tidy)
    # second pass: the caption itself may be quoted, or open with a preamble
    text = _strip_quotes(text.strip())
    m = _PREAMBLE.match(text)
    if m and not re.match(r"\W*" + _SOURCE_LABEL, text, re.I):
        text = _strip_quotes(text[m.end() :])
    m = _IMAGE_PREAMBLE.match(text)
    if m:
        rest = text[m.end() :].strip()
        tidy.notes.append(text[: m.end()].strip())
        text = rest[:1].upper() + rest[1:] if rest else ""
    text = _strip_quotes(re.sub(r"\s+", " ", text).strip())
    text = text.strip(" \t-–—:;,")
    if all(unicodedata.category(ch)[0] in "PZ" for ch in text):
        text = ""  # punctuation left over from the wrappers
    if not text and had_text:
        tidy.preamble_only = True
    tidy.text = text
    return tidy


def tidy_caption(text: str | None) -> str:
    """A VLM caption without wrappers: chat tokens, "The image shows", quotes, Markdown, bullets, notes."""
    return _tidy(text, "caption").text


def tidy_fused(text: str | None) -> str:
    """A fused caption without wrappers; several captions stay on separate lines (so they are rejected)."""
    return _tidy(text, "fuse").text


# --- alt-text: one cleaned form for every reader -------------------------------------------
_TAG = re.compile(r"<[^>]{0,200}>")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
_FILENAME = re.compile(r"\b[\w\-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|avif)\b", re.I)
# Camera and phone file names without their extension (IMG_4471, DSC01234, PXL_20230101_123456789).
_CAMERA_NAME = re.compile(r"\b(?:IMG|DSC|DSCN|DSCF|DCIM|PXL|MVIMG|GOPR|DJI|SAM|P\d{3})[_\-]?\d+(?:[_\-]\d+)*\b", re.I)
_STOCK = re.compile(
    r"\s*[-|–—:]?\s*\b(?:stock (?:photo|image|picture|illustration|vector)s?(?: and images?)?"
    r"|royalty[- ]free(?: stock)?(?: photo| image)?|alamy|shutterstock|getty ?images|istock(?:photo)?"
    r"|dreamstime|123rf|depositphotos|adobe stock)\b(?: - [\w .]+$)?",
    re.I,
)
_SPACE = re.compile(r"\s+")


def ftfy_library() -> str:
    """The mojibake repairer and its version, for the checks' fingerprint."""
    from importlib import metadata

    try:
        return f"ftfy {metadata.version('ftfy')}"
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency of vecap
        return "ftfy (unknown version)"


def _repair(text: str) -> str:
    """HTML entities unescaped (twice: '&amp;amp;' is common) and mojibake repaired (ftfy, as open_clip does)."""
    import ftfy

    return ftfy.fix_text(html.unescape(html.unescape(text)), normalization="NFC")


def light_clean(text: str | None) -> str:
    """What a training caption needs from raw alt-text: entities decoded, mojibake repaired, tags dropped,
    spaces collapsed."""
    if not text:
        return ""
    return _SPACE.sub(" ", _TAG.sub(" ", _repair(text))).strip()


def clean_alt_text(text: str | None, max_words: int = 64) -> str:
    """Web alt-text → the one cleaned form every reader uses (the fusion's prompt and checks, the write
    stage's alt-text side): entities decoded, mojibake repaired, markup, URLs, file and camera names and
    stock-site boilerplate removed, whitespace collapsed, length capped. "" when nothing usable is left
    (an alt-text that is only ``IMG_4471.png`` is no alt-text)."""
    if not text:
        return ""
    text = _repair(text)
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _FILENAME.sub(" ", text)
    text = _CAMERA_NAME.sub(" ", text)
    text = _STOCK.sub(" ", text)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\t\n")
    text = _SPACE.sub(" ", text).strip(" -|–—:,;._")
    if not any(unicodedata.category(ch)[0] == "L" for ch in text):
        return ""  # digits and punctuation left from a file name say nothing
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
