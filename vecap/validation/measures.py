"""Measures of a caption against its sources: the one definition of entity recall, novel terms,
word counts and repetition, used by the checks, the quality columns, the report, ``vecap inspect``
and the fuse stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vecap.validation.text import (
    _CARDINALS,
    _NAME_CONNECTORS,
    CASED_SCRIPTS,
    GENERIC,
    STOP,
    UNSPACED_SCRIPTS,
    _fold,
    _foreign_source,
    _language,
    _matches,
    _Text,
    _text,
    _Tok,
    _tokens,
    _word_count,
    script_of,
)
from vecap.validation.tidy import clean_alt_text


# --- measures ---------------------------------------------------------------------------
def _repetition(text: str) -> tuple[float, int, str]:
    """(share of repeated n-grams, most copies of one unit in a row, that unit).

    Units are words for spaced scripts and characters for unspaced ones, so "bridge bridge
    bridge" and "赤い花赤い花赤い花" are both three copies."""
    units: list[str] = []
    for t in _tokens(text):
        if t.script in UNSPACED_SCRIPTS:
            units.extend(t.text)
        else:
            units.append(t.low)
    n_units = len(units)
    if n_units < 2:
        return 0.0, 1, ""
    best_copies, best_unit = 1.0, ""
    for size in range(1, min(12, n_units // 2) + 1):
        run = 0
        for i in range(size, n_units):
            if units[i] == units[i - size]:
                run += 1
                copies = (run + size) / size
                if copies > best_copies and (size > 1 or not units[i].isdigit()):
                    best_copies, best_unit = copies, " ".join(units[i - size + 1 : i + 1])
            else:
                run = 0
    chars = sum(1 for u in units if len(u) == 1 and script_of(u) in UNSPACED_SCRIPTS)
    n = 4 if chars > n_units / 2 else 3
    # repeated n-grams, and (discounted) repeated (n-1)-grams: "the bridge over the bay, the bridge
    # over the water, the bridge over the sea" varies the last word of each copy
    share = max(_dup_share(units, n), 0.8 * _dup_share(units, n - 1))
    return share, int(best_copies), best_unit


def _dup_share(units: list[str], n: int) -> float:
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return (1 - len(set(grams)) / len(grams)) if len(grams) >= 2 else 0.0


def repetition_score(text: str | None) -> float:
    """0 for text without repeats, towards 1 for a loop: max(repeated n-grams, loop coverage)."""
    share, copies, unit = _repetition(text or "")
    n = max(1, len(_tokens(text or "")))
    loop = 0.0
    if copies >= 3:
        loop = min(1.0, (copies - 1) * max(1, len(unit.split())) / n)
    return round(max(share, loop), 4)


_URLISH = re.compile(
    r"(?:https?://|www\.)[^\s<>\"')\]]+|\b[\w.+-]+@[\w-]+\.[\w.]+\b|\b[\w-]+\.(?:com|org|net|io|co|uk|de|fr|jp|cn|ru"
    r"|info|biz|shop|store|ly|me|tv|app)\b(?:/\S*)?"
    r"|(?<![\w@])@[A-Za-z_]\w{1,30}|(?<![\w&#])#[A-Za-z_]\w{1,50}",
    re.I,
)


@dataclass
class _Entity:
    label: str  # as written
    parts: tuple[str, ...]  # folded words (or one unit for caseless scripts, one canonical number)
    kind: str  # "number" | "name" | "term"
    script: str | None
    weight: float


_NAME_BREAK = re.compile(r"[^\s\-'’&.]")


def _shouting(t: _Text) -> bool:
    """Mostly upper-case text: capitals say nothing about names there."""
    cased = [tk.text for tk in t.tokens if tk.script in CASED_SCRIPTS and tk.number is None and len(tk.text) > 1]
    return len(cased) >= 3 and sum(1 for w in cased if w.isupper()) >= 0.7 * len(cased)


def _phrases(t: _Text) -> list[tuple[list[_Tok], bool]]:
    """Runs of capitalised words in cased scripts (with name connectors inside): (tokens, weak).

    A name is weak when it is a single word opening a sentence ("Sunset over Paris") or when
    the whole text is in capitals."""
    shouting = _shouting(t)
    out: list[tuple[list[_Tok], bool]] = []
    cur: list[_Tok] = []
    pending: list[_Tok] = []

    def flush() -> None:
        nonlocal cur, pending
        core = [tk for tk in cur if tk.low not in STOP and tk.low not in _NAME_CONNECTORS and tk.low not in GENERIC]
        if core:
            weak = shouting or (len(core) == 1 and (cur[0].start or core[0].start))
            out.append((core, weak))
        cur, pending = [], []

    for tk in t.tokens:
        capital = (
            tk.script in CASED_SCRIPTS
            and tk.number is None
            and (tk.text[0].isupper() or any(c.isupper() for c in tk.text[1:]))
        )
        broken = bool(_NAME_BREAK.search(tk.gap))  # a comma, a bracket … ends a name
        if capital and not ((tk.start or broken) and cur):
            cur.extend(pending)
            pending = []
            cur.append(tk)
        elif capital:  # a new sentence starts a new name
            flush()
            cur.append(tk)
        elif cur and tk.low in _NAME_CONNECTORS and not tk.start and not broken:
            pending.append(tk)
        else:
            flush()
    flush()
    return out


def _alt_entities(alt: _Text) -> list[_Entity]:
    """Names and numbers of the alt-text: capitalised phrases (cased scripts), numbers (any digits),
    and the words of caseless scripts (Han/katakana runs, Arabic, Hindi, Korean words …) as weaker terms."""
    ents: list[_Entity] = []
    seen: set[tuple[str, ...]] = set()
    for tk in alt.tokens:
        if tk.number is not None and tk.script is None and (tk.number,) not in seen:
            seen.add((tk.number,))
            ents.append(_Entity(tk.text, (tk.number,), "number", None, 1.0))
    for toks, weak in _phrases(alt):
        parts = tuple(dict.fromkeys(tk.low for tk in toks if len(tk.low) > 1 or not tk.low.isalpha()))
        if not parts or parts in seen:
            continue
        seen.add(parts)
        ents.append(_Entity(" ".join(tk.text for tk in toks), parts, "name", toks[0].script, 0.5 if weak else 1.0))
    for tk in alt.tokens:
        if tk.script is None or tk.script in CASED_SCRIPTS or tk.number is not None:
            continue
        units: list[str]
        if tk.script in ("hani", "kana"):
            # Han runs and katakana runs carry names; hiragana is grammar
            units = [
                m.group(0)
                for m in re.finditer(r"[\u4e00-\u9fff\u3400-\u4dbf々〆]{2,}|[\u30a0-\u30ffー・]{2,}", tk.text)
            ]
        elif tk.low in STOP or len(tk.low) < 2:
            continue
        else:
            units = [tk.low]
        for u in units:
            if (u,) not in seen:
                seen.add((u,))
                ents.append(_Entity(u, (u,), "term", tk.script, 0.5))
    return ents


def _entity_kept(e: _Entity, out: _Text) -> bool:
    if e.kind == "number":
        return e.parts[0] in out.numbers
    if e.kind == "term":
        return out.gram_share(e.parts[0]) >= 0.5
    found = sum(1 for p in e.parts if _matches(p, e.script, out))
    return found >= 0.5 * len(e.parts)


def _recall_terms(alt: _Text, out: _Text, foreign: bool = False) -> tuple[float, float, int, int, list[str]]:
    """(kept weight, total weight, kept count, total count, lost labels) of the alt-text's checkable entities.

    An entity in a script the output does not use is not checkable (it may have been
    translated or transliterated): it counts neither way. A weak name (one capitalised word opening
    a sentence: "Wow, what a view!", "Yay! Finally …") counts only beside a name the text plainly
    has: alone, it is as likely an interjection or a common word as a name."""
    total = kept = 0.0
    n_total = n_kept = 0
    lost: list[str] = []
    ents = [e for e in _alt_entities(alt) if e.kind == "number" or out.has_family(e.script)]
    plain = any(e.weight >= 1 or e.kind == "term" for e in ents)
    for e in ents:
        if e.kind == "name" and e.weight < 1 and (foreign or not plain):
            continue  # a capitalised first word of another language's sentence, or of a text with no other name
        total += e.weight
        n_total += 1
        if _entity_kept(e, out):
            kept += e.weight
            n_kept += 1
        else:
            lost.append(e.label)
    return kept, total, n_kept, n_total, lost


def _recall(alt: _Text, out: _Text, foreign: bool = False) -> tuple[float | None, list[str]]:
    """Weighted share of the alt-text's checkable entities kept in the output, and the lost ones."""
    kept, total, _, _, lost = _recall_terms(alt, out, foreign)
    if total == 0:
        return None, []
    return kept / total, lost


# --- the one definition, for every reader (checks, quality columns, report, inspect, fuse stage) ---
def word_count(text: str | None) -> int:
    """Words of a caption: spaced scripts by word, unspaced ones (CJK, Thai …) by characters (2 or 3 a word)."""
    return _word_count(text) if text else 0


def _alt(alt_text: str | None) -> _Text:
    """The alt-text as the fusion saw it (cleaning is idempotent: raw or cleaned alt-text alike), less its
    instructions."""
    return _text(_injection_span(clean_alt_text(alt_text))[0])


def entities(alt_text: str | None) -> list[str]:
    """The names and numbers of an alt-text, as written (what entity recall counts)."""
    return [e.label for e in _alt_entities(_alt(alt_text))]


def entity_counts(alt_text: str | None, text: str | None) -> tuple[int, int]:
    """How many of the alt-text's checkable names and numbers ``text`` keeps, and of how many (0, 0: none)."""
    alt = _alt(alt_text)
    out = _text(text or "")
    _, _, kept, total, _ = _recall_terms(alt, out, _foreign_source(alt, _language(out)))
    return kept, total


def entity_recall(alt_text: str | None, text: str | None) -> float | None:
    """Weighted share of the alt-text's names and numbers that ``text`` keeps (``q_entity_recall``);
    None: none to keep."""
    alt = _alt(alt_text)
    out = _text(text or "")
    return _recall(alt, out, _foreign_source(alt, _language(out)))[0]


def _visual_overlap(vlm: _Text, out: _Text) -> float | None:
    """Share of the VLM caption's content words (or CJK bigrams) found in the output; None when
    the output is not in the VLM caption's script (a translation cannot be measured this way)."""
    if vlm.main is None or not out.has_family(vlm.main if vlm.main != "cjk" else "hani"):
        if not (vlm.main == "cjk" and out.families.get("cjk")):
            return None
    words = vlm.content()
    grams = vlm.content_grams() if vlm.main == "cjk" else set()
    units = len(words) + len(grams)
    if units == 0:
        return None
    hit = sum(1 for w in words if _matches(w, _word_script(w), out)) + sum(1 for g in grams if g in out.grams)
    return hit / units


def _word_script(word: str) -> str | None:
    for ch in word:
        sc = script_of(ch)
        if sc:
            return sc
    return None


def _novel(out: _Text, alt: _Text, vlm: _Text, out_lang: str | None, foreign: bool = False) -> list[str]:
    """Names, numbers and URLs of the output found in neither source.

    Names are judged only when capital letters mark names in the output's language (not German,
    whose nouns are capitalised) and both sources are in the output's script and language (a
    transliterated or translated name is not an invention)."""
    found: list[str] = []
    for tk in out.tokens:
        value = tk.number if tk.script is None else _CARDINALS.get(tk.low)
        if value is not None and value not in alt.numbers and value not in vlm.numbers:
            found.append(tk.text)
    src_low = alt.lowtext + " \n " + vlm.lowtext
    src_flat = re.sub(r"[^\w]+", "", src_low)
    for m in _URLISH.finditer(out.text):
        s = _fold(m.group(0)).rstrip(".,;")
        flat = re.sub(r"[^\w]+", "", s.split("://")[-1])
        if s not in src_low and flat not in src_flat:
            found.append(m.group(0).rstrip(".,;"))
    sources_scripts = set(alt.families) | set(vlm.families)
    names_checkable = (
        out.main in ("latn", "cyrl", "grek", "armn")
        and not _shouting(out)
        and out_lang != "de"
        and not foreign
        and sources_scripts <= {out.main}
    )
    if names_checkable:
        url_spans = " ".join(m.group(0) for m in _URLISH.finditer(out.text))
        for toks, weak in _phrases(out):
            if weak:
                continue
            for tk in toks:
                if len(tk.low) < 3 or tk.low in url_spans.lower() or tk.number is not None:
                    continue
                if not alt.has_word(tk.low) and not vlm.has_word(tk.low):
                    found.append(tk.text)
    return list(dict.fromkeys(found))


# --- instructions hidden in the alt-text -------------------------------------------------
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}\b(?:instructions?|prompts?|rules|above|previous"
    r"|prior|everything|all|system)\b"
    r"|\b(?:you are now|you're now|act as|pretend (?:to be|you are)|from now on|new instructions?|developer mode"
    r"|jailbreak)\b"
    r"|(?:^|\W)(?:system|assistant|user)\s*:"
    r"|\b(?:instead|rather)\b[^.!?\n]{0,40}?\b(?:write|say|output|print|respond|reply|answer|tell|list|translate"
    r"|generate|compose|produce|return)\b"
    r"|[,;:]\s*(?:please\s+)?(?:write|say|output|print|compose|generate|translate|tell)\s+(?:a|an|the|me|us|only"
    r"|something|about)\b"
    r"|\b(?:respond|reply|answer|output|return)\s+(?:only\s+)?(?:with|in)\b"
    r"|\b(?:output|print|say|write|type|return)\s+(?:only\s+)?(?:the\s+)?(?:word|words|phrase|text|sentence|following"
    r"|string)\b"
    r"|\bdescribe (?:this|it|the image|the photo) as\b|\btell (?:the )?(?:user|reader|them)\b"
    r"|\b(?:start|end|begin|finish)\s+(?:your|the)\s+(?:caption|answer|response|reply|output)\s+with\b"
    r"|\b(?:include|add|insert|append)\s+(?:the\s+|this\s+)?(?:word|phrase|text|link|url|sentence|following|hashtag)\b"
    r"|\b(?:do not|don't|never)\s+(?:caption|describe|mention)\b"
    r"|(?:^|[.!?|:]\s*)(?:please\s+)?(?:write|say|output|print|compose|generate|translate|repeat|tell me"
    r"|caption (?:this|it) as|describe (?:this|it) as)\b[^.!?\n]{3,}"
    r"|(?:^|[.!?|:]\s*)(?:please\s+)?(?:ignore|disregard|forget)\s+(?:the|this|that|any|all|what|everything|your)\b"
    r"|\b(?:ignorez|oubliez)\b.{0,30}\binstructions\b|\bignoriere\b|\bignora\b.{0,30}\binstrucciones\b|忽略|无视|無視"
    r"|игнорируй|забудь",
    re.I,
)


def _injection_span(alt: str) -> tuple[str, str]:
    """(the alt-text without its instruction-like sentences, those sentences)."""
    if not _INJECTION.search(alt):
        return alt, ""
    keep: list[str] = []
    span: list[str] = []
    for s in re.split(r"(?<=[.!?|])\s+|\n+", alt):
        (span if _INJECTION.search(s) else keep).append(s)
    return " ".join(keep), " ".join(span)


# --- quality columns --------------------------------------------------------------------
def caption_quality(text: str | None) -> dict[str, Any]:
    """``q_*`` columns of a caption row (:data:`vecap.schemas.QUALITY_CAPTION`): of the tidied caption."""
    t = _text(text or "")
    return {
        "q_repetition": repetition_score(t.text) if t.text else None,
        "q_lang_out": _language(t),
        "q_words": _word_count(t.text) if t.text else 0,
    }


@dataclass
class _FuseMeasures:
    alt: _Text
    vlm: _Text
    out: _Text
    alt_clean: str
    injection: str
    recall: float | None
    lost: list[str]
    overlap: float | None
    novel: list[str]
    lang_alt: str | None
    lang_vlm: str | None
    lang_out: str | None


def _measure(output: str, alt_text: str, vlm_caption: str) -> _FuseMeasures:
    alt_clean, injection = _injection_span(alt_text or "")
    alt = _text(alt_clean)
    vlm = _text(vlm_caption or "")
    out = _text(output or "")
    lang_out = _language(out)
    foreign = _foreign_source(alt, lang_out)
    recall, lost = _recall(alt, out, foreign) if output else (None, [])
    return _FuseMeasures(
        alt=alt,
        vlm=vlm,
        out=out,
        alt_clean=alt_clean,
        injection=injection,
        recall=recall,
        lost=lost,
        overlap=_visual_overlap(vlm, out) if output else None,
        novel=_novel(out, alt, vlm, lang_out, foreign) if output else [],
        lang_alt=_language(_text(alt_text or "")),
        lang_vlm=_language(vlm),
        lang_out=lang_out,
    )


def _quality_of(m: _FuseMeasures) -> dict[str, Any]:
    text = m.out.text
    return {
        "q_entity_recall": None if m.recall is None else round(m.recall, 4),
        "q_visual_overlap": None if m.overlap is None else round(m.overlap, 4),
        "q_novel": len(m.novel) if text else None,
        "q_novel_terms": "|".join(m.novel)[:200] or None,
        "q_repetition": repetition_score(text) if text else None,
        "q_lang_alt": m.lang_alt,
        "q_lang_vlm": m.lang_vlm,
        "q_lang_out": m.lang_out,
        "q_words": _word_count(text) if text else 0,
        "q_words_alt": _word_count(m.alt.text),
        "q_words_vlm": _word_count(m.vlm.text),
    }


def fuse_quality(output: str | None, alt_text: str | None, vlm_caption: str | None) -> dict[str, Any]:
    """``q_*`` columns of a fused row (:data:`vecap.schemas.QUALITY_FUSE`), of an already tidied output.

    Use it for any caption against its sources (e.g. the fallback actually kept); :func:`check_fused`
    fills :attr:`Verdict.quality` with the same columns for the model's output."""
    return _quality_of(_measure(output or "", alt_text or "", vlm_caption or ""))
