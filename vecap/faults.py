"""Engine faults shared by every engine actor of a run: poison inputs and the circuit breaker.

A fatal engine error (dead engine process, device error, hung call) makes the actor exit,
so that Ray restarts it and retries its batches. Two things need memory across those
restarts, kept by one small Ray actor per run (:class:`FaultRegistry`):

- **Poison inputs.** Before each engine call the actor records the call's keys as open;
  after it returns, closes them. Keys still open when their batch comes back belong to a
  call that killed its actor. A batch that killed its actor twice is split in halves,
  then halves of the half that kills again, until one sample alone kills it twice: that sample
  gets the status ``engine_crash`` and the run goes on. A call holding a key that was in a
  crashed call runs alone on its actor (:class:`SuspectGate`): the other batches' calls finish
  first, and the next crash blames only that call's keys. Only such a call counts as a sample
  alone: a batch of one sample in flight beside the poison's batch dies with it.
- **Circuit breaker.** After ``max_consecutive_fatal`` fatal errors with no successful call
  between them, the registry trips: engine actors stop with an error that fails the run
  with a clear message (committed shards are kept) instead of restarting forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from vecap.config import FaultsConfig, ModelConfig

log = logging.getLogger(__name__)


# Crashes of a sample called alone before it is isolated as ``engine_crash``: two, so that an engine that
# dies of something else (a device error, an OOM kill) during one such call does not condemn an innocent sample.
ALONE_CRASHES = 2


class CircuitOpen(RuntimeError):
    """Too many fatal engine errors in a row: the run stops."""


@dataclass(frozen=True)
class FaultPolicy:
    """How an engine actor handles faults; from the recipe's ``faults`` section and stage section."""

    registry: str | None  # name of the run's FaultRegistry actor (None: no isolation)
    call_timeout_s: float  # an engine call with no engine progress for this long: a hung engine
    max_restarts: int  # restarts of one engine actor
    max_task_retries: int  # retries of one batch on restarted actors (poison isolation needs ~log2(batch)+3)

    @classmethod
    def of(
        cls, stage: ModelConfig | None = None, faults: FaultsConfig | None = None, registry: str | None = None
    ) -> FaultPolicy:
        """The policy of a model stage's section and the recipe's ``faults``; the recipe schema's
        defaults for either when None (an engine actor built outside a run: benchmarks, tests)."""
        faults = faults or FaultsConfig()
        timeout = stage.call_timeout_s if stage is not None else ModelConfig.model_fields["call_timeout_s"].default
        return cls(registry, timeout, faults.max_actor_restarts, faults.max_task_retries)


class FaultRegistry:
    """Open engine calls by key, and consecutive fatal errors (a Ray actor, one per run)."""

    def __init__(self, max_consecutive_fatal: int) -> None:
        self.max_consecutive_fatal = max_consecutive_fatal
        self.open: dict[str, int] = {}  # key → calls containing it that began and never ended
        self.open_alone: dict[str, int] = {}  # key → calls of that sample alone that began and never ended
        self.successes = 0  # engine calls that returned, in all
        self.first_open: dict[str, int] = {}  # key → successes when its first unfinished call began
        self.consecutive_fatal = 0
        self.fatal_total = 0
        self.isolated: list[str] = []
        self.tripped: str | None = None
        self.engine_starts: dict[str, int] = {}  # stage → engines loaded by its actors
        self.engine_restarts: dict[str, int] = {}  # stage → of which in actors Ray restarted

    def started(self, stage: str, restarted: bool) -> None:
        """An engine actor of ``stage`` loaded its engine (``restarted``: in an actor Ray restarted).
        Counted here, not in the markers: an actor that dies before its first batch returns
        reports nothing through the rows."""
        self.engine_starts[stage] = self.engine_starts.get(stage, 0) + 1
        if restarted:
            self.engine_restarts[stage] = self.engine_restarts.get(stage, 0) + 1

    def counts(self, keys: list[str]) -> dict[str, tuple[int, bool]]:
        """key → (crashed calls containing it, crashed alone twice *while the engine worked for others*).

        The second needs a success of the engine since the key's first crash: when nothing
        succeeds (a dead server), no sample is blamed and the circuit breaker decides.
        """
        return {
            k: (
                self.open.get(k, 0),
                self.open_alone.get(k, 0) >= ALONE_CRASHES and self.successes > self.first_open.get(k, self.successes),
            )
            for k in keys
            if k in self.open
        }

    def begin(self, keys: list[str], alone: bool = False) -> None:
        """An engine call of ``keys`` begins; ``alone``: nothing else runs on its engine meanwhile
        (a suspect call, :class:`SuspectGate`)."""
        for k in keys:
            self.open[k] = self.open.get(k, 0) + 1
            self.first_open.setdefault(k, self.successes)
        if alone and len(keys) == 1:
            self.open_alone[keys[0]] = self.open_alone.get(keys[0], 0) + 1

    def _forget(self, keys: list[str]) -> None:
        for k in keys:
            self.open.pop(k, None)
            self.open_alone.pop(k, None)
            self.first_open.pop(k, None)

    def end(self, keys: list[str]) -> None:
        """An engine call returned: its keys are fine, and the engine works."""
        self._forget(keys)
        self.successes += 1
        self.consecutive_fatal = 0

    def isolate(self, keys: list[str]) -> None:
        """These samples killed the engine alone: they become ``engine_crash`` rows (this is not
        a success of the engine: the circuit breaker's count goes on)."""
        self.isolated.extend(keys)
        self._forget(keys)

    def fatal(self, message: str) -> str | None:
        """Count a fatal error; returns the breaker's message once it has tripped."""
        self.consecutive_fatal += 1
        self.fatal_total += 1
        if self.consecutive_fatal >= self.max_consecutive_fatal and self.tripped is None:
            self.tripped = (
                f"{self.consecutive_fatal} fatal engine errors in a row (last: {message}); "
                "stopping the run (committed shards are kept). Fix the engine or the recipe, then rerun."
            )
        return self.tripped

    def state(self) -> dict[str, Any]:
        return {
            "tripped": self.tripped,
            "fatal_total": self.fatal_total,
            "isolated": list(self.isolated),
            "open_keys": len(self.open),
            "engine_starts": dict(self.engine_starts),
            "engine_restarts": dict(self.engine_restarts),
        }


