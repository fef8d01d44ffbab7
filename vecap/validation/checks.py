"""The named checks, one small function each, in the order they run (the registry
:data:`CAPTION_CHECKS` / :data:`FUSE_CHECKS`); the first that fails names the row's ``reason``.
The recipe's ``skip`` names and the docs' table come from the registry.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from vecap import vocab
from vecap.config import CaptionChecks, FuseChecks
from vecap.validation.measures import _FuseMeasures, _measure, _quality_of, _repetition, _word_script, caption_quality
from vecap.validation.text import (
    CASED_SCRIPTS,
    MIN_LETTERS,
    UNSPACED_SCRIPTS,
    _compatible,
    _family,
    _fold,
    _guess,
    _hints,
    _language,
    _matches,
    _text,
    _tokens,
    _word_count,
    close,
    is_generic,
    is_language,
    langid_library,
    script_of,
    script_of_language,
)
from vecap.validation.tidy import _INLINE_ALTERNATIVES, _LABEL_ECHO, _SPECIAL_TOKENS, _Tidy, _tidy, ftfy_library

# --- reason vocabulary ------------------------------------------------------------------
# Reasons decided outside the validators (engine errors, missing sources).
OTHER_REASONS = (vocab.MODEL_ERROR, vocab.NO_ALT_TEXT, vocab.NO_VLM_CAPTION)  # reasons no check gives
REASON_DOCS = {
    "empty": "nothing, or only whitespace, special tokens or a preamble",
    "truncated": "stopped at the token limit (finish_reason == 'length')",
    "refusal": "\"I'm sorry, I can't …\", \"It is hard to tell …\", 'the image is too blurry to describe', "
    "in several languages",
    "garbage": "control characters, mojibake, symbol soup, words that are not words, many scripts",
    "echo": "repeats the prompt's instructions or its source labels (Web text:, <visual_description>)",
    "commentary": "talk about the task that is not a trailing note (those are tidied off)",
    "boilerplate": "'The image shows.' with nothing after the preamble",
    "repetition": "a loop: the same word or phrase again and again, or mostly repeated n-grams",
    "too_long": "more words than the recipe allows",
    "too_short": "fewer words than the recipe asks (a one-word caption)",
    "alternatives": "several captions: lists of paraphrases, labelled lines ('Short: … / Long: …'), "
    "'Option 1 … Option 2', 'Alternatively,'",
    "wrong_language": "VLM: not in the language asked for (caption.validation.language, default the prompt's); "
    "fusion: in a language neither source is in",
    "injection": "obeyed an instruction in the alt-text instead of using the sources",
    "lost_entities": "too few of the alt-text's names and numbers kept (weighted recall)",
    "invented": "names, numbers, dates or URLs found in neither source",
    "alt_echo": "the alt-text given back without the visual description's details",
    "ungrounded": "shares no content word with either source",
    "model_error": "the engine failed on the row",
    "no_alt_text": "no alt-text to fuse (settled without the LLM)",
    "no_vlm_caption": "no VLM caption to fuse (settled without the LLM)",
}


@dataclass(frozen=True)
class Verdict:
    """One output judged: the tidied text, why it is rejected (None: accepted), a short
    human-readable detail for the reason, and the row's ``q_*`` quality columns."""

    text: str
    reason: str | None
    detail: str | None = None
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None


