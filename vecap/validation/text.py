"""Text as the checks read it: letters and their scripts, tokens, folding, function words, and language.

Scripts come from the Unicode character names (``script_of``), tokens from a single pass over the
text (``tokens``), and a text is analysed once (``analyse``) for every check that reads it. The
language of a text comes from ``py3langid`` (a maintained offline classifier, its model inside the
wheel), answered only where its scripts leave the language open and its confidence is high enough;
otherwise the script code (``latn``, ``cyrl`` …) stands for it, and nothing is judged by it.
"""

from __future__ import annotations

import copy
import math
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from importlib import metadata
from typing import Any, NamedTuple, overload

# --- characters and scripts -------------------------------------------------------------
_SCRIPT_NAMES = {
    "LATIN": "latn",
    "CYRILLIC": "cyrl",
    "GREEK": "grek",
    "ARMENIAN": "armn",
    "GEORGIAN": "geor",
    "ARABIC": "arab",
    "HEBREW": "hebr",
    "SYRIAC": "syrc",
    "THAANA": "thaa",
    "DEVANAGARI": "deva",
    "BENGALI": "beng",
    "GURMUKHI": "guru",
    "GUJARATI": "gujr",
    "ORIYA": "orya",
    "TAMIL": "taml",
    "TELUGU": "telu",
    "KANNADA": "knda",
    "MALAYALAM": "mlym",
    "SINHALA": "sinh",
    "THAI": "thai",
    "LAO": "laoo",
    "KHMER": "khmr",
    "MYANMAR": "mymr",
    "TIBETAN": "tibt",
    "ETHIOPIC": "ethi",
    "HANGUL": "hang",
    "HIRAGANA": "kana",
    "KATAKANA": "kana",
    "CJK": "hani",
    "IDEOGRAPHIC": "hani",
    "BOPOMOFO": "hani",
    "MONGOLIAN": "mong",
}
CASED_SCRIPTS = frozenset({"latn", "cyrl", "grek", "armn"})  # capital letters mark names
UNSPACED_SCRIPTS = frozenset({"hani", "kana", "thai", "laoo", "khmr", "mymr", "tibt"})  # no spaces between words
# Scripts that write one language each; others ("latn", "cyrl", "arab", "deva", …) report the script.
_SCRIPT_LANGUAGE = {
    "hang": "ko",
    "grek": "el",
    "hebr": "he",
    "thai": "th",
    "geor": "ka",
    "armn": "hy",
    "beng": "bn",
    "gujr": "gu",
    "guru": "pa",
    "taml": "ta",
    "telu": "te",
    "knda": "kn",
    "mlym": "ml",
    "sinh": "si",
    "khmr": "km",
    "mymr": "my",
    "laoo": "lo",
}


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


@overload
def _family(script: str) -> str: ...
@overload
def _family(script: None) -> None: ...
@overload
def _family(script: str | None) -> str | None: ...
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
class _Tok(NamedTuple):  # a tuple, not a frozen dataclass: built for every word of every text
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


# An ASCII word: the rules of _tokens' loop below for ASCII text (letters and digits, an apostrophe
# between word characters, a '.' or ',' between digits), as one regular expression.
_ASCII_WORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|'(?=[A-Za-z0-9])|(?<=[0-9])[.,](?=[0-9]))*")


def _ascii_tokens(text: str) -> tuple[_Tok, ...]:
    """_tokens of an ASCII text (most captions and alt-texts), without the per-character loop."""
    toks: list[_Tok] = []
    last_end = 0
    for m in _ASCII_WORD.finditer(text):
        word = m.group(0)
        gap = text[last_end : m.start()]
        start = not toks or (gap != " " and bool(_SENTENCE_GAP.search(gap)))
        number = None
        if not word.isalpha():
            num = _NUMERIC.search(word)
            number = _canon_number(num.group(0)) if num else None
        script = "latn" if any(map(str.isalpha, word)) else None
        toks.append(_Tok(word, word.lower(), script, start, number, gap))
        last_end = m.end()
    return tuple(toks)


@lru_cache(maxsize=2048)
def _tokens(text: str) -> tuple[_Tok, ...]:
    """Words (letters, marks, digits, inner apostrophes) with their script and sentence position.

    A run of an unspaced script (Chinese, Japanese, Thai …) is one token: its matching uses
    character bigrams, never word identity."""
    return _ascii_tokens(text) if text.isascii() else _any_tokens(text)


