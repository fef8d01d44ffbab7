"""The stage contract, and what the model stages share.

A stage is data, as in ``ray.data.llm``: it declares its Ray Data steps (UDF, task or
actor pool, resources, declared input columns), its output schema, its fingerprint
(what must match for committed shards to be reused) and how its per-shard stats are
counted. The driver (:mod:`vecap.pipeline`) is a loop over stages and knows none of them.

Rows flow between steps as Arrow tables of the run's work schema (:func:`work_schema`:
the columns of :data:`ROW` and of the stages in the stream). Each shard ends with one
*marker* row (``is_marker``) carrying the shard's row count and read report. Each step's
wall and CPU seconds go into its own ``t_<step>``/``cpu_<step>`` columns (spread over the
batch's rows), which the part writer sums per shard into the shard's stats.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from vecap import schemas, vocab
from vecap.backends import EngineSpec, Generation, Request, Sampling, load_engine
from vecap.backends.base import EngineFatal, EngineHung
from vecap.config import ModelConfig, stable_hash
from vecap.faults import CircuitOpen, FaultPolicy, SuspectGate, plan_groups
from vecap.metrics import EngineMetrics

log = logging.getLogger(__name__)

# Columns of every work row, whatever stages run: the stream's bookkeeping, the row's outcome, and the
# engine actors' counters (JSON, on the first row of a batch). The stages add the columns they declare
# (``Stage.columns``) and each step its wall and CPU seconds (:func:`timing_columns`): :func:`work_schema`.
ROW = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source", pa.string()),  # vocab.FROM_IMAGES (read from the input tar) or FROM_CAPTIONS (committed captions)
        ("is_marker", pa.bool_()),
        ("report", pa.string()),  # marker rows: JSON of the shard's read report and row count
        ("status", pa.string()),
        ("reason", pa.string()),  # a rejected VLM caption's check (vecap.vocab's reason column)
        ("error", pa.string()),
        ("engine_stats", pa.string()),
    ]
)

# Columns of every work row that the read step writes and any step may read: the stream's bookkeeping.
ROW_COLUMNS = ("key", "shard", "source", "is_marker", "report")

READ_STEP = "read"  # the stream's first step (vecap.stream), timed like the stages' steps


class StageContractError(ValueError):
    """A step declares it reads a column that no step before it writes, or writes one that is not a work
    column of the run; or two stages declare one column with different types."""


def timing_columns(step_name: str) -> tuple[str, str]:
    """The work columns of a step's wall seconds (``t_*``) and process CPU seconds (``cpu_*``), by its name."""
    name = step_name.replace("-", "_")
    return f"t_{name}", f"cpu_{name}"


def is_timing(column: str) -> bool:
    """Whether a work column (or a marker's ``timings`` key) is a step's seconds rather than an engine counter."""
    return column.startswith(("t_", "cpu_"))


def work_schema(stages: Sequence[Stage]) -> pa.Schema:
    """The work rows of a run of ``stages``: :data:`ROW`, the columns the stages declare, and the wall and
    CPU seconds of the read step and of each stage's steps. Assembled when the stream is built, so a run
    carries only its own stages' columns."""
    fields = {f.name: f for f in ROW}
    for stage in stages:
        for f in stage.columns:
            if f.name in fields and not fields[f.name].type.equals(f.type):
                raise StageContractError(
                    f"stage {stage.name!r} declares {f.name!r} as {f.type}, another stage as {fields[f.name].type}"
                )
            fields.setdefault(f.name, f)
    for step_name in (READ_STEP, *(step.name for stage in stages for step in stage.steps())):
        for column in timing_columns(step_name):
            fields.setdefault(column, pa.field(column, pa.float64()))
    return pa.schema(list(fields.values()))


def read_columns(stages: Sequence[Stage]) -> set[str]:
    """What the stream's read step writes for a run of ``stages`` (a shard is read for its first stage)."""
    return {c for stage in stages for c in stage.read_columns}


def work_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Work rows (dicts; absent columns are null) as a table of the run's work schema."""
    return schemas.table(rows, schema)


