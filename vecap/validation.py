"""Validation of model outputs: named checks for the caption (VLM) and fuse (LLM) stages.

At 300M samples nobody reads the captions: these checks are the only reader. Each stage's
output is first *tidied* (wrappers models put around an answer: chat tokens, "Here is the
caption:", "The image shows", quotes, Markdown, trailing notes), then judged by a fixed
sequence of named checks; the first that fails gives the row's ``reason``. Every check is
a general rule about text (scripts, capitalised names, numbers, n-grams), never a list of
known outputs.

Languages: nothing here may reject a correct caption because it is written in a language the
rules do not understand. Rules that depend on a language (capitalised names, stop words,
plural stems) run only for scripts and languages they handle; other text is measured with
character bigrams or not judged at all (``None`` in the quality columns).

Commentary policy: a note the model appends after the caption ("… (Note: I merged both
sources.)", "I hope this helps!") is tidied off; commentary that opens the output, sits in
the middle of it, or outweighs the caption is rejected as ``commentary``.

Entry points: :func:`check_caption`, :func:`check_fused` (→ :class:`Verdict`), the tidiers
:func:`tidy_caption` / :func:`tidy_fused`, and :func:`caption_quality` / :func:`fuse_quality`
for the per-row ``q_*`` columns (:data:`vecap.schemas.QUALITY_CAPTION`, ``QUALITY_FUSE``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, get_args

from vecap.config import CaptionCheck, CaptionChecks, FuseCheck, FuseChecks

# --- reason vocabulary ------------------------------------------------------------------
# The names and their order live in the recipe types (vecap.config) so that ``skip`` is checked
# at load time; the first failing check, in this order, names the row's reason.
CAPTION_REASONS: tuple[str, ...] = get_args(CaptionCheck)
FUSE_REASONS: tuple[str, ...] = get_args(FuseCheck)
# Reasons decided outside the validators (engine errors, missing sources).
OTHER_REASONS = ("model_error", "no_alt_text", "no_vlm_caption")
REASONS = tuple(dict.fromkeys(CAPTION_REASONS + FUSE_REASONS + OTHER_REASONS))
REASON_DOCS = {
    "empty": "nothing, or only whitespace, special tokens or a preamble",
    "truncated": "stopped at the token limit (finish_reason == 'length')",
    "refusal": "\"I'm sorry, I can't …\", \"It is hard to tell …\", in several languages",
    "garbage": "control characters, mojibake, symbol soup, words that are not words, many scripts",
    "echo": "repeats the prompt's instructions or its source labels (Web text:, <visual_description>)",
    "commentary": "talk about the task that is not a trailing note (those are tidied off)",
    "boilerplate": "'The image shows.' with nothing after the preamble",
    "repetition": "a loop: the same word or phrase again and again, or mostly repeated n-grams",
    "too_long": "more words than the recipe allows",
    "too_short": "fewer words than the recipe asks (a one-word caption)",
    "alternatives": "several captions: numbered or bulleted lists, 'Option 1 … Option 2', 'Alternatively,'",
    "wrong_language": "in a language neither source is in",
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


# --- characters and scripts -------------------------------------------------------------
_SCRIPT_NAMES = {
    "LATIN": "latn", "CYRILLIC": "cyrl", "GREEK": "grek", "ARMENIAN": "armn", "GEORGIAN": "geor",
    "ARABIC": "arab", "HEBREW": "hebr", "SYRIAC": "syrc", "THAANA": "thaa", "DEVANAGARI": "deva",
    "BENGALI": "beng", "GURMUKHI": "guru", "GUJARATI": "gujr", "ORIYA": "orya", "TAMIL": "taml",
    "TELUGU": "telu", "KANNADA": "knda", "MALAYALAM": "mlym", "SINHALA": "sinh", "THAI": "thai",
    "LAO": "laoo", "KHMER": "khmr", "MYANMAR": "mymr", "TIBETAN": "tibt", "ETHIOPIC": "ethi",
    "HANGUL": "hang", "HIRAGANA": "kana", "KATAKANA": "kana", "CJK": "hani", "IDEOGRAPHIC": "hani",
    "BOPOMOFO": "hani", "MONGOLIAN": "mong",
}
CASED_SCRIPTS = frozenset({"latn", "cyrl", "grek", "armn"})  # capital letters mark names
UNSPACED_SCRIPTS = frozenset({"hani", "kana", "thai", "laoo", "khmr", "mymr", "tibt"})  # no spaces between words
# Scripts that write one language each; others ("latn", "cyrl", "arab", "deva", …) report the script.
_SCRIPT_LANGUAGE = {"hang": "ko", "grek": "el", "hebr": "he", "thai": "th", "geor": "ka", "armn": "hy"}


@lru_cache(maxsize=8192)
def script_of(ch: str) -> str | None:
    """ISO-15924-like script code of a letter or digit (``latn``, ``hani``, ``kana`` …), None for others."""
    cat = unicodedata.category(ch)
    if cat[0] not in "LMN" or cat == "Nd":
        return None  # digits of every script are numbers, not letters
    name = unicodedata.name(ch, "")
    if not name:
        return None
    words = re.split(r"[ \-]", name)
    first = words[1] if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1 else words[0]
    if first == "KATAKANA" or first == "HIRAGANA":
        return "kana"
    return _SCRIPT_NAMES.get(first, first[:4].lower())


def _family(script: str | None) -> str | None:
    """Scripts written together count as one: Japanese mixes kana and Han."""
    return "cjk" if script in ("hani", "kana") else script


def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LMN"


def _digits_ascii(text: str) -> str:
    """Any script's decimal digits (Devanagari, Arabic-Indic, full-width …) → ASCII."""
    if text.isascii():
        return text
    return "".join(str(unicodedata.digit(ch)) if unicodedata.category(ch) == "Nd" else ch for ch in text)


