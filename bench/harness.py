"""The one timing harness of every benchmark: repetitions, medians, budgets, ratios, results.

Every comparison runs both sides in the same run, on the same inputs, one after the
other, in alternating order between repetitions (so drift of a shared machine hits
both sides alike), and reports medians. Each section has a time budget: a repetition
starts only if it should end before the sum of the budgets so far (time a section
leaves unused passes to the next), so a machine slowed by other jobs gives fewer
repetitions, said in the results, instead of an hour-long run.

Results are rows of *A / B = ratio* against an optional target, plus free tables;
:meth:`Harness.write` renders them to ``<name>.json`` and ``<name>.md``.
:class:`TreeSampler` samples memory and CPU of a process (tree) while something runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger("bench")

T = TypeVar("T")


# --------------------------------------------------------------------------- pure helpers
def median(xs: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is missing or ``b`` is 0 (no ratio rather than infinity)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def alternating(rep: int, sides: Sequence[T]) -> list[T]:
    """The order of the sides in repetition ``rep``: as given in even repetitions, reversed in odd ones."""
    return list(sides) if rep % 2 == 0 else list(reversed(sides))


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of one call, on the monotonic high-resolution clock."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load() -> float:
    """1-minute load average: how shared the machine was."""
    return round(os.getloadavg()[0], 2)


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10**-nd:
            return f"{x:.{nd}g}"
        return f"{x:.{nd}f}"
    return str(x)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Target:
    """What the ratio A/B should be: ``Target(">=", 0.9)`` reads "A/B ≥ 0.9"; with
    ``of="difference"`` it is about A − B instead (``Target(">=", -0.05, "difference")``:
    A at most 5 points below B)."""

    op: Literal[">=", "<="]
    value: float
    of: Literal["ratio", "difference"] = "ratio"

    def met(self, r: float | None) -> bool | None:
        if r is None:
            return None
        return r >= self.value if self.op == ">=" else r <= self.value

    def __str__(self) -> str:
        return f"{'A−B ' if self.of == 'difference' else ''}{'≥' if self.op == '>=' else '≤'} {self.value:g}"


@dataclass(frozen=True)
class Row:
    """One comparison: A against B, with what was measured and the target of A/B (if any)."""

    section: str
    name: str
    measured: str
    a: float | None
    b: float | None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.a, self.b)

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        if self.target.of == "difference":
            return self.target.met(None if self.a is None or self.b is None else self.a - self.b)
        return self.target.met(self.ratio)

    def cells(self) -> list[str]:
        met = {True: "yes", False: "**no**", None: ""}[self.met]
        return [self.name, self.measured, fmt(self.a), fmt(self.b), fmt(self.ratio), str(self.target or ""), met]

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "measured": self.measured,
            "a": self.a,
            "b": self.b,
            "ratio": self.ratio,
            "target": str(self.target) if self.target else None,
            "met": self.met,
        }


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.headers) + " |",
            "|" + "|".join("---" for _ in self.headers) + "|",
        ]
        lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --------------------------------------------------------------------------- the harness
@dataclass
class Harness:
    """Budgets, repetitions and results of one benchmark run (one per process)."""

    budgets_s: dict[str, float]  # section → seconds, in the order the sections run
    reps: int = 3
    quick: bool = False
    t_start: float = field(default_factory=time.time)
    rows: list[Row] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    section_s: dict[str, float] = field(default_factory=dict)
    cut: dict[str, str] = field(default_factory=dict)  # sections cut short by their budget, and how
    load_start: float = field(default_factory=load)

    # --- time ------------------------------------------------------------------
    def deadline(self, section: str) -> float:
        """When ``section`` must be done: the start plus every budget up to and including its own."""
        total = 0.0
        for name, seconds in self.budgets_s.items():
            total += seconds
            if name == section:
                return self.t_start + total
        return self.t_start + total  # an unbudgeted section may use what is left

    def left(self, section: str) -> float:
        return self.deadline(section) - time.time()

    def fits(self, section: str, seconds: float) -> bool:
        """Whether something expected to take ``seconds`` ends before the section's deadline."""
        return time.time() + seconds <= self.deadline(section)

    def repetitions(self, section: str, n: int | None = None) -> Iterator[int]:
        """Repetition numbers 0..n-1 (default ``reps``), while the next one should end within the budget.

        The first always runs; a later one only if the longest so far would still fit.
        """
        n = self.reps if n is None else n
        durations: list[float] = []
        for rep in range(n):
            if rep and not self.fits(section, max(durations)):
                self.cut[section] = f"{rep} of {n} repetitions (time budget)"
                log.warning("%s: stopping after %d repetition(s): the next would overrun the time budget", section, rep)
                return
            t0 = time.time()
            yield rep
            durations.append(time.time() - t0)

    def compare(self, section: str, sides: dict[str, Callable[[], T]], n: int | None = None) -> dict[str, list[T]]:
        """Run every side once per repetition, in alternating order; returns each side's results in rep order."""
        out: dict[str, list[T]] = {name: [] for name in sides}
        for rep in self.repetitions(section, n):
            for name in alternating(rep, list(sides)):
                out[name].append(sides[name]())
        return out

    # --- sections ------------------------------------------------------------------
    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one section; a failure is recorded (and logged) and does not stop the others."""
        t0 = time.time()
        log.info("=== %s (budget %.0fs, %.0fs left in all)", name, self.budgets_s.get(name, 0), self.left(name))
        try:
            self.results[name] = fn()
        except Exception as err:  # noqa: BLE001 - one failed section must not hide the others
            log.exception("section %s failed", name)
            self.results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        self.section_s[name] = time.time() - t0
        log.info("=== %s done in %.0fs", name, self.section_s[name])
        return self.results[name]

    # --- results -------------------------------------------------------------------
    def add(
        self, section: str, name: str, measured: str, a: float | None, b: float | None, target: Target | None = None
    ) -> Row:
        row = Row(section, name, measured, a, b, target)
        self.rows.append(row)
        return row

    def table(self, title: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.tables.append(Table(title, headers, rows))

    def note(self, text: str) -> None:
        self.notes.append(text.strip())

    def failed(self) -> list[str]:
        return [k for k, v in self.results.items() if isinstance(v, dict) and "error" in v]

    def meta(self, **extra: Any) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "reps": self.reps,
            "budgets_s": self.budgets_s,
            "seconds": time.time() - self.t_start,
            "section_seconds": self.section_s,
            "cut_short": self.cut,
            "load_start": self.load_start,
            "load_end": load(),
            "cpus": os.cpu_count(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }

    def markdown(self, title: str, meta: dict[str, Any]) -> str:
        lines = [f"# {title}", ""]
        if self.rows:
            head = ["comparison", "measured", "A", "B", "A/B", "target", "met"]
            lines += [markdown_table(head, (r.cells() for r in self.rows)), ""]
        for t in self.tables:
            lines += [t.markdown(), ""]
        lines.append(
            f"{'Quick' if meta['quick'] else 'Full'} run: up to {meta['reps']} repetition(s) per comparison; "
            f"{meta['seconds']:.0f} s in all; load average {meta['load_start']} at the start and {meta['load_end']} "
            f"at the end, on {meta['cpus']} CPUs (on a shared machine other jobs slow either side at random)."
        )
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        if self.cut:
            lines += ["", "Cut short by the time budget: " + "; ".join(f"{k}: {v}" for k, v in self.cut.items())]
        errors = [f"- {k}: {self.results[k]['error'].strip().splitlines()[0][:300]}" for k in self.failed()]
        if errors:
            lines += ["", "Sections that failed:", *errors]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, name: str = "results", title: str = "vecap benchmarks", **meta: Any) -> Path:
        """Write ``<out_dir>/<name>.json`` (everything) and ``<name>.md`` (the tables); returns the .md path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        m = self.meta(**meta)
        doc = {
            "meta": m,
            "rows": [r.to_dict() for r in self.rows],
            "verdicts": {r.name: r.met for r in self.rows if r.target},
            **self.results,
        }
        (out / f"{name}.json").write_text(json.dumps(jsonable(doc), indent=2, default=str) + "\n")
        md = self.markdown(title, m)
        (out / f"{name}.md").write_text(md)
        return out / f"{name}.md"