# --- shared checks ----------------------------------------------------------------------
_REFUSAL = re.compile(
    r"^\W*(?:i['’]?m sorry|i am sorry|sorry\b|i apologi[sz]e|my apologies|unfortunately\b|as an ai\b"
    r"|as a language model|i['’]?m afraid)"
    r"|\b(?:i|we)\s+(?:cannot|can['’]?t|can not|won['’]?t|will not|am unable to|['’]m unable to|am not able to"
    r"|['’]m not able to|"
    r"do not|don['’]?t|couldn['’]?t|could not|shouldn['’]?t|must decline to|have to decline to)\s+(?:\w+\s+){0,2}?"
    r"(?:help|assist|provide|describe|identify|comply|fulfil|fulfill|see|view|access|process|generate|create|write"
    r"|determine|"
    r"make out|recogni[sz]e|tell|caption|complete|merge|fuse|do that|answer|analy[sz]e|open|display|perform|engage)\b"
    r"|\b(?:i['’]?m|i am)\s+(?:not able|unable|not allowed|not permitted)\s+to\b|\b(?:i['’]?m"
    r"|i am)\s+not\s+comfortable\b"
    r"|^\W*(?:unable to|cannot|can['’]t|can not)\s+(?:\w+\s+){0,2}?(?:help|assist|provide|describe|identify|comply"
    r"|generate|create|write|caption|process|complete)\b"
    r"|\b(?:i|we)\s+(?:must|have to|need to)\s+decline\b|\bagainst (?:my|our) (?:guidelines|policy|policies"
    r"|principles)\b"
    r"|\b(?:i|we)\s+(?:do not|don['’]t)\s+have\s+(?:the\s+)?(?:ability|access|capability)\b"
    r"|\bthere (?:is|was) no image\b|\bno image (?:was |is |has been )?(?:provided|attached|available|uploaded"
    r"|shared)\b"
    r"|\bimage (?:is |was )?(?:not|isn['’]t|wasn['’]t) (?:provided|available|visible|loaded|attached)\b"
    r"|\b(?:cannot|can['’]t|could not|couldn['’]t) be (?:described|determined|identified|seen)\b"
    r"|\b(?:difficult|hard|impossible|not possible)\s+(?:for me\s+)?to\s+(?:tell|determine|say|identify|make out"
    r"|describe|know)\b"
    r"|\blo siento\b|\bno puedo\b|\bdésolée?\b|\bje ne (?:peux|suis pas en mesure)\b|\bes tut mir leid\b"
    r"|\bich kann (?:nicht|keine)\b"
    r"|\bmi dispiace\b|\bnon posso\b|\bdesculp[ea]\b|\bnão posso\b"
    r"|申し訳|できません|抱歉|对不起|無法|无法|不能提供|죄송|할 수 없"
    r"|извините|не могу|к сожалению|عذرا|عذراً|لا أستطيع|लेकिन मैं|मुझे खेद|माफ़|माफ",
    re.I,
)
# Answers that say the image cannot be described instead of describing it.
_UNDESCRIBABLE = re.compile(
    r"\btoo\s+(?:blurry|blurred|dark|bright|small|grainy|pixelated|noisy|low[- ]resolution|out of focus|faint"
    r"|unclear)\b"
    r"[^.!?\n]{0,30}?\bto\s+(?:make out|see|tell|identify|describe|discern|determine|recogni[sz]e|read)\b"
    r"|\bno\s+(?:discernible|visible|identifiable|recogni[sz]able|clear|meaningful|describable)\s+"
    r"(?:content|objects?|details?|subjects?|features?|elements?|information)\b"
    r"|\b(?:not|nothing)\s+(?:enough\s+)?(?:information|detail|content)s?\b[^.!?\n]{0,40}?\b(?:to|for)\s+"
    r"(?:me\s+to\s+)?(?:describe|provide|identify|caption|tell)\b"
    r"|\b(?:appears|seems)\s+to\s+be\s+(?:blank|empty|corrupted|broken|missing|completely (?:black|white))\b"
    r"|\b(?:did|does|could)\s+not\s+load\b",
    re.I,
)
_MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf\u0100-\u017f]|[ÂÐÑØÙ][\u0080-\u00bf]|â€|\ufffd|ï¿½")
# GPT-2 byte-level BPE symbols leaking into text (Ġ marks a space, Ċ a newline); never doubled in Maltese
_BPE_LEAK = re.compile(r"[ĠĊ]{2,}")