def _fold(word: str) -> str:
    """Case- and accent-insensitive form, for the cased alphabets only (marks carry meaning elsewhere)."""
    if word.isascii():
        return word.lower()
    low = word.casefold()
    if any(script_of(ch) in CASED_SCRIPTS for ch in low if not ch.isdigit()):
        low = "".join(ch for ch in unicodedata.normalize("NFKD", low) if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", low)


# --- tokens -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tok:
    text: str  # as written
    low: str  # folded
    script: str | None  # dominant script of its letters; None for pure numbers
    start: bool  # first word of a sentence or of an alt-text segment
    number: str | None = None  # canonical number, for numeric tokens
    gap: str = ""  # the text between the previous token and this one


_SENTENCE_GAP = re.compile(r"(?:[.!?:;…。！？|•·\n–—]|\s-\s)[\s\"'“‘«(\[「『*_#>-]*$")
_NUMERIC = re.compile(r"\d+(?:[.,]\d+)*")


def _canon_number(s: str) -> str:
    """'1,000' → '1000', '3,5' → '3.5', '007' → '7': one spelling per number."""
    s = _digits_ascii(s)
    s = re.sub(r"(?<=\d)[,.](?=\d{3}(?:\D|$))", "", s)
    s = s.replace(",", ".")
    head, dot, tail = s.partition(".")
    return (head.lstrip("0") or "0") + (dot + tail if tail else "")


@lru_cache(maxsize=2048)
def _tokens(text: str) -> tuple[_Tok, ...]:
    """Words (letters, marks, digits, inner apostrophes) with their script and sentence position.

    A run of an unspaced script (Chinese, Japanese, Thai …) is one token: its matching uses
    character bigrams, never word identity."""
    toks: list[_Tok] = []
    n = len(text)
    i = 0
    last_end = 0
    while i < n:
        ch = text[i]
        if not _is_word_char(ch):
            i += 1
            continue
        j = i
        scripts: Counter[str] = Counter()
        unspaced = (script_of(ch) in UNSPACED_SCRIPTS) if not ch.isdigit() else False
        while j < n:
            c = text[j]
            if _is_word_char(c) or c in "ー・":
                sc = script_of(c)
                if (sc in UNSPACED_SCRIPTS) != unspaced and sc is not None and not c.isdigit():
                    break  # a change between spaced and unspaced scripts ends the token
                if sc:
                    scripts[sc] += 1
                j += 1
            elif c in "'’" and j + 1 < n and _is_word_char(text[j + 1]) and j > i:
                j += 1
            elif c in ".," and j + 1 < n and text[j + 1].isdigit() and text[j - 1].isdigit() and j > i:
                j += 1  # 5,364 and 1.8 are one number
            else:
                break
        word = text[i:j]
        gap = text[last_end:i]
        start = not toks or bool(_SENTENCE_GAP.search(gap))
        script = scripts.most_common(1)[0][0] if scripts else None
        ascii_word = _digits_ascii(word)
        number = None
        m = _NUMERIC.search(ascii_word)
        if m and not unspaced:
            number = _canon_number(m.group(0))
        toks.append(_Tok(word, _fold(word), script, start, number, gap))
        last_end = j
        i = j
    return tuple(toks)


def _word_count(text: str) -> int:
    """Words, with unspaced scripts counted as one word per two characters (CJK) or three (Thai …)."""
    total = 0.0
    for t in _tokens(text):
        if t.script in UNSPACED_SCRIPTS:
            total += len(t.text) / (2 if t.script in ("hani", "kana") else 3)
        else:
            total += 1
    return math.ceil(total)


# --- stop words, generic words, numbers in words ----------------------------------------
# Function words by language: language detection scores them, content-word measures skip them.
_STOP_BY_LANG: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the a an and of with on in at to is are its it from by for this that these those over under near "
        "his her their while into onto behind beside next front as or but be has have was were there some "
        "two three several many other each which who who's along across against through around above below "
        "between out up down off than then very also".split()
    ),
    "fr": frozenset(
        "le la les un une des du de et avec sur dans au aux en est sont pour par sous devant derrière près qui "
        "ses son sa ce cette ces d l à où deux trois plusieurs entre vers chez lors dont une d'un ou mais très".split()
    ),
    "de": frozenset(
        "der die das den dem des ein eine einer einem einen eines und mit auf im vor bei von zu zum zur ist sind "
        "unter über neben hinter nach aus am für durch zwei drei mehrere einem sich auch sehr oder".split()
    ),
    "es": frozenset(
        "el la los las un una unos unas y con en sobre del al de es son por para junto frente bajo entre "
        "dos tres varios varias su sus muy o pero que hacia desde detrás".split()
    ),
    "it": frozenset(
        "il lo la gli le i un una uno e con su nel nella nelle negli sul sulla del della delle degli di da è "
        "sono per tra fra davanti sotto dietro due tre alcuni alcune molto o ma che al alla".split()
    ),
    "pt": frozenset(
        "o a os as um uma uns umas e com em no na nos nas do da dos das de é são para por sobre ao à "
        "dois duas três vários várias muito ou mas que entre atrás frente".split()
    ),
    "nl": frozenset(
        "de het een en met op in van aan bij is zijn voor onder naast achter twee drie enkele veel "
        "of maar die dat door over uit naar".split()
    ),
    "sv": frozenset("och en ett på med av som är för till den det vid under över bakom framför två tre".split()),
    "pl": frozenset("i w na z ze się do nie że jest od po przy pod nad jak oraz dla przez dwa trzy".split()),
    "cs": frozenset("a v na se je s z do že pod nad u pro před za dva tři".split()),
    "tr": frozenset("ve bir bu ile için da de çok olan gibi üzerinde önünde arasında iki üç".split()),
    "id": frozenset("dan di yang dengan ke dari untuk ini itu pada sebuah seorang dua tiga".split()),
    "vi": frozenset("và của một các những trên trong với là có được cho người ở hai ba".split()),
}
# Letters each language writes beyond a–z; other accented letters make the guess doubtful.
_LANG_LETTERS = {
    "en": "", "fr": "àâæçéèêëîïôœùûüÿ", "de": "äöüß", "es": "áéíñóúü¡¿",
    "it": "àèéìíîòóùú", "pt": "ãõáâàçéêíóôú", "nl": "éëïèáóú", "sv": "åäöé", "pl": "ąćęłńóśźż",
    "cs": "áčďéěíňóřšťúůýž", "tr": "çğıöşüâî", "id": "",
    "vi": "àáâãèéêìíòóôõùúýăđĩũơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ",
}
_STOP_OTHER = frozenset(
    # Cyrillic, Greek, Arabic, Hebrew, Devanagari, Korean particles used as separate words
    "и в на с со к по из у о от за под над при для не это как что а но или "
    "και σε στο στη στην το τα η ο οι με από για ένα μια "
    "في من على إلى الى عن مع و هذا هذه ذلك التي الذي "
    "של עם על את זה זו ב ו ה "
    "का की के में है और से पर को एक यह ये था थी हैं "
    "및 의 에 를 을 이 가 은 는".split()
)
STOP = frozenset().union(*_STOP_BY_LANG.values(), _STOP_OTHER)
# Words that say nothing about what is in the image (boilerplate, stock-site vocabulary).
GENERIC = frozenset(
    "image images picture pictures photo photos photograph photography shot scene view frame illustration "
    "shows show showing shown depicts depicting depicted features featuring displays displaying captures "
    "capturing presents portrays contains illustrates showcases visible seen appears see can we you i "
    "something thing things object objects stuff various item items blurry unclear indistinct nothing "
    "stock wallpaper hd free download vector background royalty close up closeup interesting unknown unidentified "
    "kind sort type unclear ambiguous undefined random".split()
)
_NUMBER_WORDS = {
    **dict(zip("zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen seventeen eighteen nineteen twenty".split(), ["0"] + [str(i) for i in range(2, 21)])),
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
    "ninety": "90", "hundred": "100", "thousand": "1000", "dozen": "12", "pair": "2", "couple": "2",
    "deux": "2", "trois": "3", "quatre": "4", "cinq": "5", "zwei": "2", "drei": "3", "vier": "4",
    "dos": "2", "tres": "3", "cuatro": "4", "cinco": "5", "due": "2", "tre": "3", "quattro": "4",
    "dois": "2", "duas": "2", "três": "3", "twee": "2", "drie": "3",
    "first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5",
}
# Number words that state a count ("three dogs"): an invented count is an invented fact. "two",
# "pair", "hundreds" and ordinals are left out: they paraphrase too often ("a man and a woman").
_CARDINALS = {
    w: v for w, v in _NUMBER_WORDS.items()
    if int(v) >= 3 and w not in ("dozen", "hundred", "thousand", "third", "fourth", "fifth")
}
_CJK_NUMERALS = dict(zip("〇一二三四五六七八九十百千", ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "100", "1000"]))
# Connectors allowed inside a multi-word name ("Statue of Liberty", "Notre-Dame de Paris").
_NAME_CONNECTORS = frozenset("of de la le du des del della di da van von der den dos das y & du'".split())