# --------------------------------------------------------------------------- sampling
def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid → (OS thread name, user+system seconds) of every thread of ``pid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


@dataclass
class TreeSampler:
    """Peak memory and CPU seconds of a process and its descendants, sampled while a block runs.

    ``with TreeSampler(pid) as s: ...`` then ``s.result()``. The root's RSS is read every
    ``interval_s``; the tree (and, with ``threads``, the root's threads) every ``tree_every_s``,
    as walking it costs more. CPU of the tree is summed over every process seen (from its
    first sample, or from 0 for one born during the block), so short-lived workers count up
    to their last sample. With ``threads`` (``pid`` is this process) per-thread CPU is kept,
    named by Python thread name where there is one. The sampler's own thread CPU is reported
    (``sampler_cpu_s``) so that callers measuring this process can subtract it.
    """

    pid: int
    interval_s: float = 0.25
    tree_every_s: float = 1.0
    tree: bool = True
    pss: bool = True  # /proc/<pid>/smaps_rollup: exact shared-page accounting, but costly to read
    threads: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _peak: dict[str, float] = field(default_factory=dict)
    _cpu_first: dict[int, float] = field(default_factory=dict)
    _cpu_last: dict[int, float] = field(default_factory=dict)
    _threads_first: dict[int, tuple[str, float]] = field(default_factory=dict)
    _threads_last: dict[int, tuple[str, float]] = field(default_factory=dict)
    _py_names: dict[int, str] = field(default_factory=dict)
    _rss_start: int = 0
    _sampler_cpu_s: float = 0.0
    _samples: int = 0

    def __enter__(self) -> TreeSampler:
        import psutil

        self._root = psutil.Process(self.pid)
        self._rss_start = self._root.memory_info().rss
        self._sample_tree(first=True)
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_tree()

    def _loop(self) -> None:
        import psutil

        t0 = time.thread_time()
        next_tree = time.monotonic() + self.tree_every_s
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(psutil.Error):
                self._peak["root_rss"] = max(self._peak.get("root_rss", 0), self._root.memory_info().rss)
            if time.monotonic() >= next_tree:
                self._sample_tree()
                next_tree = time.monotonic() + self.tree_every_s
        self._sampler_cpu_s = time.thread_time() - t0

    def _sample_tree(self, first: bool = False) -> None:
        import psutil

        procs = [self._root]
        if self.tree:
            with contextlib.suppress(psutil.Error):
                procs += self._root.children(recursive=True)
        rss_sum = pss_sum = biggest = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                cpu = p.cpu_times()
            except psutil.Error:
                continue
            if p.pid == self.pid:
                self._peak["root_rss"] = max(self._peak.get("root_rss", 0), rss)
            rss_sum += rss
            biggest = max(biggest, rss)
            if self.pss:
                pss_sum += (_pss_kib(p.pid) or rss // 1024) * 1024
            total = cpu.user + cpu.system
            if p.pid not in self._cpu_first:
                self._cpu_first[p.pid] = total if first else 0.0
            self._cpu_last[p.pid] = total
        for key, value in (
            ("rss_sum", rss_sum),
            ("pss_sum", pss_sum),
            ("largest_rss", biggest),
            ("processes", len(procs)),
        ):
            self._peak[key] = max(self._peak.get(key, 0), value)
        if self.threads:
            for tid, (name, cpu_s) in _thread_cpu(self.pid).items():
                self._threads_first.setdefault(tid, (name, cpu_s if first else 0.0))
                self._threads_last[tid] = (name, cpu_s)
            for t in threading.enumerate():
                if t.native_id is not None:
                    self._py_names[t.native_id] = t.name
        self._samples += 1

    def result(self) -> dict[str, Any]:
        mib = 2**20
        out: dict[str, Any] = {
            "sampler_ticks": self._samples,
            "root_rss_start_mib": self._rss_start / mib,
            "root_peak_rss_mib": self._peak.get("root_rss", 0) / mib,
            "tree_peak_pss_mib": self._peak.get("pss_sum", 0) / mib if self.pss else None,
            "tree_peak_rss_sum_mib": self._peak.get("rss_sum", 0) / mib,
            "largest_process_rss_mib": self._peak.get("largest_rss", 0) / mib,
            "max_processes": int(self._peak.get("processes", 0)),
            "tree_cpu_s": sum(self._cpu_last[p] - self._cpu_first[p] for p in self._cpu_last),
            "root_cpu_s": self._cpu_last.get(self.pid, 0.0) - self._cpu_first.get(self.pid, 0.0),
            "sampler_cpu_s": self._sampler_cpu_s,
        }
        if self.threads:
            groups: dict[str, float] = {}
            for tid, (name, cpu_s) in self._threads_last.items():
                label = _thread_group(self._py_names.get(tid) or name)
                groups[label] = groups.get(label, 0.0) + cpu_s - self._threads_first[tid][1]
            out["threads_cpu_s"] = {
                k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v >= 0.005
            }
        return out


def _thread_group(name: str) -> str:
    """Thread names with ids folded (``StreamingExecutor-ds_12`` → ``StreamingExecutor``)."""
    for prefix in ("StreamingExecutor", "ThreadPoolExecutor", "Thread-", "bench-sampler"):
        if name.startswith(prefix):
            return prefix.rstrip("-")
    return name.rstrip("0123456789-_:") or name
