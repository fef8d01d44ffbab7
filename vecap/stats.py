"""The additive part of a done marker (``<stage>/_done/NNNNN.json``), typed, with one way to add two.

A marker holds a shard's stats as JSON (counts, statuses, fallbacks, tokens, timings, engine
counters, and what is not additive: fingerprint, commit time, read report). Everything that
totals markers (the run's summary, ``vecap status``, the report, ``vecap inspect``, ``vecap
plan``, the benchmarks) reads them through :meth:`ShardStats.of_marker` and sums with ``+``,
so a count is read and added the same way everywhere, and a marker missing a part (one written
by an older vecap, a write-stage marker without tokens) counts that part as zero.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def _counts(value: Any, what: str) -> Counter:
    """A marker's ``{value: n}`` map as a Counter; anything else (a crafted or damaged file) is left out, logged."""
    if value is None:
        return Counter()
    if not isinstance(value, dict):
        log.warning("marker field %r is not a {value: count} map: left out", what)
        return Counter()
    return Counter({str(k): v for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)})


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


@dataclass
class ShardStats:
    """Counts of one shard of one stage (``shards == 1``), or of several summed with ``+``."""

    shards: int = 0
    rows: int = 0
    samples: int = 0  # the write stage's samples in its CLIP tar (n_samples)
    statuses: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    caption_sources: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    output_tokens: int = 0
    timings: Counter = field(default_factory=Counter)  # t_* wall and cpu_* process seconds per step
    engine: Counter = field(default_factory=Counter)  # the engine actors' counters (<stage>_requests, _steps …)

    @classmethod
    def of_marker(cls, marker: dict[str, Any]) -> ShardStats:
        return cls(
            shards=1,
            rows=int(_number(marker.get("n_rows"))),
            samples=int(_number(marker.get("n_samples"))),
            statuses=_counts(marker.get("statuses"), "statuses"),
            fallbacks=_counts(marker.get("fallbacks"), "fallbacks"),
            caption_sources=_counts(marker.get("caption_sources"), "caption_sources"),
            prompt_tokens=int(_number(marker.get("prompt_tokens"))),
            output_tokens=int(_number(marker.get("output_tokens"))),
            timings=_counts(marker.get("timings"), "timings"),
            engine=_counts(marker.get("engine"), "engine"),
        )

    @classmethod
    def total(cls, markers: Iterable[dict[str, Any]]) -> ShardStats:
        out = cls()
        for marker in markers:
            out += cls.of_marker(marker)
        return out

    def __add__(self, other: ShardStats) -> ShardStats:
        return ShardStats(
            shards=self.shards + other.shards,
            rows=self.rows + other.rows,
            samples=self.samples + other.samples,
            statuses=_plus(self.statuses, other.statuses),
            fallbacks=_plus(self.fallbacks, other.fallbacks),
            caption_sources=_plus(self.caption_sources, other.caption_sources),
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            timings=_plus(self.timings, other.timings),
            engine=_plus(self.engine, other.engine),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "rows": self.rows,
            "statuses": dict(self.statuses),
            "fallbacks": dict(self.fallbacks),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def _plus(a: Counter, b: Counter) -> Counter:
    """Counter addition that keeps zero counts (``Counter + Counter`` drops them)."""
    out = Counter(a)
    out.update(b)
    return out