def _stem(word: str) -> str:
    """Cheap English/Romance plural and possessive stripping (whole-word matching stays exact otherwise)."""
    w = word[:-2] if word.endswith(("'s", "’s")) else word
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "xes", "ches", "shes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _bigrams(s: str) -> set[str]:
    s = re.sub(r"\s+", "", s)
    if len(s) < 2:
        return {s} if s else set()
    return {s[i : i + 2] for i in range(len(s) - 1)}


# --- a text, analysed once --------------------------------------------------------------
class _Text:
    """Tokens, scripts, words, numbers and bigrams of one text, for matching against others."""

    def __init__(self, text: str):
        self.text = text or ""
        self.tokens = _tokens(self.text)
        self.letters: Counter[str] = Counter()
        for ch in self.text:
            sc = script_of(ch)
            if sc and unicodedata.category(ch)[0] == "L":
                self.letters[sc] += 1
        fams: Counter[str] = Counter()
        for sc, n in self.letters.items():
            fams[_family(sc)] += n
        self.families = fams
        self.main = fams.most_common(1)[0][0] if fams else None
        self.words: set[str] = set()
        self.stems: set[str] = set()
        self.grams: set[str] = set()
        self.numbers: set[str] = set()
        for t in self.tokens:
            if t.number is not None:
                self.numbers.add(t.number)
            if t.script in UNSPACED_SCRIPTS:
                self.grams |= _bigrams(t.text)
                for ch in t.text:
                    if ch in _CJK_NUMERALS:
                        self.numbers.add(_CJK_NUMERALS[ch])
                continue
            self.words.add(t.low)
            self.stems.add(_stem(t.low))
            if t.script not in CASED_SCRIPTS and t.script is not None:
                self.grams |= _bigrams(t.low)
            if t.low in _NUMBER_WORDS:
                self.numbers.add(_NUMBER_WORDS[t.low])
        self.lowtext = _fold(self.text)
        self._content: set[str] | None = None

    def has_family(self, script: str | None) -> bool:
        return self.families.get(_family(script), 0) > 0

    def has_word(self, low: str) -> bool:
        """Whole word, plural/possessive stem, or a shared prefix (Paris/Parisian, Москва/Москве)."""
        if low in self.words or _stem(low) in self.stems:
            return True
        if len(low) >= 4:
            pre = low[: max(4, len(low) - 1)]
            for w in self.words:
                if len(w) >= 4 and (w.startswith(pre) or low.startswith(w[: max(4, len(w) - 1)])):
                    return True
        return False

    def gram_share(self, unit: str) -> float:
        grams = _bigrams(unit)
        return sum(1 for g in grams if g in self.grams) / len(grams) if grams else 0.0

    def content(self) -> set[str]:
        """Content words of the spaced scripts (stop words, generic image words, numbers left out)."""
        if self._content is None:
            self._content = self._content_words()
        return set(self._content)

    def _content_words(self) -> set[str]:
        return {
            t.low
            for t in self.tokens
            if t.script is not None
            and t.script not in UNSPACED_SCRIPTS
            and t.number is None
            and t.low not in STOP
            and _stem(t.low) not in GENERIC
            and len(t.low) > 1
        }

    def content_grams(self) -> set[str]:
        """Bigrams of the unspaced scripts, without those touching hiragana (particles and endings)."""
        out = set()
        for t in self.tokens:
            if t.script in UNSPACED_SCRIPTS:
                out |= {g for g in _bigrams(t.text) if not any("\u3040" <= c <= "\u309f" for c in g)}
        return out