def check_steps(steps: Sequence[Step], schema: pa.Schema, written: Iterable[str] = ()) -> None:
    """Each step's declared ``inputs`` are written by a step before it (or are :data:`ROW_COLUMNS`),
    and each step writes only columns of the run's work ``schema``; raises :class:`StageContractError`
    naming the step and the columns. Called when the stream is built, before any data moves."""
    have = set(ROW_COLUMNS) | set(written)
    for step in steps:
        missing = sorted(set(step.inputs) - have)
        if missing:
            raise StageContractError(
                f"step {step.name!r} reads {missing}, which no step before it writes (written: {sorted(have)})"
            )
        unknown = sorted(set(step.outputs) - set(schema.names))
        if unknown:
            raise StageContractError(f"step {step.name!r} writes {unknown}, which are not work columns of this run")
        have |= set(step.outputs)


def with_time(table: pa.Table, column: str, seconds: float, cpu_seconds: float | None = None) -> pa.Table:
    """Spread ``seconds`` (and ``cpu_seconds``, into ``cpu_*``) evenly over the table's rows,
    added to what the timing column holds."""
    n = table.num_rows
    if n == 0:
        return table
    for name, value in ((column, seconds), ("cpu_" + column[2:], cpu_seconds)):
        if value is None:
            continue
        values = pa.array([value / n] * n, pa.float64())
        prev = table[name]
        values = pc.add(pc.fill_null(prev, 0.0), values) if prev.null_count < n else values
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


class Clock:
    """Wall and process-CPU seconds since creation: a step's own cost, for its timing columns."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stamp(self, table: pa.Table, column: str) -> pa.Table:
        return with_time(table, column, time.perf_counter() - self.wall, time.process_time() - self.cpu)


@dataclass(frozen=True)
class Step:
    """One Ray Data map step: a UDF run as Ray tasks (``actors == 0``) or by an actor pool."""

    name: str
    fn: Any  # a function (Ray tasks) or a callable class (an actor pool)
    kwargs: dict[str, Any] = field(default_factory=dict)  # fn_kwargs / fn_constructor_kwargs
    inputs: tuple[str, ...] = ()  # the work columns the step reads (checked by check_steps)
    outputs: tuple[str, ...] = ()  # the work columns it writes, its timing columns aside
    actors: int = 0
    batch_size: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int = 256  # task steps: the memory they declare to Ray's scheduler
    concurrency: int | None = None  # task steps: at most this many tasks at once
    # Actor steps: batches one actor works on at once (async UDFs); the actor class is given it too
    # (its constructor takes ``batches_in_flight``), as Ray Data alone does not hold an async UDF to it.
    batches_in_flight: int = 1
    # Actor steps: restarts of one actor (after a fatal engine error) and retries of one batch on a
    # restarted actor, from the run's FaultPolicy; an actor step without them is refused (Ray's
    # defaults are unbounded).
    max_restarts: int | None = None
    max_task_retries: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # actor steps: environment of the actors
    # Task steps: their wall and CPU seconds are added to the rows they return, under timing_columns(name);
    # actor steps time themselves (EngineWorker, given step_name). Off for a step that returns no work rows.
    timed: bool = True

    def apply(self, ds: Any) -> Any:
        """Append this step to a Ray Data dataset."""
        import ray.data

        common = {"batch_format": "pyarrow", "batch_size": self.batch_size, "num_cpus": self.num_cpus}
        if self.actors:
            import warnings

            if self.max_restarts is None or self.max_task_retries is None:
                raise StageContractError(f"actor step {self.name!r} must bound its restarts and retries")

            compute = ray.data.ActorPoolStrategy(
                size=self.actors,
                max_concurrent_calls_per_actor=self.batches_in_flight,
                max_tasks_in_flight_per_actor=self.batches_in_flight,
            )
            with warnings.catch_warnings():
                # Ray 2.60's defaults are unlimited restarts and retries, and the only way to bound
                # them is these two remote args (deprecated in favour of options Ray has not added yet).
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
                return ds.map_batches(
                    self.fn,
                    fn_constructor_kwargs={
                        **self.kwargs,
                        "batches_in_flight": self.batches_in_flight,
                        "step_name": self.name,
                    },
                    compute=compute,
                    num_gpus=self.num_gpus,
                    max_restarts=self.max_restarts,
                    max_task_retries=self.max_task_retries,
                    runtime_env={"env_vars": dict(self.env)} if self.env else None,
                    **common,
                )
        # Task steps declare memory, engine actors do not: their resources then differ, and
        # Ray Data never fuses a CPU step into an engine actor (it stays off the engine's path).
        return ds.map_batches(
            timed(self.fn, self.name) if self.timed else self.fn,
            fn_kwargs=self.kwargs,
            compute=ray.data.TaskPoolStrategy(size=self.concurrency),
            memory=self.memory_mb * 1024 * 1024,
            **common,
        )


def timed(fn: Any, step_name: str) -> Any:
    """``fn`` (a task UDF returning or yielding work tables) with its wall and CPU seconds added to
    the rows it returns, under the step's :func:`timing_columns`: steps time themselves by their name."""
    import functools
    import inspect

    column = timing_columns(step_name)[0]
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generate(batch: Any, **kwargs: Any) -> Iterator[pa.Table]:
            clock = Clock()
            for table in fn(batch, **kwargs):
                yield clock.stamp(table, column)
                clock = Clock()  # the time the stream spent elsewhere between two tables is not this step's

        return generate

    @functools.wraps(fn)
    def call(batch: Any, **kwargs: Any) -> pa.Table:
        clock = Clock()
        return clock.stamp(fn(batch, **kwargs), column)

    return call


