"""The driver: plan pending shards, stream them through the stages, commit each shard once.

``run`` reads as the data flow of docs/architecture.md: check the root and take its lease
(:mod:`vecap.lease`), build the recipe's stages, refuse or invalidate stale shards and plan
what each shard still needs (:mod:`vecap.planning`), start Ray (:mod:`vecap.ray_env`), find
the images whose captions are reused (:mod:`vecap.reuse`), stream the planned shards and
commit each one when complete (:mod:`vecap.stream`, :mod:`vecap.scheduler`), then write the
summary and the run manifests (:mod:`vecap.summary`). The driver never holds rows.

What Ray does not give is here: the 1:1 shard outputs, the refusal to mix outputs of
different models or prompts, the lease (one run per root) and the summary.
``vecap caption|fuse|write|run`` are this one function with different ``steps``;
their files are identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from vecap import vocab
from vecap.config import PipelineConfig
from vecap.faults import registry_name, start_registry
from vecap.layout import DRY_RUN_DIR, STAGES, Layout
from vecap.lease import Lease, new_run_id
from vecap.outputs import check_layout, remove_dead_runs_files, remove_temp_files, write_sizes
from vecap.planning import ShardPlan, check_root, invalidate_stale, plan, select_shards
from vecap.ray_env import init_ray
from vecap.reuse import Reuse, resolve
from vecap.runlog import driver_log, file_only
from vecap.scheduler import RunContext, execute_passes
from vecap.stages.base import Stage
from vecap.storage import Storage
from vecap.summary import RunFailed, RunResult, run_manifest

__all__ = ["RunFailed", "RunResult", "build_stages", "layout_of", "run"]

log = logging.getLogger(__name__)


# --- stages and fingerprints --------------------------------------------------------------
def build_stages(cfg: PipelineConfig, steps: Sequence[str], registry: str | None = None) -> dict[str, Stage]:
    """The stages of a recipe; ``registry`` names the run's fault registry actor (vecap.faults)."""
    from vecap.faults import FaultPolicy
    from vecap.stages.caption import CaptionStage
    from vecap.stages.fuse import FuseStage
    from vecap.stages.write import WriteStage

    def faults(section: Any) -> FaultPolicy:
        return FaultPolicy.of(section, cfg.faults, registry)

    built: dict[str, Stage] = {}
    if vocab.CAPTION in steps:
        built[vocab.CAPTION] = CaptionStage(
            cfg.caption, cfg.seed, faults(cfg.caption), cfg.storage_options, image_exts=tuple(cfg.write.image_exts)
        )
    if vocab.FUSE in steps:
        built[vocab.FUSE] = FuseStage(cfg.fuse, cfg.seed, faults(cfg.fuse))
    if vocab.WRITE in steps:
        built[vocab.WRITE] = WriteStage.from_config(cfg)
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


# --- the run ---------------------------------------------------------------------------------
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
    input_shards = select_shards(check_root(cfg, layout, storage), shards, layout)
    check_layout(layout, storage)
    run_id = new_run_id()
    lease = Lease(storage, layout.lease, run_id, ttl_s=cfg.lease_ttl_s, heartbeat_s=min(15.0, cfg.lease_ttl_s / 4))
    with lease, driver_log(storage, layout, run_id) as log_path:
        log.info(
            "run %s on %s (%s)%s", run_id, layout.root, ", ".join(steps), " — dry run, no models" if dry_run else ""
        )
        log.info("driver log: %s", log_path)
        remove_dead_runs_files(layout, storage)  # we hold the lease: what other runs left belongs to dead ones
        stages = build_stages(cfg, steps, registry_name(run_id))
        invalidate_stale(stages, layout, storage, set(shards) if shards is not None else None, overwrite)
        plans, tallies = plan(stages, layout, storage, input_shards, retry_failed)
        failed: dict[str, str] = {}
        restarts: dict[str, int] = {}
        if plans:
            log.info("Ray: %s", init_ray(cfg))
            registry = start_registry(run_id, cfg.faults.max_consecutive_fatal)
            log.info(
                "plan: %d shard(s) from images, %d from captions, %d write-only (%d done shard(s) skipped)",
                sum(p.source == vocab.FROM_IMAGES for p in plans),
                sum(p.source == vocab.FROM_CAPTIONS for p in plans),
                sum(p.source is None for p in plans),
                len(input_shards) - len(plans),
            )
            again = resolve_reuse(stages, plans, storage, layout, run_id)
            shared = RunContext(cfg, stages, storage, layout, tallies, registry, again, run_id, progress)
            failed = execute_passes(shared, plans)
            storage.remove(layout.reuse(run_id), recursive=True)
            remove_temp_files(layout, storage)  # every commit of this run has returned
            restarts = _engine_restarts(registry)
        else:
            log.info("nothing to do: every selected shard is done for %s", ", ".join(steps))
        result = RunResult(run_id, tallies, time.time() - t0, layout, failed, restarts)
        file_only(result.summary())  # the CLI prints it; the log keeps it
        if vocab.WRITE in steps or storage.exists(layout.sizes):
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
    from vecap.stages.caption import CaptionStage

    caption = stages.get(vocab.CAPTION)
    todo = [p.shard for p in plans if p.source == vocab.FROM_IMAGES and p.retry_keys is None]
    if not isinstance(caption, CaptionStage) or not todo:
        return Reuse("")
    t0 = time.time()
    again = resolve(todo, layout.images, storage, layout.reuse(run_id), dedup=caption.cfg.dedup, cache=caption.cache)
    log.info(
        "captions reused: %d duplicate image(s), %d from the cache (resolved in %.1fs)",
        again.n_duplicate,
        again.n_cache,
        time.time() - t0,
    )
    return again


def _engine_restarts(registry: Any) -> dict[str, int]:
    """stage → engine restarts counted by the run's fault registry ({} if it cannot be reached)."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return dict(ray.get(registry.state.remote(), timeout=30)["engine_restarts"])
    except (RayActorError, ray.exceptions.GetTimeoutError) as err:
        log.warning("engine restarts not counted: %s", err)
        return {}