@lru_cache(maxsize=2048)
def _text(text: str) -> _Text:
    """The analysis of a text, shared by every check that reads it (texts are immutable)."""
    return _Text(text)


def _matches(word: str, script: str | None, other: _Text) -> bool:
    """Whether ``word`` (folded) of a source is found in ``other``."""
    if script in CASED_SCRIPTS or script is None:
        return other.has_word(word)
    return other.gram_share(word) >= 0.5


# --- language ---------------------------------------------------------------------------
def language_of(text: str | None) -> str | None:
    """A language code when the text says so clearly ("en", "fr", "de", "es", "it", "pt", "nl",
    "ja", "zh", "ko", "el", "he", "th"), else the script code ("latn", "cyrl", "arab", "deva" …);
    None for text without letters. Cheap by design: stop words and scripts, no model."""
    return _language(_text(text or ""))


_APOSTROPHE = re.compile(r"['’]")


def _latin_scores(t: _Text) -> Counter[str]:
    """Stop-word evidence per Latin-script language (a word shared by k languages counts 1/k)."""
    score: Counter[str] = Counter()
    for tok in t.tokens:
        if tok.script != "latn":
            continue
        for p in set(_APOSTROPHE.split(tok.text.casefold())) | set(_APOSTROPHE.split(tok.low)):
            langs = [lang for lang, words in _STOP_BY_LANG.items() if p in words]
            for lang in langs:
                score[lang] += 1 / len(langs)
    return score


def _foreign_source(src: _Text, out_lang: str | None) -> bool:
    """The source shows function words of other languages and none of the output's: its
    capitalised common words ("Perro jugando …") and names ("Parque Güell") may be translated."""
    if out_lang not in _STOP_BY_LANG:
        return False
    scores = _latin_scores(src)
    return bool(scores) and scores.get(out_lang, 0) == 0


def _language(t: _Text) -> str | None:
    if t.main is None:
        return None
    if t.main == "cjk":
        kana = t.letters.get("kana", 0)
        return "ja" if kana and kana >= 0.1 * t.families["cjk"] else "zh"
    main_script = max((sc for sc in t.letters if _family(sc) == t.main), key=lambda s: t.letters[s])
    if main_script != "latn":
        return _SCRIPT_LANGUAGE.get(main_script, main_script)
    score = _latin_scores(t)
    if not score:
        return "latn"
    ranked = score.most_common()
    best, top = ranked[0]
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    if top < 1.5 or top < 1.5 * second:
        return "latn"
    allowed = set("abcdefghijklmnopqrstuvwxyz") | set(_LANG_LETTERS[best])
    odd = sum(
        1 for tok in t.tokens if tok.script == "latn" and any(c.isalpha() and c not in allowed for c in tok.text.lower())
    )
    return "latn" if odd >= 2 else best  # letters the language does not write: a guess too weak to judge by