def _garbage(text: str) -> str | None:
    """Why the text is not language: control characters, mojibake, symbols, odd tokens, many scripts."""
    if not text:
        return None
    body = text.replace(" ", "")
    if text.isascii():  # every printable ASCII character is a letter, digit, punctuation, space or symbol
        printable = len(text) if text.isprintable() else sum(map(str.isprintable, text))
    else:
        printable = sum(1 for ch in text if ch.isprintable() and unicodedata.category(ch)[0] in "LNPZSM")
    if printable < 0.95 * len(text):
        return "control characters"
    if _MOJIBAKE.search(text):
        return "mojibake"
    if _BPE_LEAK.search(text):
        return "byte-level BPE symbols"
    if body.isascii():
        letters = sum(map(str.isalpha, body))
    else:
        letters = sum(1 for ch in body if unicodedata.category(ch)[0] in "LM")
    if letters < 0.5 * len(body):
        return f"letters are {letters}/{len(body)} of the characters"
    toks = _tokens(text)
    fams: Counter[str] = Counter()
    odd = 0
    words = 0
    for t in toks:
        if t.script is None:
            continue
        words += 1
        if t.text.isascii():  # an ASCII word with a letter (t.script is set) is Latin
            scripts: set[str | None] = {"latn"}
        else:
            scripts = {_family(script_of(c)) for c in t.text if unicodedata.category(c)[0] == "L"} - {None}
        if len(scripts) > 1:
            odd += 1  # one word in two alphabets (homoglyphs, decoding debris)
        elif t.script in CASED_SCRIPTS:
            letters_only = re.sub(r"[^\w]", "", t.text)
            switches = sum(
                1 for a, b in zip(letters_only, letters_only[1:], strict=False) if a.islower() and b.isupper()
            )
            if len(letters_only) > 25 or switches >= 2 or re.search(r"[^\W\d_]\d+[^\W\d_]+\d", letters_only):
                odd += 1
            elif len(letters_only) >= 6 and not re.search(
                r"[aeiouyäöüàâéèêëîïôûùáíóúãõœæåøıаеёиоуыэюяαεηιουω]", letters_only.lower()
            ):
                odd += 1  # no vowel at all in a long Latin/Cyrillic/Greek word
        for sc in scripts:
            if sc is not None:
                fams[sc] += 1
    if words and odd >= max(2, 0.25 * words):
        return f"{odd} of {words} words are not words"
    if sum(1 for n in fams.values() if n >= 1) >= 4:
        return f"{len(fams)} scripts mixed"
    return None


def _loop(text: str, checks: CaptionChecks) -> str | None:
    share, copies, unit = _repetition(text)
    if copies >= checks.max_repeats:
        return f"'{unit[:40]}' x{copies}"
    if share >= checks.max_repetition and _count_dup_grams(text) >= 3:
        return f"{share:.0%} of n-grams repeated"
    return None


def _count_dup_grams(text: str) -> int:
    units: list[str] = []
    for t in _tokens(text):
        units.extend(t.text if t.script in UNSPACED_SCRIPTS else [t.low])
    grams = [tuple(units[i : i + 2]) for i in range(len(units) - 1)]
    return len(grams) - len(set(grams))


def _echoes(output: str, instructions: str, n: int = 6) -> str | None:
    """A run of ``n`` words of the instructions, or one of its sentences (4 words or more), repeated in the output."""
    norm = lambda s: " ".join(re.findall(r"[^\W_]+", s.lower()))  # noqa: E731
    out = " " + norm(output) + " "
    for sentence in re.split(r"[.!?:;]\s+", instructions):
        sent = norm(sentence)
        if len(sent.split()) >= 4 and f" {sent} " in out:
            return sent
    words = norm(instructions).split()
    if len(words) < n:
        return None
    for i in range(len(words) - n + 1):
        run = " ".join(words[i : i + n])
        if f" {run} " in out:
            return run
    return None


def _boilerplate(tidy: _Tidy, text: str) -> bool:
    """Only a preamble ("The image shows.") or image words without content ("A picture of something.")."""
    if tidy.preamble_only:
        return True
    t = _text(text)
    if t.main is None:
        return False
    if t.content() or t.content_grams() or t.numbers:
        return False
    return any(is_generic(tk.low) for tk in t.tokens)


# --- the checks, one function each -------------------------------------------------------
@dataclass
class _Case:
    """What the checks of one output read: the raw and tidied output, the recipe's thresholds,
    the prompt's fixed wording and, for a fusion, the measures against the sources."""

    raw: str
    tidy: _Tidy
    finish_reason: str | None
    checks: Any
    instructions: str
    measures: _FuseMeasures | None = None
    language: str | None = None  # the language a VLM caption was asked in (None: not judged)

    @property
    def out(self) -> str:
        return self.tidy.text

    @property
    def m(self) -> _FuseMeasures:
        """The fusion's measures (only fuse checks read them)."""
        assert self.measures is not None, "a fuse check run on a caption"
        return self.measures

    @cached_property
    def words(self) -> int:
        return _word_count(self.out)


Check = Callable[[_Case], "str | bool | None"]