def plan_groups(keys: list[str], counts: dict[str, tuple[int, bool]]) -> tuple[list[str], list[list[str]]]:
    """Split one batch's keys into engine calls, given the open counts of earlier attempts.

    Returns (keys that killed the engine alone → ``engine_crash``, groups to call in order).
    The poison is in every crashed call, so it is among the suspects (keys in two or more
    crashed calls) with the most crashes: those are split in halves and called last, after
    the keys never in a crashed call and the other suspects (which may succeed and be cleared).
    Each crash then halves the set that holds the poison.
    """
    crashes = {k: counts.get(k, (0, False))[0] for k in keys}
    crashed_alone = [k for k in keys if counts.get(k, (0, False))[1] and crashes[k] >= 2]
    suspects = [k for k in keys if crashes[k] >= 2 and k not in crashed_alone]
    clean = [k for k in keys if k not in set(crashed_alone) | set(suspects)]
    top = max((crashes[k] for k in suspects), default=0)
    hot = [k for k in suspects if crashes[k] == top]
    cooler = [k for k in suspects if crashes[k] < top]
    half = (len(hot) + 1) // 2
    return crashed_alone, [g for g in (clean, cooler, hot[:half], hot[half:]) if g]


class SuspectGate:
    """Engine calls of one actor: shared, except calls of suspects, which run alone.

    An actor has several batches in flight; when its process dies, every key of every call in
    flight looks guilty, and a poison input that kills the process at once would keep killing
    the other calls before any of them succeeds. A suspect call waits for the calls in flight
    to finish (new ones wait behind it), then runs alone.
    """

    def __init__(self) -> None:
        self._cond: asyncio.Condition | None = None  # made on the actor's event loop, at first use
        self._calls = 0
        self._suspect_running = False
        self._suspects_waiting = 0

    @asynccontextmanager
    async def call(self, suspect: bool) -> AsyncIterator[None]:
        cond = self._cond = self._cond or asyncio.Condition()
        async with cond:
            if suspect:
                self._suspects_waiting += 1
                await cond.wait_for(lambda: self._calls == 0)
                self._suspects_waiting -= 1
                self._suspect_running = True
            else:
                await cond.wait_for(lambda: not self._suspect_running and not self._suspects_waiting)
            self._calls += 1
        try:
            yield
        finally:
            async with cond:
                self._calls -= 1
                if suspect:
                    self._suspect_running = False
                cond.notify_all()


def registry_name(run_id: str) -> str:
    """The name under which the engine actors of run ``run_id`` find its registry."""
    return f"vecap-faults-{run_id}"


def start_registry(run_id: str, max_consecutive_fatal: int) -> Any:
    """The run's registry actor (0 CPUs) on the driver's node, which lives as long as the run
    (a worker node that goes away must not take it along); restarted (empty) if it dies anyway.
    Returns its handle: keep it alive for the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = registry_name(run_id)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)(FaultRegistry)
    return actor.options(name=name, scheduling_strategy=here).remote(max_consecutive_fatal)