def _lang_script(lang: str | None) -> str | None:
    if lang in ("ja", "zh"):
        return "cjk"
    inverse = {v: k for k, v in _SCRIPT_LANGUAGE.items()}
    if lang in _STOP_BY_LANG or lang == "latn":
        return "latn"
    return inverse.get(lang, lang)


def _hints(t: _Text, lang: str) -> bool:
    """Weak evidence that a Latin text of unknown language is in ``lang``: its letters or a stop word."""
    extra = _LANG_LETTERS.get(lang, "")
    if extra and any(c in extra for c in t.lowtext):
        return True
    words = _STOP_BY_LANG.get(lang, frozenset())
    return any(tok.low in words or tok.text.casefold() in words for tok in t.tokens)


def _compatible(out_lang: str | None, out: _Text, src_lang: str | None, src: _Text) -> bool:
    """Whether an output in ``out_lang`` may come from a source in ``src_lang``."""
    if out_lang is None or src_lang is None:
        return src_lang is None and out_lang is None
    if _lang_script(out_lang) != _lang_script(src_lang):
        return False
    if out_lang == src_lang or _lang_script(out_lang) == "cjk":
        return True
    if out_lang == "latn":
        return True  # we cannot tell the output's language: never judge it
    if src_lang == "latn":
        return _hints(src, out_lang)  # "Tour Eiffel à Paris" licenses French, "Golden Gate Bridge" does not
    return False