def _empty(c: _Case) -> str | bool | None:
    if not c.raw.strip():
        return True
    return not c.out and not c.tidy.preamble_only and "empty after tidying"


def _empty_fused(c: _Case) -> str | bool | None:
    return not c.raw.strip() or (not c.out and "empty after tidying")


def _truncated(c: _Case) -> str | bool | None:
    return c.finish_reason == "length" and "stopped at the token limit"


def _refusal(c: _Case) -> str | None:
    head = c.raw[:300]  # a refusal that tidying cut off (an untidied answer is its own head)
    m = _REFUSAL.search(c.out)
    if m is None and head != c.out:
        m = _REFUSAL.search(head)
    if m is None:
        m = _UNDESCRIBABLE.search(c.out)
    return repr(m.group(0).strip()) if m else None


def _garbage_check(c: _Case) -> str | None:
    return _garbage(c.out)


def _alternatives(c: _Case) -> str | None:
    if c.tidy.items > 1:
        return f"{c.tidy.items} captions"
    m = _INLINE_ALTERNATIVES.search(c.out) or _INLINE_ALTERNATIVES.search(_SPECIAL_TOKENS.sub(" ", c.raw))
    return repr(m.group(0).strip()[:40]) if m else None


def _echo(c: _Case) -> str | None:
    m = _LABEL_ECHO.search(c.out)
    return repr(m.group(0)) if m else _echoes(c.out, c.instructions)


def _commentary(c: _Case) -> str | bool:
    return c.tidy.commentary and "talk about the task"


def _boilerplate_check(c: _Case) -> str | bool:
    return _boilerplate(c.tidy, c.out) and "no content after the preamble"


def _repetition_check(c: _Case) -> str | None:
    return _loop(c.out, c.checks)


def _too_long(c: _Case) -> str | bool:
    return c.words > c.checks.max_words and f"{c.words} words > {c.checks.max_words}"


def _too_short(c: _Case) -> str | bool:
    return c.words < c.checks.min_words and f"{c.words} words < {c.checks.min_words}"


def _caption_language(c: _Case) -> str | None:
    """The caption is in another language than the one it was asked in (its script alone can say
    so: an English prompt answered in Cyrillic; else the identifier, when it is sure)."""
    if not c.language:
        return None
    t = _text(c.out)
    lang = _language(t)
    if lang is None or t.families.get(t.main or "", 0) < MIN_LETTERS:
        return None
    if script_of_language(lang) != script_of_language(c.language):
        return f"answer in {lang}, asked in {c.language}"
    if is_language(lang) and not close(lang, c.language):
        return f"answer in {lang}, asked in {c.language}"
    return None


def _fused_language(c: _Case) -> str | None:
    return _wrong_language(c.m)


def _injection(c: _Case) -> str | None:
    return _obeyed_injection(c.m, c.checks)


def _lost_entities(c: _Case) -> str | bool:
    m = c.m
    return (
        m.recall is not None
        and m.recall < c.checks.min_entity_recall
        and f"recall {m.recall:.2f}; lost: {', '.join(m.lost)[:120]}"
    )


def _invented(c: _Case) -> str | bool:
    m = c.m
    return len(m.novel) > c.checks.max_novel and "not in the sources: " + ", ".join(m.novel)[:120]


def _alt_echo_check(c: _Case) -> str | None:
    return _alt_echo(c.m)


def _ungrounded_check(c: _Case) -> str | None:
    return _ungrounded(c.m)


# The registries: every named check of a stage, in the order they run (the first that fails names
# the row's reason). The recipe's ``skip`` names (vecap.config) and docs/validation.md's table come from here.
CAPTION_CHECKS: dict[str, Check] = {
    "empty": _empty,
    "truncated": _truncated,
    "refusal": _refusal,
    "garbage": _garbage_check,
    "alternatives": _alternatives,
    "echo": _echo,
    "commentary": _commentary,
    "boilerplate": _boilerplate_check,
    "repetition": _repetition_check,
    "too_long": _too_long,
    "wrong_language": _caption_language,
    "too_short": _too_short,
}
FUSE_CHECKS: dict[str, Check] = {
    "empty": _empty_fused,
    "truncated": _truncated,
    "refusal": _refusal,
    "garbage": _garbage_check,
    "alternatives": _alternatives,
    "echo": _echo,
    "commentary": _commentary,
    "repetition": _repetition_check,
    "too_long": _too_long,
    "injection": _injection,
    "wrong_language": _fused_language,
    "too_short": _too_short,
    "lost_entities": _lost_entities,
    "invented": _invented,
    "alt_echo": _alt_echo_check,
    "ungrounded": _ungrounded_check,
}
CAPTION_REASONS: tuple[str, ...] = tuple(CAPTION_CHECKS)
FUSE_REASONS: tuple[str, ...] = tuple(FUSE_CHECKS)
REASONS = tuple(dict.fromkeys(CAPTION_REASONS + FUSE_REASONS + OTHER_REASONS))