def _any_tokens(text: str) -> tuple[_Tok, ...]:
    """_tokens of a text in any script, a character at a time."""
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
        script = max(scripts, key=scripts.__getitem__) if scripts else None
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
# Function words by language: content-word measures skip them (language identification is py3langid's).
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
    **dict(
        zip(
            "zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen twenty".split(),
            ["0"] + [str(i) for i in range(2, 21)],
            strict=True,
        )
    ),
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
    "dozen": "12",
    "pair": "2",
    "couple": "2",
    "deux": "2",
    "trois": "3",
    "quatre": "4",
    "cinq": "5",
    "zwei": "2",
    "drei": "3",
    "vier": "4",
    "dos": "2",
    "tres": "3",
    "cuatro": "4",
    "cinco": "5",
    "due": "2",
    "tre": "3",
    "quattro": "4",
    "dois": "2",
    "duas": "2",
    "três": "3",
    "twee": "2",
    "drie": "3",
    "first": "1",
    "second": "2",
    "third": "3",
    "fourth": "4",
    "fifth": "5",
}
# Number words that state a count ("three dogs"): an invented count is an invented fact. "two",
# "pair", "hundreds" and ordinals are left out: they paraphrase too often ("a man and a woman").
_CARDINALS = {
    w: v
    for w, v in _NUMBER_WORDS.items()
    if int(v) >= 3 and w not in ("dozen", "hundred", "thousand", "third", "fourth", "fifth")
}
_CJK_NUMERALS = dict(
    zip(
        "〇一二三四五六七八九十百千",
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "100", "1000"],
        strict=True,
    )
)
# Connectors allowed inside a multi-word name ("Statue of Liberty", "Notre-Dame de Paris").
_NAME_CONNECTORS = frozenset("of de la le du des del della di da van von der den dos das y & du'".split())


@lru_cache(maxsize=1)
def _stemmer() -> Any:
    import snowballstemmer  # type: ignore[import-untyped]

    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=16384)
def _stem(word: str) -> str:
    """The Snowball (Porter 2) English stem of a Latin word, for loose matching (Paris/Parisian is left
    to the prefix rule of :meth:`_Text.has_word`); words of other scripts are their own stem."""
    if not word.isascii() or not word.isalpha() and "'" not in word and "’" not in word:
        return word
    return _stemmer().stemWord(word.replace("’", "'"))


def is_generic(word: str) -> bool:
    """A word that says nothing about what is in the image ("image", "photos", "various")."""
    return word in GENERIC or _stem(word) in _GENERIC_STEMS


_GENERIC_STEMS = frozenset(_stem(w) for w in GENERIC)


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
        if self.text.isascii():  # the common case: every ASCII letter is Latin
            n_letters = sum(map(str.isalpha, self.text))
            if n_letters:
                self.letters["latn"] = n_letters
        else:
            for ch in self.text:
                sc = script_of(ch)
                if sc and unicodedata.category(ch)[0] == "L":
                    self.letters[sc] += 1
        fams: Counter[str] = Counter()
        for sc, n in self.letters.items():
            fams[_family(sc)] += n
        self.families = fams
        self.main = max(fams, key=fams.__getitem__) if fams else None
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
        family = _family(script)
        return family is not None and self.families.get(family, 0) > 0

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
            and not is_generic(t.low)
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
# Scripts that one language writes name it; the others (Latin, Cyrillic, Arabic, Devanagari) are
# told apart by py3langid, among the languages each script writes.
_LANGS_OF_SCRIPT = {
    "latn": tuple(
        "af az bs ca cs cy da de en eo es et eu fi fr ga gl hr hu id is it lt lv ms mt nl no pl pt ro sk sl sq sv "
        "sw tl tr uz vi".split()
    ),
    "cyrl": tuple("be bg kk ky mk mn ru sr uk".split()),
    "arab": tuple("ar fa ps ur".split()),
    "deva": tuple("hi mr ne".split()),
}
_SCRIPT_OF_LANG = {lang: sc for sc, langs in _LANGS_OF_SCRIPT.items() for lang in langs}
_SCRIPT_OF_LANG.update({lang: sc for sc, lang in _SCRIPT_LANGUAGE.items()})
_SCRIPT_OF_LANG.update({"ja": "cjk", "zh": "cjk"})
# Languages a short text cannot be told apart in (a caption in one is no error for the other).
_CLOSE = [frozenset({"id", "ms"}), frozenset({"hr", "bs", "sr"}), frozenset({"no", "da"}), frozenset({"pt", "gl"})]
# The classifier's answer counts from this probability on (normalised over the script's languages)
# and from this many letters: below, the script code stands for the language and nothing is judged by it.
MIN_CONFIDENCE = 0.5
MIN_LETTERS = 10


