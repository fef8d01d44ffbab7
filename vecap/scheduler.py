"""Commits of a run: one finalize task per shard, submitted when the shard's rows have all come
back from the stream and the shards holding its duplicates' first copies have committed.

:class:`CommitScheduler` holds what is pending (finalize tasks in flight), what waits (shards
whose first copies are not committed yet), what has committed and what failed;
:func:`execute` streams planned shards through it. The scheduler knows no stage by what it
does: it reads the plans' stage lists and the stats each finalize task returns.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from vecap import metrics, vocab
from vecap.config import PipelineConfig
from vecap.finalize import ShardJob, finalize_shard, sum_timings
from vecap.layout import Layout
from vecap.planning import ShardPlan
from vecap.reuse import Reuse, ShardReuse
from vecap.stages.base import Stage
from vecap.stages.write import WriteStage
from vecap.storage import Storage
from vecap.stream import build_stream, expected_rows, progress_bar
from vecap.summary import StageTally

log = logging.getLogger(__name__)

_Ready = tuple[ShardPlan, dict[str, Any], dict[str, float]]  # a complete shard: its plan, read report, timings


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1][:300] if text else ''}"


@dataclass
class RunContext:
    """What every pass of a run shares: the recipe, its stages, the root, the tallies the
    commits add to, the run's fault registry and its reused captions."""

    cfg: PipelineConfig
    stages: dict[str, Stage]
    storage: Storage
    layout: Layout
    tallies: dict[str, StageTally]
    registry: Any  # the run's FaultRegistry actor (vecap.faults)
    again: Reuse
    run_id: str
    progress: bool = True


class CommitScheduler:
    """Finalize tasks of one pass over planned shards (see the module docstring)."""

    def __init__(self, run: RunContext) -> None:
        import ray

        # (Ray's stubs type retry_exceptions as a bool; a list of exception types is documented and works)
        self._finalize = ray.remote(  # type: ignore[call-overload]
            num_cpus=0.5, max_retries=run.cfg.faults.finalize_retries, retry_exceptions=[OSError]
        )(finalize_shard)
        self.stages, self.storage, self.layout, self.tallies = run.stages, run.storage, run.layout, run.tallies
        self.again, self.run_id = run.again, run.run_id
        self.pending: dict[Any, str] = {}  # finalize task → shard
        self.submitted: set[str] = set()
        self.waiting: dict[str, _Ready] = {}
        self.captioned: set[str] = set()  # shards whose captions are committed (first copies of duplicates)
        self.failed: dict[str, str] = {}

    # --- a shard's rows are all back --------------------------------------------------------
    def complete(self, p: ShardPlan, report: dict[str, Any], timings: dict[str, float]) -> None:
        """Submit the shard's commit now, or once the shards holding its first copies have committed."""
        waits_for = self.again.shards.get(p.shard, ShardReuse()).waits_for
        if vocab.CAPTION not in p.commits or waits_for <= self.captioned:
            self.submit(p, report, timings)
        else:
            self.waiting[p.shard] = (p, report, timings)

    def submit(self, p: ShardPlan, report: dict[str, Any], timings: dict[str, float]) -> None:
        if p.deferred:  # the deferred stages' marker gets this pass's timings and engine counters too
            self.again.held[p.shard] = dict(timings)
        if p.duplicates_only:
            timings = dict(Counter(self.again.held.pop(p.shard, {})) + Counter(timings))
        write = self.stages[vocab.WRITE] if p.write else None
        if write is not None and not isinstance(write, WriteStage):
            raise TypeError(f"the write stage of this run is a {type(write).__name__}, not a WriteStage")
        job = ShardJob(
            p.shard,
            [self.stages[s] for s in p.commits],
            write,
            report,
            timings,
            p.retry_keys,
            rest_in_parts=p.duplicates_only,
            run_id=self.run_id,
        )
        self.pending[self._finalize.remote(self.storage, self.layout, job)] = p.shard
        self.submitted.add(p.shard)

    def fail(self, shard: str, why: str) -> None:
        self.failed[shard] = why
        log.error("shard %s failed: %s", shard, why)
        metrics.record_failed()

    # --- finalize tasks returning ------------------------------------------------------------
    def harvest(self, block: bool) -> None:
        """Collect the finalize tasks that have returned (all of them when ``block``)."""
        import ray

        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            shard = self.pending.pop(ready[0])
            try:
                done = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - one shard's failure is recorded, the others commit
                self.fail(shard, _one_line(err))
                continue
            for step, stats in done.items():
                self.tallies[step].add(stats)
            if vocab.CAPTION in done:
                self.captioned.add(shard)

    def release(self) -> None:
        """Submit the waiting shards whose first copies are committed; fail those whose never will be."""
        for shard in list(self.waiting):
            deps = self.again.shards[shard].waits_for
            lost = sorted(d for d in deps if d in self.failed)
            if lost:
                del self.waiting[shard]
                self.fail(shard, f"the first copies of its duplicate images are in shard {lost[0]}, which failed")
            elif deps <= self.captioned:
                self.submit(*self.waiting.pop(shard))

    def drain(self) -> dict[str, str]:
        """Wait for every commit; returns the failed shards."""
        self.release()
        while self.pending:
            self.harvest(block=True)
            self.release()
        for shard in self.waiting:  # unreachable unless a first copy's shard was never planned
            self.failed[shard] = "the shards holding the first copies of its duplicate images were not committed"
        return self.failed