def fingerprint() -> dict[str, Any]:
    """What the verdicts depend on beyond the recipe's thresholds: the checks and the libraries."""
    return {
        "caption": list(CAPTION_REASONS),
        "fuse": list(FUSE_REASONS),
        "langid": langid_library(),
        "ftfy": ftfy_library(),
    }


def checks_table() -> str:
    """The Markdown table of every check, in order, per stage (docs/validation.md holds it)."""
    lines = ["| check | caption | fuse | rejects |", "| --- | --- | --- | --- |"]
    names: list[str] = []
    for name in FUSE_REASONS:  # the fusion's order, the VLM-only checks where the caption's order puts them
        if name in CAPTION_CHECKS:
            names += [n for n in CAPTION_REASONS[: CAPTION_REASONS.index(name) + 1] if n not in names]
        if name not in names:
            names.append(name)
    names += [n for n in CAPTION_REASONS if n not in names]
    for name in names:
        cap = str(CAPTION_REASONS.index(name) + 1) if name in CAPTION_CHECKS else ""
        fuse = str(FUSE_REASONS.index(name) + 1) if name in FUSE_CHECKS else ""
        lines.append(f"| `{name}` | {cap} | {fuse} | {REASON_DOCS[name]} |")
    return "\n".join(lines) + "\n"


def _run(registry: dict[str, Check], case: _Case) -> tuple[str | None, str | None]:
    skip = set(case.checks.skip)
    for name, check in registry.items():
        if name in skip:
            continue
        detail = check(case)
        if detail:
            return name, (detail if isinstance(detail, str) else None)
    return None, None


# --- entry points -----------------------------------------------------------------------
def expected_caption_language(checks: CaptionChecks, instructions: str = "") -> str | None:
    """The language a VLM caption must be in: the recipe's ``caption.validation.language``, by
    default the prompt's (None when the prompt's language cannot be told, or with ``any``)."""
    if checks.language == "any":
        return None
    if checks.language:
        return checks.language
    lang = _language(_text(instructions)) if instructions else None
    return lang if is_language(lang) else None


def check_caption(
    text: str | None, finish_reason: str | None, checks: CaptionChecks | None = None, instructions: str = ""
) -> Verdict:
    """Judge one VLM caption. ``text`` is the raw model output; the verdict carries it tidied;
    ``instructions`` is the prompt's wording (its language is the one the caption must be in)."""
    checks = checks or CaptionChecks()
    raw = text or ""
    case = _Case(
        raw,
        _tidy(raw, "caption"),
        finish_reason,
        checks,
        instructions,
        language=expected_caption_language(checks, instructions),
    )
    reason, detail = _run(CAPTION_CHECKS, case)
    return Verdict(case.out, reason, detail, caption_quality(case.out))


def check_fused(
    output: str | None,
    finish_reason: str | None,
    alt_text: str,
    vlm_caption: str,
    instructions: str = "",
    checks: FuseChecks | None = None,
) -> Verdict:
    """Judge one fused caption against its sources. ``output`` is the raw LLM output; ``alt_text``
    the cleaned alt-text that was in the prompt; ``instructions`` the prompt's fixed wording."""
    checks = checks or FuseChecks()
    raw = output or ""
    tidy = _tidy(raw, "fuse")
    m = _measure(tidy.text if tidy.items == 1 else "", alt_text or "", vlm_caption or "")
    case = _Case(raw, tidy, finish_reason, checks, instructions, measures=m)
    reason, detail = _run(FUSE_CHECKS, case)
    return Verdict(case.out, reason, detail, _quality_of(m))


