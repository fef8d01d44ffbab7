"""Validation of model outputs: named checks for the caption (VLM) and fuse (LLM) stages.

At 300M samples nobody reads the captions: these checks are the only reader. Each stage's
output is first *tidied* (:mod:`.tidy`), then judged by an ordered registry of named checks
(:mod:`.checks`); the first that fails gives the row's ``reason``. Every check is a general
rule about text (scripts, languages, capitalised names, numbers, n-grams), never a list of
known outputs. The parts:

- :mod:`.text` — scripts, tokens, folding, function words, language (``py3langid``);
- :mod:`.tidy` — the wrappers models put around an answer, taken off;
- :mod:`.measures` — entity recall, novel terms, word counts, repetition: one definition, also
  used by the report, ``vecap inspect`` and the fuse stage; the ``q_*`` quality columns;
- :mod:`.checks` — one function per named check, the registries, :func:`check_caption` and
  :func:`check_fused`.

Languages: nothing here may reject a correct caption because it is written in a language the
rules do not understand. Rules that depend on a language run only where it is known; other text
is measured with character bigrams or not judged at all (``None`` in the quality columns).

Commentary policy: a note the model appends after the caption ("… (Note: I merged both
sources.)", "I hope this helps!") is tidied off; commentary that opens the output, sits in
the middle of it, or outweighs the caption is rejected as ``commentary``.
"""

from __future__ import annotations

from vecap.validation.checks import (
    CAPTION_CHECKS,
    CAPTION_REASONS,
    FUSE_CHECKS,
    FUSE_REASONS,
    OTHER_REASONS,
    REASON_DOCS,
    REASONS,
    Verdict,
    check_caption,
    check_fused,
    checks_table,
    fingerprint,
)
from vecap.validation.measures import (
    caption_quality,
    entities,
    entity_counts,
    entity_recall,
    fuse_quality,
    repetition_score,
    word_count,
)
from vecap.validation.text import language_of, script_of
from vecap.validation.tidy import clean_alt_text, light_clean, tidy_caption, tidy_fused

__all__ = [
    "CAPTION_CHECKS",
    "CAPTION_REASONS",
    "FUSE_CHECKS",
    "FUSE_REASONS",
    "OTHER_REASONS",
    "REASONS",
    "REASON_DOCS",
    "Verdict",
    "caption_quality",
    "check_caption",
    "checks_table",
    "clean_alt_text",
    "entities",
    "entity_counts",
    "entity_recall",
    "fingerprint",
    "light_clean",
    "check_fused",
    "fuse_quality",
    "language_of",
    "repetition_score",
    "script_of",
    "tidy_caption",
    "tidy_fused",
    "word_count",
]