def with_json_fields(table: pa.Table, column: str, fields: list[tuple[str, pa.DataType]]) -> pa.Table:
    """Expand a JSON column of the work rows into typed columns (named as ``fields``)."""
    import json

    values = [json.loads(v) if v else {} for v in table[column].to_pylist()]
    for name, typ in fields:
        table = table.append_column(name, pa.array([v.get(name) for v in values], typ))
    return table


def select_output(work: pa.Table, schema: pa.Schema, columns: dict[str, str], constants: dict[str, str]) -> pa.Table:
    """Select and rename work columns into ``schema`` (markers dropped, constants filled, sorted by key)."""
    rows = work.filter(pc.invert(pc.fill_null(work["is_marker"], False)))
    arrays = []
    for f in schema:
        if f.name in columns:
            arrays.append(rows[columns[f.name]].cast(f.type))
        elif f.name in constants:
            arrays.append(pa.array([constants[f.name]] * rows.num_rows, f.type))
        else:
            arrays.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema).sort_by("key")


class Stage(ABC):
    """One stage of caption → fuse → write: its steps, output rows, stats and fingerprint."""

    name: ClassVar[str]
    schema: ClassVar[pa.Schema]
    # The work columns this stage's steps and its read write and read, beyond vecap.stages.base.ROW:
    # a run's work schema is assembled from its stages' (work_schema).
    columns: ClassVar[pa.Schema] = pa.schema([])
    # The work columns its read of a shard writes (the stream's read step, for a shard this stage reads).
    read_columns: ClassVar[tuple[str, ...]] = ()
    # The work columns output_table reads (a stream stage's; the part writer's inputs, checked).
    reads: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What must equal the committed shards' for them to be reused (else --overwrite)."""

    def steps(self) -> list[Step]:
        """The Ray Data steps this stage adds to the stream (none for the write stage)."""
        return []

    def output_table(self, work: pa.Table) -> pa.Table:
        """Work rows of one shard → this stage's Parquet rows."""
        raise NotImplementedError

    def complete(self, table: pa.Table, shard: str, storage: Any, layout: Any) -> pa.Table:
        """The finalize task's last look at a shard's rows before they are committed."""
        return table

    def stats(self, table: pa.Table) -> dict[str, Any]:
        """Per-shard counts for the marker and the run summary."""
        statuses = Counter(table["status"].to_pylist())
        out: dict[str, Any] = {"n_rows": table.num_rows, "statuses": dict(statuses)}
        for col, name in (("n_prompt_tokens", "prompt_tokens"), ("n_output_tokens", "output_tokens")):
            if col in table.column_names:
                out[name] = int(pc.sum(table[col]).as_py() or 0)
        return out


def seed_for(run_seed: int, stage: str, key: str) -> int:
    """A per-sample seed from the key: reruns and any batching give the same samples."""
    digest = hashlib.sha256(f"{run_seed}:{stage}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Provenance:
    """Columns that say which model, prompt and parameters produced a row."""

    model: str
    prompt_id: str
    prompt_sha256: str
    params_sha256: str

    def columns(self) -> dict[str, str]:
        return {
            "model": self.model,
            "prompt_id": self.prompt_id,
            "prompt_sha256": self.prompt_sha256,
            "params_sha256": self.params_sha256,
        }


def engine_spec(cfg: ModelConfig, multimodal: bool) -> EngineSpec:
    """The section of the recipe that concerns the engine, as the engine's own typed spec."""
    return EngineSpec(
        backend=cfg.backend,
        model=cfg.model,
        multimodal=multimodal,
        sampling=Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.synthetic_lengths),
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        engine_kwargs=dict(cfg.engine),
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        request_concurrency=cfg.request_concurrency,
        request_timeout_s=cfg.request_timeout_s,
        request_retries=cfg.request_retries,
    )