@lru_cache(maxsize=1)
def _identifiers() -> dict[str, Any]:
    """py3langid's identifier, built once per process (its model ships in the wheel; ~140 MB resident
    with numpy), one view per script restricted to the languages that script writes (they share the model)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    full = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    known = set(full.labels)
    views = {}
    for script, langs in _LANGS_OF_SCRIPT.items():
        view = copy.copy(full)
        view.set_languages([lang for lang in langs if lang in known])
        views[script] = view
    return views


def langid_library() -> str:
    """The language identifier and its version, for the checks' fingerprint."""
    try:
        return f"py3langid {metadata.version('py3langid')}"
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency of vecap
        return "py3langid (unknown version)"


@lru_cache(maxsize=8192)
def identify(text: str, script: str = "latn") -> tuple[str, float] | None:
    """The likeliest language of ``text`` among those ``script`` writes, with its probability
    (normalised over them; py3langid); None for a script the identifier is not asked about."""
    view = _identifiers().get(script)
    if view is None:
        return None
    lang, p = view.classify(text)
    return lang, float(p)


@lru_cache(maxsize=4096)
def _ranked(text: str, script: str) -> tuple[tuple[str, float], ...]:
    view = _identifiers().get(script)
    return tuple(view.rank(text)[:3]) if view is not None else ()


def close(a: str | None, b: str | None) -> bool:
    """The same language, or two a short text cannot tell apart (Indonesian and Malay …)."""
    return a == b or any(a in group and b in group for group in _CLOSE)


def is_language(code: str | None) -> bool:
    """A language code, not a script code standing for an unknown language."""
    return code in _SCRIPT_OF_LANG


def script_of_language(lang: str | None) -> str | None:
    """The script family a language is written in (``latn``, ``cyrl``, ``cjk`` …); a script code gives itself."""
    return _SCRIPT_OF_LANG.get(lang, lang) if lang else None


def language_of(text: str | None) -> str | None:
    """An ISO 639-1 code when the text says so clearly ("en", "fr", "ru", "ar", "hi", "ja", "zh", "ko" …),
    else the script code ("latn", "cyrl", "arab", "deva" …); None for text without letters."""
    return _language(_text(text or ""))


def _main_script(t: _Text) -> str | None:
    if t.main is None:
        return None
    return max((sc for sc in t.letters if _family(sc) == t.main), key=lambda s: t.letters[s])


def _language(t: _Text) -> str | None:
    if t.main is None:
        return None
    if t.main == "cjk":
        kana = t.letters.get("kana", 0)
        return "ja" if kana and kana >= 0.1 * t.families["cjk"] else "zh"
    main_script = _main_script(t)
    if main_script is None:
        return None
    if main_script not in _LANGS_OF_SCRIPT:
        return _SCRIPT_LANGUAGE.get(main_script, main_script)
    if t.families[t.main] < MIN_LETTERS:
        return main_script
    best = identify(t.text, main_script)
    if best and best[1] >= MIN_CONFIDENCE:
        return best[0]
    return main_script


def _guess(t: _Text, floor: float = 0.3) -> str | None:
    """The classifier's best guess for a text too short or too mixed for :func:`language_of`, or None."""
    main_script = _main_script(t)
    best = identify(t.text, main_script) if main_script in _LANGS_OF_SCRIPT else None
    return best[0] if best and best[1] >= floor else None


def _foreign_source(src: _Text, out_lang: str | None) -> bool:
    """The source is (likely) in another language than the output: its capitalised common words
    ("Perro jugando …") and names ("Parque Güell") may be translated."""
    if not is_language(out_lang) or script_of_language(out_lang) != "latn" or src.main != "latn":
        return False
    guess = _guess(src)
    return guess is not None and not close(guess, out_lang)


def _hints(t: _Text, lang: str) -> bool:
    """Weak evidence that a text of unknown language is in ``lang``: among the classifier's likelier answers."""
    main_script = _main_script(t)
    if main_script not in _LANGS_OF_SCRIPT:
        return False
    return any(close(cand, lang) and p >= 0.1 for cand, p in _ranked(t.text, main_script))


def _compatible(out_lang: str | None, out: _Text, src_lang: str | None, src: _Text) -> bool:
    """Whether an output in ``out_lang`` may come from a source in ``src_lang``."""
    if out_lang is None or src_lang is None:
        return src_lang is None and out_lang is None
    if script_of_language(out_lang) != script_of_language(src_lang):
        return False
    if close(out_lang, src_lang) or script_of_language(out_lang) == "cjk":
        return True
    if not is_language(out_lang):
        return True  # we cannot tell the output's language: never judge it
    if not is_language(src_lang):
        return _hints(src, out_lang)  # "Tour Eiffel à Paris" licenses French, "Golden Gate Bridge" does not
    return False