def execute_passes(run: RunContext, plans: list[ShardPlan]) -> dict[str, str]:
    """Every planned shard streamed and committed; returns the failed shards.

    A duplicate's caption arrives when its first copy's shard commits, after the stream has
    passed it: the first pass then fuses every other row of such a shard (its fused rows wait
    as parts), and a second pass fuses the duplicates from the committed captions and commits
    those shards.
    """
    with_dups = {
        p.shard for p in plans if vocab.FUSE in p.stream and run.again.shards.get(p.shard, ShardReuse()).n_duplicate
    }
    if not with_dups:
        return execute(run, plans)
    first = [replace(p, write=False, deferred=(vocab.FUSE,)) if p.shard in with_dups else p for p in plans]
    failed = execute(run, first)
    second = [
        ShardPlan(
            p.shard,
            vocab.FROM_CAPTIONS,
            [vocab.FUSE],
            p.write,
            duplicates_only=True,
            n_rows=run.again.shards[p.shard].n_duplicate,
        )
        for p in plans
        if p.shard in with_dups and p.shard not in failed
    ]
    log.info("second pass: fusing the duplicates of %d shard(s)", len(second))
    return failed | execute(run, second)


def execute(run: RunContext, plans: list[ShardPlan]) -> dict[str, str]:
    """Stream the planned shards, commit each shard once it is complete; returns the failed shards.

    A stream that fails (the fault registry's circuit breaker, an error Ray could not retry)
    still lets every complete shard commit; the shards it left incomplete are reported failed.
    A shard with duplicate images is committed after the shards holding their first copies.
    """
    import ray

    commits = CommitScheduler(run)
    storage, layout = run.storage, run.layout
    for p in plans:
        if not p.stream:
            commits.submit(p, {}, {})
    streamed = [p for p in plans if p.stream]
    if streamed:
        by_shard = {p.shard: p for p in streamed}
        bar = progress_bar(expected_rows(storage, layout, streamed), enabled=run.progress)
        got: Counter = Counter()
        reports: dict[str, dict[str, Any]] = {}
        timings: dict[str, Counter] = {}
        stream_error = None
        try:
            for batch in build_stream(run.cfg, run.stages, streamed, storage, layout, run.again).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                for shard, n, report, t in zip(
                    *(batch.column(c).to_pylist() for c in ("shard", "n_rows", "report", "timings")), strict=True
                ):
                    got[shard] += n
                    bar.update(n)
                    sum_timings(timings.setdefault(shard, Counter()), t)
                    if report is not None:
                        reports[shard] = json.loads(report)
                    # A shard is complete once its read report and as many rows as it announced are here.
                    if shard in reports and got[shard] == reports[shard]["n_rows"]:
                        commits.complete(by_shard[shard], reports.pop(shard), dict(timings.pop(shard)))
                        got.pop(shard)
                commits.harvest(block=False)
                commits.release()
        except Exception as err:  # noqa: BLE001 - commit what is complete, then report the rest
            stream_error = ray.get(run.registry.state.remote())["tripped"] or _one_line(err)
            log.error("the stream stopped: %s", stream_error)
        bar.close()
        for p in streamed:
            if p.shard not in commits.submitted and p.shard not in commits.waiting:
                commits.failed.setdefault(
                    p.shard, stream_error or "the stream ended before all of the shard's rows came back"
                )
                metrics.record_failed()
    return commits.drain()