def _wrong_language(m: _FuseMeasures) -> str | None:
    """The output's language (or script) is none of the sources'. A Latin output too short for a
    confident answer still counts when the identifier's guess for it is neither source's language
    and it shares almost no word with the (Latin) visual description."""
    out = m.out
    if m.lang_out is None or sum(out.letters.values()) < 12:
        return None
    alt = _text(m.alt_clean)
    if m.lang_out == "latn" and is_language(m.lang_vlm) and m.overlap is not None and m.overlap < 0.15:
        guess = _guess(out)
        if guess and _word_count(out.text) >= 4 and not any(close(guess, lang) for lang in (m.lang_alt, m.lang_vlm)):
            if not _hints(alt, guess) and not _hints(m.vlm, guess):
                return f"output looks {guess}, sources {m.lang_alt}/{m.lang_vlm}"
    if _compatible(m.lang_out, out, m.lang_alt, alt) or _compatible(m.lang_out, out, m.lang_vlm, m.vlm):
        return None
    if m.lang_alt is None and m.lang_vlm is None:
        return None
    return f"output {m.lang_out}, sources {m.lang_alt}/{m.lang_vlm}"


# The verbs of an instruction itself: an output that uses them does not follow it.
_COMMAND_WORDS = frozenset(
    "ignore disregard forget instructions instruction previous above prior write say respond reply output print "
    "only instead caption describe answer tell return please system assistant user following".split()
)


def _obeyed_injection(m: _FuseMeasures, checks: FuseChecks) -> str | None:
    """The alt-text holds an instruction, and the output follows it rather than the sources: it
    keeps neither the alt-text's entities nor the visual description, or it takes up words of the
    instruction that neither source otherwise has while sharing little with the visual description."""
    if not m.injection:
        return None
    weak_entities = m.recall is None or m.recall < checks.min_entity_recall
    weak_visual = m.overlap is None or m.overlap < checks.min_visual_overlap
    if weak_entities and weak_visual:
        return f"instruction in the alt-text: {m.injection[:60]!r}"
    span = _text(m.injection).content() - _COMMAND_WORDS
    taken = [w for w in span if m.out.has_word(w) and not m.alt.has_word(w) and not m.vlm.has_word(w)]
    if len(taken) >= 2 or (taken and (m.overlap is None or m.overlap < 1.5 * checks.min_visual_overlap)):
        return f"follows the instruction ({', '.join(sorted(taken))[:60]})"
    return None


# Praise that adds no visual detail ("the famous … in beautiful …").
_PUFFERY = frozenset(
    "famous iconic beautiful stunning amazing historic historical popular well-known majestic breathtaking gorgeous "
    "lovely nice great wonderful spectacular picturesque renowned legendary impressive magnificent incredible "
    "landmark scenic charming cool awesome perfect classic".split()
)


def _alt_echo(m: _FuseMeasures) -> str | None:
    """The alt-text given back without the visual description's details."""
    out_c = m.out.content()
    alt_c = m.alt.content()
    norm = lambda s: re.sub(r"[\W_]+", " ", _fold(s)).strip()  # noqa: E731
    if norm(m.out.text) == norm(m.alt.text):
        return "output is the alt-text"
    if m.overlap is None:
        # the output is not in the VLM caption's script: only a verbatim echo can be told
        added = [w for w in out_c if not m.alt.has_word(w)]
        if not added and not (m.out.content_grams() - m.alt.content_grams()):
            return "nothing added to the alt-text"
        return None
    visual_only = [w for w in m.vlm.content() if not m.alt.has_word(w)]
    added_visual = [w for w in visual_only if _matches(w, _word_script(w), m.out)]
    new_words = [w for w in out_c if not m.alt.has_word(w) and w not in _PUFFERY]
    if visual_only and not added_visual and len(new_words) <= 1 and (out_c or not alt_c):
        return "no visual detail added"
    return None


def _ungrounded(m: _FuseMeasures) -> str | None:
    """Shares no content word with either source (measurable only when the scripts agree)."""
    if m.overlap is None or m.overlap > 0 or (m.recall or 0) > 0:
        return None
    out_c = m.out.content()
    if len(out_c) < 3:
        return None
    if any(m.alt.has_word(w) or m.vlm.has_word(w) for w in out_c):
        return None
    return "no word of either source"