# --- tidying ----------------------------------------------------------------------------
_SPECIAL_TOKENS = re.compile(
    r"<\|[^|<>\n]{1,40}\|>|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|<image>|<unk>|<pad>|<eos>|<bos>|<end_of_turn>|<start_of_turn>\w*",
    re.I,
)
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_ROLE = re.compile(r"^\s*(?:(?:assistant|gpt|model|bot)\s*(?::|\n)|(?:answer|response|output|result)\s*:)\s*", re.I)
_LABEL_LINE = re.compile(
    r"\W*(?:(?:final|fused|merged|combined|consolidated|new|enriched|vec|image|short)\s+)*(?:caption|description|answer|output|result)\W*",
    re.I,
)
_FENCE = re.compile(r"```[\w-]*")
_SOURCE_LABEL = r"(?:web[\s_-]?text|visual[\s_-]description|alt[\s_-]?text|vlm[\s_-]?caption|raw[\s_-]caption|synthetic[\s_-]caption)"
_LABEL_ECHO = re.compile(
    rf"{_SOURCE_LABEL}\s*[:=]|\binstructions?\s*:|<\s*/?\s*(?:web_text|visual_description|alt_text|vlm_caption|raw|synthetic|caption|description)\s*>",
    re.I,
)
_PREAMBLE_NOUN = (
    r"(?:caption|description|version|attempt|output|answer|result|response|sentence|rewrite|summary|text|one|it|this)"
)
_PREAMBLE = re.compile(
    r"^\W*(?:"
    r"(?:sure|certainly|of course|okay|ok|absolutely|great|alright|no problem)\b[^:\n]{0,80}?\b" + _PREAMBLE_NOUN + r"\b[^:\n]{0,40}"
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
    r"in\s+(?:this|the)\s+(?:image|picture|photo(?:graph)?|scene|illustration)\s*,?\s*(?:(?:we|you|i)\s+(?:can\s+)?see|there\s+(?:is|are)|(?:is|are)\s+shown)?"
    r"|(?:the|this)\s+(?:image|picture|photo(?:graph)?|scene|illustration|shot|frame|snapshot)\s+"
    r"(?:(?:appears|seems)\s+to\s+)?(?:shows?|depicts?|features?|displays?|captures?|presents?|portrays?|contains?|illustrates?|showcases?|highlights?|is\s+of)"
    r"|(?:the|this)\s+(?:image|picture|photo(?:graph)?)\s+is(?=\s+(?:an?|the)\s)"
    r"|this\s+is\s+(?:an?\s+)?(?:image|picture|photo(?:graph)?|snapshot)\s+of"
    r"|(?:here\s+)?(?:we|you|i)\s+(?:can\s+)?see"
    r")\s*(?:that\s+)?[:,]?\s*",
    re.I,
)
_MD_LINK = re.compile(r"!?\[([^\]\n]{0,300})\]\([^)\n]{0,500}\)")
_MD_EMPH = [
    re.compile(r"\*\*\*(.+?)\*\*\*"), re.compile(r"\*\*(.+?)\*\*"), re.compile(r"__(.+?)__"),
    re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), re.compile(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])"),
    re.compile(r"~~(.+?)~~"), re.compile(r"`([^`\n]+)`"),
]
_HTML_FORMAT = re.compile(r"</?(?:b|i|u|em|strong|p|span|div|br|small|mark|sup|sub|h[1-6])\b[^>]{0,80}>", re.I)
_LINE_MARK = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|(?:[-*+•●▪◦–]|\d{1,2}[.)]|\(\d{1,2}\)|[a-hA-H][.)])\s+)")
_LIST_ITEM = re.compile(
    r"^\s*(?:[-*+•●▪◦–]\s+|\d{1,2}[.)]\s+|\(\d{1,2}\)\s*|[a-hA-H][.)]\s+|(?:\*\*)?(?:option|version|caption|alternative|variant|choice)\s*#?\s*(?:\d{1,2}|[a-h]|one|two|three)\b)",
    re.I,
)
_INLINE_ALTERNATIVES = re.compile(
    r"(?:^|[\s:;])(?:1[.)]|\(1\)|#1)\s+\S.{2,}?(?:^|\s)(?:2[.)]|\(2\)|#2)\s+\S"
    r"|(?:^|\s)(?:A\)|\([aA]\))\s+\S.{2,}?\s(?:B\)|\([bB]\))\s+\S"
    r"|\b(?:option|version|alternative|variant|caption)\s*#?\s*(?:1|one|a)\b.{3,}?\b(?:option|version|alternative|variant|caption)\s*#?\s*(?:2|two|b)\b"
    r"|(?:^|[.;!?]\s+|\s)(?:alternatively|or alternatively|another option(?: would be| is)?|another version(?: would be| is)?|or perhaps)\s*[,:]",
    re.I | re.S,
)
_QUOTE_PAIRS = {'"': '"', "“": "”", "„": "“", "'": "'", "‘": "’", "«": "»", "「": "」", "『": "』", "‹": "›"}
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？])[\"”’»」』)]*\s+(?=\S)|(?<=[。！？])(?=\S)")
_META = re.compile(
    r"^\W*(?:note|nb|n\.b\.|p\.s\.|ps|disclaimer|explanation|rationale|reasoning|comment|remarks?|translation)\b\s*[:\-–—]"
    r"|\b(?:i|i've|i’ve|i have|i'd|we|we've|we have)\s+(?:also\s+|just\s+|have\s+|simply\s+)?"
    r"(?:merged|combined|kept|included|added|used|removed|omitted|dropped|preserved|retained|ignored|incorporated|integrated|"
    r"focused|chose|made sure|tried|avoided|left out|excluded|fused|rewrote|rephrased|corrected|translated|followed|noted|"
    r"assumed|inferred|did not|didn't|replaced|mentioned|described|limited|kept it|stuck)\b"
    r"|\b(?:this|the above|the|my|your)\s+(?:fused\s+|merged\s+|final\s+|consolidated\s+|combined\s+|resulting\s+|new\s+|updated\s+|vec\s+|image\s+)?"
    r"(?:caption|description|sentence|version|output|response|answer)\s+(?:combines|merges|keeps|includes|retains|preserves|uses|"
    r"integrates|incorporates|adds|omits|is|was|has|contains|captures|highlights|mentions|focuses|reflects|stays|meets|follows|avoids|does|should|would|could)\b"
    r"|\b(?:both|the two|the given|the provided|these|the original|each)\s+(?:sources|texts|captions|descriptions|inputs)\b"
    r"|^\W*(?:this|it|that)\s+(?:version\s+|one\s+|wording\s+)?(?:keeps|combines|merges|retains|preserves|integrates|incorporates|"
    r"mentions|reflects|follows|avoids|stays within|meets|sticks to)\b"
    r"|\b(?:keeps|retains|preserves|combines|merges)\s+(?:the|both|all)\s+(?:\w+\s+)?(?:names?|details?|sources?|information|facts|entities)\b"
    r"|\b(?:the\s+)?" + _SOURCE_LABEL + r"\b"
    r"|\b(?:hope this helps|i hope|let me know|feel free to|happy to help|if you need|if you'd like|would you like|you can adjust|"
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


def _strip_markdown(text: str) -> str:
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
    marked = [ln for ln in content if _LIST_ITEM.match(ln)]
    if len(marked) >= 2 and len(marked) >= len(content) - 1:
        # a list: a caption split into points (caption stage) or several captions (fuse stage)
        items = [_clean_line(ln) for ln in content if _clean_line(ln)]
        if stage != "caption":
            tidy.items = len(marked)
            tidy.text = "\n".join(re.sub(r"\s+", " ", _strip_markdown(ln)).strip() for ln in content)
            return tidy
        text = " ".join(i if re.search(r"[.!?。]$", i) else i + "." for i in items)
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
    r"(?:https?://|www\.)[^\s<>\"')\]]+|\b[\w.+-]+@[\w-]+\.[\w.]+\b|\b[\w-]+\.(?:com|org|net|io|co|uk|de|fr|jp|cn|ru|info|biz|shop|store|ly|me|tv|app)\b(?:/\S*)?"
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
            units = [m.group(0) for m in re.finditer(r"[\u4e00-\u9fff\u3400-\u4dbf々〆]{2,}|[\u30a0-\u30ffー・]{2,}", tk.text)]
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


def _recall(alt: _Text, out: _Text, foreign: bool = False) -> tuple[float | None, list[str]]:
    """Weighted share of the alt-text's checkable entities kept in the output, and the lost ones.

    An entity in a script the output does not use is not checkable (it may have been
    translated or transliterated): it counts neither way."""
    total = kept = 0.0
    lost: list[str] = []
    for e in _alt_entities(alt):
        if e.kind != "number" and not out.has_family(e.script):
            continue
        if foreign and e.weight < 1:
            continue  # a capitalised first word of another language's sentence is no name
        total += e.weight
        if _entity_kept(e, out):
            kept += e.weight
        else:
            lost.append(e.label)
    if total == 0:
        return None, []
    return kept / total, lost


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
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}\b(?:instructions?|prompts?|rules|above|previous|prior|everything|all|system)\b"
    r"|\b(?:you are now|you're now|act as|pretend (?:to be|you are)|from now on|new instructions?|developer mode|jailbreak)\b"
    r"|(?:^|\W)(?:system|assistant|user)\s*:"
    r"|\b(?:instead|rather)\b[^.!?\n]{0,40}?\b(?:write|say|output|print|respond|reply|answer|tell|list|translate|generate|compose|produce|return)\b"
    r"|[,;:]\s*(?:please\s+)?(?:write|say|output|print|compose|generate|translate|tell)\s+(?:a|an|the|me|us|only|something|about)\b"
    r"|\b(?:respond|reply|answer|output|return)\s+(?:only\s+)?(?:with|in)\b"
    r"|\b(?:output|print|say|write|type|return)\s+(?:only\s+)?(?:the\s+)?(?:word|words|phrase|text|sentence|following|string)\b"
    r"|\bdescribe (?:this|it|the image|the photo) as\b|\btell (?:the )?(?:user|reader|them)\b"
    r"|\b(?:start|end|begin|finish)\s+(?:your|the)\s+(?:caption|answer|response|reply|output)\s+with\b"
    r"|\b(?:include|add|insert|append)\s+(?:the\s+|this\s+)?(?:word|phrase|text|link|url|sentence|following|hashtag)\b"
    r"|\b(?:do not|don't|never)\s+(?:caption|describe|mention)\b"
    r"|(?:^|[.!?|:]\s*)(?:please\s+)?(?:write|say|output|print|compose|generate|translate|repeat|tell me|caption (?:this|it) as|describe (?:this|it) as)\b[^.!?\n]{3,}"
    r"|(?:^|[.!?|:]\s*)(?:please\s+)?(?:ignore|disregard|forget)\s+(?:the|this|that|any|all|what|everything|your)\b"
    r"|\b(?:ignorez|oubliez)\b.{0,30}\binstructions\b|\bignoriere\b|\bignora\b.{0,30}\binstrucciones\b|忽略|无视|無視|игнорируй|забудь",
    re.I,
)