def params_hash(spec: EngineSpec) -> str:
    """What changes outputs for the same model and prompt: backend, dtype, decoding, engine options."""
    return stable_hash(
        {
            "backend": spec.backend,
            "dtype": spec.dtype,
            "sampling": spec.sampling.to_dict(),
            "engine": spec.engine_kwargs,
        }
    )


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted (after its earlier process exited)."""
    import ray

    if not ray.is_initialized():
        return False
    ctx = ray.get_runtime_context()
    return ctx.get_actor_id() is not None and bool(ctx.was_current_actor_reconstructed)


class EngineWorker:
    """A Ray Data actor UDF that holds one engine for its lifetime, several batches in flight.

    ``__call__`` is a coroutine: the actor runs up to ``max_batches_in_flight`` batches at
    once and the engine batches continuously across them (it never drains between batches).
    Subclasses say which rows need the engine (``flag``), how a row becomes a request, and
    how a generation goes back into the row. Everything else is here, once, for both model
    stages: passing other rows through, timing, and faults (:mod:`vecap.faults`): a fatal
    engine error or a hung call makes the actor exit, so Ray restarts it and retries.
    """

    flag: ClassVar[str] = ""
    stage: ClassVar[str] = ""

    def __init__(
        self,
        spec: EngineSpec,
        faults: FaultPolicy | None = None,
        batches_in_flight: int = 1,
        step_name: str | None = None,
    ) -> None:
        logging.basicConfig(level=logging.WARNING)
        self.timing = timing_columns(step_name or self.stage)[0]  # its engine calls' wall seconds
        self.faults = faults or FaultPolicy.of()
        # Ray Data runs up to 4 batches of each of an actor's tasks at once in an async UDF (Ray 2.60's
        # DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY), whatever the actor's task limit: the limit is kept here.
        self._in_flight = asyncio.Semaphore(batches_in_flight)
        self._registry = None
        if self.faults.registry:
            import ray

            self._registry = ray.get_actor(self.faults.registry)
        t0 = time.perf_counter()
        self.engine = load_engine(spec)
        # Engine counters not yet reported: start-up first, then requests and engine steps.
        self._pending: defaultdict[str, float] = defaultdict(
            float, engine_starts=1, engine_start_s=time.perf_counter() - t0
        )
        if self._registry is not None:  # the run's count of starts and restarts, by stage
            import ray
            from ray.exceptions import RayActorError

            try:
                ray.get(self._registry.started.remote(self.stage, _restarted_actor()))
            except RayActorError as err:
                log.warning("fault registry unavailable (%s): this engine start is not counted", err)
        self._reported: dict[str, float] = {}
        self._gate = SuspectGate()  # calls holding keys of a crashed call run alone
        self._span_until: float | None = None  # span_s: this actor's first engine call to its last return
        self._metrics = EngineMetrics.for_worker(
            self, spec.backend, self._pending["engine_start_s"]
        )  # starts, restarts

    def request(self, row: dict[str, Any]) -> Request:
        raise NotImplementedError

    def apply(self, row: dict[str, Any], gen: Generation) -> None:
        raise NotImplementedError

    async def __call__(self, batch: pa.Table) -> pa.Table:
        clock = Clock()
        rows = batch.to_pylist()
        todo = [r for r in rows if r.get(self.flag)]
        self._pending["requests"] += len(todo)
        if todo:
            ready: dict[str, tuple[dict[str, Any], Request]] = {}
            for r in todo:
                try:
                    # Keys are unique within a shard; the fault registry sees shard/key.
                    ready[f"{r['shard']}/{r['key']}"] = (r, self.request(r))
                except Exception as err:  # noqa: BLE001 - a bad row is a row status
                    self.apply(r, Generation(text=None, error=f"{type(err).__name__}: {err}"))
            async with self._in_flight:
                if self._span_until is None:
                    self._span_until = time.perf_counter()
                with self._metrics.batch(len(ready), self.engine):  # batches in flight, engine statistics
                    await self._run(ready)
            # The span grows to each return, gaps between calls included: it is the engine's steady-state
            # window (what starves it between calls counts; the stream's fill and final commit do not).
            now = time.perf_counter()
            self._pending["span_s"] += max(0.0, now - self._span_until)
            self._span_until = max(now, self._span_until)
            for r in todo:
                r[self.flag] = False
        if rows:
            self._report(rows[0])
        table = work_table(rows, batch.schema)  # the run's work schema, as the batch came
        # The engine call's CPU runs in the engine's threads: only wall time is meaningful here.
        return with_time(table, self.timing, time.perf_counter() - clock.wall)

    def _report(self, row: dict[str, Any]) -> None:
        """Add this actor's engine counters since the last report to the row, named by stage."""
        import json

        now = self.engine.stats()
        for k, v in now.items():
            self._pending[k] += v - self._reported.get(k, 0.0)
        self._reported = dict(now)
        stats = json.loads(row.get("engine_stats") or "{}")
        for k, v in self._pending.items():
            name = f"{self.stage}_{k}"
            stats[name] = stats.get(name, 0) + v
        row["engine_stats"] = json.dumps(stats)
        self._pending = defaultdict(float)

    async def _run(self, ready: dict[str, tuple[dict[str, Any], Request]]) -> None:
        """Call the engine on the batch's requests, isolating inputs that killed it before."""

        keys = list(ready)
        counts = await self._ask("counts", keys) or {}  # {} without a registry: isolation off
        if self._registry is not None and (state := await self._ask("state")) and state["tripped"]:
            raise CircuitOpen(state["tripped"])
        crashed, groups = plan_groups(keys, counts)
        for k in crashed:
            self.apply(
                ready[k][0],
                Generation(text=None, error="this sample made the engine process exit", reason=vocab.ENGINE_CRASH),
            )
        if crashed:
            await self._ask("isolate", crashed)
        for group in groups:
            suspect = any(k in counts for k in group)
            async with self._gate.call(suspect):
                await self._ask("begin", group, suspect)  # a suspect call runs alone
                try:
                    gens = await self._call(self.engine.submit([ready[k][1] for k in group]), len(group))
                except EngineFatal as err:
                    await self._fatal(f"{type(err).__name__}: {err}"[:300])
                    raise  # not reached: the actor has exited
            for k, gen in zip(group, gens, strict=True):
                self.apply(ready[k][0], gen)
            await self._ask("end", group)

    async def _call(self, future: Future, n_requests: int) -> list[Generation]:
        """Wait for an engine call; a call during which the engine makes no progress (no step, no
        token) for ``call_timeout_s`` is a hung engine (:class:`EngineHung`). A backend that cannot
        report progress gets that limit on the call's wall time. An engine that dies fails the
        call itself (:class:`EngineFatal`), in seconds."""
        import asyncio

        waiting = asyncio.wrap_future(future)
        limit = self.faults.call_timeout_s
        start = last_change = time.monotonic()
        seen = None
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=min(5.0, limit))
            if done:
                return waiting.result()
            now, progress = time.monotonic(), self.engine.progress(future)
            if progress is not None and (progress.steps, progress.tokens) != seen:
                seen, last_change = (progress.steps, progress.tokens), now
            if now - last_change >= limit:
                tokens = f"{progress.call_tokens} tokens" if progress is not None else "no token count"
                message = (
                    f"engine call hung: waited {now - start:.0f} s, no engine progress for {now - last_change:.0f} s "
                    f"(limit call_timeout_s={limit:g}); {tokens} came back for its {n_requests} requests"
                )
                log.error("%s", message)
                raise EngineHung(message)

    async def _ask(self, method: str, *args: Any) -> Any:
        """Call the run's fault registry; without one (or while it is unreachable) isolation is off."""
        if self._registry is None:
            return None
        from ray.exceptions import RayActorError

        try:
            return await getattr(self._registry, method).remote(*args)
        except RayActorError as err:
            log.warning("fault registry unavailable (%s): no poison-input isolation for this call", err)
            return None

    async def _fatal(self, message: str) -> None:
        """The engine failed: stop the run if the breaker trips, else exit for a restart."""
        self.engine.kill()
        tripped = await self._ask("fatal", message)
        if tripped:
            raise CircuitOpen(tripped)
        log.error("engine failed (%s): exiting so that Ray restarts this actor and retries its batches", message)
        logging.shutdown()
        os._exit(1)