def _injection_span(alt: str) -> tuple[str, str]:
    """(the alt-text without its instruction-like sentences, those sentences)."""
    if not _INJECTION.search(alt):
        return alt, ""
    keep, span = [], []
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


# --- shared checks ----------------------------------------------------------------------
_REFUSAL = re.compile(
    r"^\W*(?:i['’]?m sorry|i am sorry|sorry\b|i apologi[sz]e|my apologies|unfortunately\b|as an ai\b|as a language model|i['’]?m afraid)"
    r"|\b(?:i|we)\s+(?:cannot|can['’]?t|can not|won['’]?t|will not|am unable to|['’]m unable to|am not able to|['’]m not able to|"
    r"do not|don['’]?t|couldn['’]?t|could not|shouldn['’]?t|must decline to|have to decline to)\s+(?:\w+\s+){0,2}?"
    r"(?:help|assist|provide|describe|identify|comply|fulfil|fulfill|see|view|access|process|generate|create|write|determine|"
    r"make out|recogni[sz]e|tell|caption|complete|merge|fuse|do that|answer|analy[sz]e|open|display|perform|engage)\b"
    r"|\b(?:i['’]?m|i am)\s+(?:not able|unable|not allowed|not permitted)\s+to\b|\b(?:i['’]?m|i am)\s+not\s+comfortable\b"
    r"|^\W*(?:unable to|cannot|can['’]t|can not)\s+(?:\w+\s+){0,2}?(?:help|assist|provide|describe|identify|comply|generate|create|write|caption|process|complete)\b"
    r"|\b(?:i|we)\s+(?:must|have to|need to)\s+decline\b|\bagainst (?:my|our) (?:guidelines|policy|policies|principles)\b"
    r"|\b(?:i|we)\s+(?:do not|don['’]t)\s+have\s+(?:the\s+)?(?:ability|access|capability)\b"
    r"|\bthere (?:is|was) no image\b|\bno image (?:was |is |has been )?(?:provided|attached|available|uploaded|shared)\b"
    r"|\bimage (?:is |was )?(?:not|isn['’]t|wasn['’]t) (?:provided|available|visible|loaded|attached)\b"
    r"|\b(?:cannot|can['’]t|could not|couldn['’]t) be (?:described|determined|identified|seen)\b"
    r"|\b(?:difficult|hard|impossible|not possible)\s+(?:for me\s+)?to\s+(?:tell|determine|say|identify|make out|describe|know)\b"
    r"|\blo siento\b|\bno puedo\b|\bdésolée?\b|\bje ne (?:peux|suis pas en mesure)\b|\bes tut mir leid\b|\bich kann (?:nicht|keine)\b"
    r"|\bmi dispiace\b|\bnon posso\b|\bdesculp[ea]\b|\bnão posso\b|申し訳|できません|抱歉|对不起|無法|无法|不能提供|죄송|할 수 없"
    r"|извините|не могу|к сожалению|عذرا|عذراً|لا أستطيع|लेकिन मैं|मुझे खेद|माफ़|माफ",
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
    printable = sum(1 for ch in text if ch.isprintable() and unicodedata.category(ch)[0] in "LNPZSM")
    if printable < 0.95 * len(text):
        return "control characters"
    if _MOJIBAKE.search(text):
        return "mojibake"
    if _BPE_LEAK.search(text):
        return "byte-level BPE symbols"
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
        scripts = {_family(script_of(c)) for c in t.text if unicodedata.category(c)[0] == "L"} - {None}
        if len(scripts) > 1:
            odd += 1  # one word in two alphabets (homoglyphs, decoding debris)
        elif t.script in CASED_SCRIPTS:
            letters_only = re.sub(r"[^\w]", "", t.text)
            switches = sum(1 for a, b in zip(letters_only, letters_only[1:]) if a.islower() and b.isupper())
            if len(letters_only) > 25 or switches >= 2 or re.search(r"[^\W\d_]\d+[^\W\d_]+\d", letters_only):
                odd += 1
            elif len(letters_only) >= 6 and not re.search(r"[aeiouyäöüàâéèêëîïôûùáíóúãõœæåøıаеёиоуыэюяαεηιουω]", letters_only.lower()):
                odd += 1  # no vowel at all in a long Latin/Cyrillic/Greek word
        for sc in scripts:
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
    return any(_stem(tk.low) in GENERIC for tk in t.tokens)


def _run(order: tuple[str, ...], skip: list[str], tests: dict[str, Any]) -> tuple[str | None, str | None]:
    for name in order:
        if name in skip or name not in tests:
            continue
        detail = tests[name]()
        if detail:
            return name, (detail if isinstance(detail, str) else None)
    return None, None


# --- entry points -----------------------------------------------------------------------
def check_caption(
    text: str | None, finish_reason: str | None, checks: CaptionChecks | None = None, instructions: str = ""
) -> Verdict:
    """Judge one VLM caption. ``text`` is the raw model output; the verdict carries it tidied."""
    checks = checks or CaptionChecks()
    raw = text or ""
    tidy = _tidy(raw, "caption")
    out = tidy.text
    words = _word_count(out)
    tests = {
        "empty": lambda: not raw.strip() or (not out and not tidy.preamble_only and "empty after tidying"),
        "truncated": lambda: finish_reason == "length" and "stopped at the token limit",
        "refusal": lambda: (m := _REFUSAL.search(out) or _REFUSAL.search(raw)) and repr(m.group(0).strip()),
        "garbage": lambda: _garbage(out),
        "echo": lambda: (m := _LABEL_ECHO.search(out)) and repr(m.group(0)) or _echoes(out, instructions),
        "commentary": lambda: tidy.commentary and "talk about the task",
        "boilerplate": lambda: _boilerplate(tidy, out) and "no content after the preamble",
        "repetition": lambda: _loop(out, checks),
        "too_long": lambda: words > checks.max_words and f"{words} words > {checks.max_words}",
        "too_short": lambda: words < checks.min_words and f"{words} words < {checks.min_words}",
    }
    reason, detail = _run(CAPTION_REASONS, checks.skip, tests)
    return Verdict(out, reason, detail, caption_quality(out))


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
    out = tidy.text
    m = _measure(out if tidy.items == 1 else "", alt_text or "", vlm_caption or "")
    words = _word_count(out)
    tests = {
        "empty": lambda: not raw.strip() or (not out and "empty after tidying"),
        "truncated": lambda: finish_reason == "length" and "stopped at the token limit",
        "refusal": lambda: (r := _REFUSAL.search(out) or _REFUSAL.search(raw[:300])) and repr(r.group(0).strip()),
        "garbage": lambda: _garbage(out),
        "alternatives": lambda: (tidy.items > 1 and f"{tidy.items} captions")
        or ((r := _INLINE_ALTERNATIVES.search(out) or _INLINE_ALTERNATIVES.search(_SPECIAL_TOKENS.sub(" ", raw)))
            and repr(r.group(0).strip()[:40])),
        "echo": lambda: (r := _LABEL_ECHO.search(out)) and repr(r.group(0)) or _echoes(out, instructions),
        "commentary": lambda: tidy.commentary and "talk about the task",
        "repetition": lambda: _loop(out, checks),
        "too_long": lambda: words > checks.max_words and f"{words} words > {checks.max_words}",
        "wrong_language": lambda: _wrong_language(m),
        "injection": lambda: _obeyed_injection(m, checks),
        "too_short": lambda: words < checks.min_words and f"{words} words < {checks.min_words}",
        "lost_entities": lambda: m.recall is not None
        and m.recall < checks.min_entity_recall
        and f"recall {m.recall:.2f}; lost: {', '.join(m.lost)[:120]}",
        "invented": lambda: len(m.novel) > checks.max_novel and "not in the sources: " + ", ".join(m.novel)[:120],
        "alt_echo": lambda: _alt_echo(m),
        "ungrounded": lambda: _ungrounded(m),
    }
    reason, detail = _run(FUSE_REASONS, checks.skip, tests)
    return Verdict(out, reason, detail, _quality_of(m))


def _wrong_language(m: _FuseMeasures) -> str | None:
    """The output's language (or script) is none of the sources'. A Latin output too short for a
    confident guess still counts when its function words belong to another language than the
    sources' and it shares almost no word with the (Latin) visual description."""
    out = m.out
    if m.lang_out is None or sum(out.letters.values()) < 12:
        return None
    alt = _text(m.alt_clean)
    if m.lang_out == "latn" and m.lang_vlm in _STOP_BY_LANG and m.overlap is not None and m.overlap < 0.15:
        scores = _latin_scores(out)
        if scores and _word_count(out.text) >= 4:
            guess = scores.most_common(1)[0][0]
            sources = {m.lang_alt, m.lang_vlm}
            if guess not in sources and not any(scores.get(lang, 0) for lang in sources) and not _hints(alt, guess):
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
