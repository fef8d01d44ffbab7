"""Data path / driver section: what the driver and the CPU side cost per sample, with no models.

Each measured run is ``vecap.pipeline.run(cfg, dry_run=True)`` (the no-model backend,
outputs under ``<root>/_dry_run/``) on the packaged ``gpu`` recipe (what a real run does on
its CPUs: 336 px images, its batch sizes), with one actor per model stage and four shards
read at once to suit a small machine. Per configuration (one node, or a head and a worker
node of ``ray.cluster_utils.Cluster``) a fresh process runs as the driver: it starts Ray,
does one warm-up run, then the measured runs, so the driver's figures are its own:

- driver CPU: ``resource.getrusage(RUSAGE_SELF)`` around ``run`` (every thread of the driver
  process: vecap's loop, Ray Data's executor, Ray's core worker), less the sampler's own thread;
- driver memory: peak RSS of the driver process, sampled every 0.25 s;
- data path CPU: CPU seconds of the whole Ray process tree (driver, GCS, raylets, workers,
  actors) over the run, per sample: hence samples/s per core and CPU cores per GPU at
  50 images/s (a GPU's captioning rate for LLaVA-1.5-7B);
- per-step seconds per sample from the stages' own markers (``timings``: wall ``t_*`` and
  process-CPU ``cpu_*`` seconds inside each step, summed over the shard's rows): the CPU side
  per sample outside the engines (read + decode + resize, caption check, fuse prompts, fuse
  check; the write stage records wall seconds), which ``vecap plan`` uses, and the CPU cores a
  GPU node needs per GPU at a given images/s.

The inputs are repacked from the generated sample (:mod:`bench.data`): the same samples in
shards of 100 and in one shard of all of them.

The dry runs are short and Ray Data's streaming executor costs the driver a roughly constant
share of a core per wall second whatever the rows (its loop wakes every 0.1 s, the consumer
polls every 0.01 s), so driver CPU per sample of a small run is mostly that. A third driver
process (one node) therefore runs more dry runs of other sizes (``FIT_SETS``) and an idle probe
(a vecap-shaped stream whose only task sleeps), and the driver CPU of every one-node run is
split by least squares into ``a·wall + b·rows + c·shards`` (a: cores, b: ms per row, c: ms per
shard), also with a constant per run (d) and with ``a`` fixed at the probe's; each fit is
printed with its standard errors, and the raw runs beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.context import REPO, WORK, Ctx, read_markers, set_env, summed_timings
from bench.harness import Harness, Target, TreeSampler, alternating, median, timed
from bench.workload import work_rows_schema
from vecap.plan import CPU_STEPS, cpu_per_sample

log = logging.getLogger("bench")

RECIPE = "gpu"
# Repacked samples cycle a few dozen images: with dedup on, most rows would skip the decode and the
# engines, and the data path measured would not be a real corpus's.
OVERRIDES = ["caption.actors=1", "fuse.actors=1", "max_inflight_shards=4", "caption.dedup=false"]
NUM_CPUS = 8  # logical CPUs of the Ray instance, split evenly between the nodes
OBJECT_STORE_MB = 1024  # split evenly between the nodes
GPU_IMAGES_PER_S = 50.0
RATES = (25.0, 50.0, 100.0)  # images/s per GPU at which cores per GPU are tabled
# A past figure, quoted and labelled, never a measured side: the driver CPU per row of the
# row-holding driver that issue 10 replaced, from that issue's own measurement (it no longer exists
# to be measured beside today's).
QUOTED_ROW_HOLDING_MS_PER_ROW, QUOTED_ROW_HOLDING_MS_PER_SHARD = 0.7, 34.0
QUOTED = (
    f"(issue 10 quoted {QUOTED_ROW_HOLDING_MS_PER_ROW} ms per row + {QUOTED_ROW_HOLDING_MS_PER_SHARD:.0f} ms per "
    "shard for the row-holding driver it replaced: a past figure, not measured here)"
)


def _wall_steps() -> tuple[str, ...]:
    """The stream steps' wall-seconds columns (the caption and fuse stages' work rows, in stream
    order), then the write stage's."""
    return (*(name for name in work_rows_schema().names if name.startswith("t_")), "t_write")


STEPS = _wall_steps()
FLAT = Target("<=", 1.3)
# The fit runs (one node, one driver process): (samples, shard size) beside the main runs, so that
# driver CPU = a·wall + b·rows + c·shards (+ d per run) can be told apart; sized for a 2-core machine.
FIT_SETS = {
    "quick": ((100, 100), (1000, 100), (1000, 1000), (2000, 2000), (5000, 5000)),
    "full": ((100, 100), (1000, 100), (1000, 1000), (3000, 3000)),
}
# Runs of failed downloads only (no image to decode): the same stages and bookkeeping per row at ~10x the
# rows per second of real images on 2 cores, so wall time and rows stop growing together in the fit.
FAST_SETS = {"quick": ((20000, 10000),), "full": ((50000, 10000),)}
FAST = " failed downloads only"
FIT_MIN_S = {"quick": 300.0, "full": 300.0}  # the fit runs get at least this long, past the section's budget if need be
IDLE_PROBE_S, IDLE_PROBE_REPS = (
    8.0,
    2,
)  # a vecap-shaped Ray Data stream whose only task sleeps: the executor's cost alone


# --------------------------------------------------------------------------- the child: one driver
def start_ray(nodes: int, num_cpus: int, object_store_mb: int) -> Any:
    """A local Ray of ``nodes`` nodes (a head and workers of ``ray.cluster_utils.Cluster`` when > 1)."""
    import ray

    cpus, store = num_cpus // nodes, object_store_mb // nodes * 2**20
    if nodes == 1:
        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, num_cpus=cpus, object_store_memory=store
        )
        return None
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus, "object_store_memory": store, "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def measure(root: Path, overrides: list[str], shards: list[str] | None = None) -> dict[str, Any]:
    """One dry run of the whole pipeline on ``root``, measured from inside the driver process."""
    import gc
    import resource

    from vecap import pipeline
    from vecap.config import load_config
    from vecap.layout import DRY_RUN_DIR

    shutil.rmtree(root / DRY_RUN_DIR, ignore_errors=True)
    cfg = load_config(RECIPE, [f"root={root}", *OVERRIDES, *overrides])
    gc.collect()
    with TreeSampler(os.getpid(), pss=False, threads=True) as sampler:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        wall, result = timed(lambda: pipeline.run(cfg, dry_run=True, shards=shards, progress=False))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    s = sampler.result()
    driver_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime) - s["sampler_cpu_s"]
    tree_cpu = s["tree_cpu_s"] - s["sampler_cpu_s"]
    rows, shards_n = result.tallies["write"].rows, result.tallies["write"].shards
    stream = summed_timings(read_markers(result.layout, "fuse"))  # the stream's timings ride on every stream stage
    stream.update(summed_timings(read_markers(result.layout, "write")))
    return {
        "samples": rows,
        "shards": shards_n,
        "wall_s": wall,
        "samples_per_s": rows / wall,
        "driver_cpu_s": driver_cpu,
        "driver_cpu_ms_per_sample": 1000 * driver_cpu / rows,
        "driver_cpu_s_per_10k": driver_cpu * 10_000 / rows,
        "driver_cpu_ms_per_shard": 1000 * driver_cpu / shards_n,
        "driver_cores": driver_cpu / wall,  # CPU seconds per wall second: the driver's share of one core
        "driver_rss_start_mib": s["root_rss_start_mib"],
        "driver_peak_rss_mib": s["root_peak_rss_mib"],
        "driver_rss_growth_mib": s["root_peak_rss_mib"] - s["root_rss_start_mib"],
        "driver_threads_cpu_s": {k: v for k, v in s.get("threads_cpu_s", {}).items() if k != "bench-sampler"},
        # the driver's main thread: vecap's loop, planning, Ray Data's plan and iterator (not its executor thread)
        "driver_main_ms_per_sample": 1000 * s.get("threads_cpu_s", {}).get("MainThread", 0.0) / rows,
        "tree_cpu_s": tree_cpu,
        "tree_peak_rss_sum_mib": s["tree_peak_rss_sum_mib"],
        "max_processes": s["max_processes"],
        "cpu_ms_per_sample": 1000 * tree_cpu / rows,
        "samples_per_s_per_core": rows / tree_cpu if tree_cpu > 0 else None,
        "cores_per_gpu_at_50": GPU_IMAGES_PER_S * tree_cpu / rows,
        "steps_ms_per_sample": {k: 1000 * stream.get(k, 0.0) / rows for k in STEPS},
        "steps_cores_per_gpu_at_50": GPU_IMAGES_PER_S * sum(stream.get(k, 0.0) for k in STEPS) / rows,
        # CPU seconds per sample of each CPU step (process CPU; the write stage's wall seconds)
        "cpu_steps_s_per_sample": cpu_per_sample(stream, rows),
        "cpu_s_per_sample": sum(cpu_per_sample(stream, rows).values()),
        "engine_starts": stream.get("caption_engine_starts", 0) + stream.get("fuse_engine_starts", 0),
        "sampler_cpu_s": s["sampler_cpu_s"],
    }


def idle_probe(seconds: float) -> dict[str, Any]:
    """Driver CPU of a Ray Data stream shaped like vecap's (a read task, an actor pool, tasks, another
    actor pool, the part writer) whose only work is one task sleeping ``seconds``: what the streaming
    executor costs the driver per wall second with (almost) no rows, under the DataContext vecap set."""
    import resource

    import ray.data

    def sleepy(batch: Any) -> Any:  # nested: pickled by value, so workers need not import bench
        time.sleep(seconds)
        return batch

    def ident(batch: Any) -> Any:
        return batch

    class Actor:
        def __call__(self, batch: Any) -> Any:
            return batch

    ds: ray.data.Dataset = ray.data.from_items([{"x": 0}], override_num_blocks=1)
    ds = ds.map_batches(sleepy, batch_size=1, concurrency=1, memory=2**20)
    ds = ds.map_batches(Actor, batch_size=None, concurrency=1, num_cpus=0.5)
    ds = ds.map_batches(ident, batch_size=None, memory=2**20)
    ds = ds.map_batches(Actor, batch_size=None, concurrency=1, num_cpus=0.5)
    ds = ds.map_batches(ident, batch_size=None, num_cpus=0.25)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pass
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {"wall_s": wall, "driver_cpu_s": cpu, "driver_cores": cpu / wall}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """The driver process of one configuration: start Ray, warm up, measure each shard size."""
    import ray

    from vecap.layout import DRY_RUN_DIR

    nodes = int(spec["nodes"])
    harness = Harness({"driver": spec["deadline"] - time.time()}, reps=int(spec["reps"]))
    t_ray, cluster = timed(lambda: start_ray(nodes, int(spec["num_cpus"]), int(spec["object_store_mb"])))
    out: dict[str, Any] = {"nodes": len(ray.nodes()), "ray_start_s": t_ray, "runs": {}}
    try:
        warm_root = Path(spec["warmup_root"])
        out["warmup"] = measure(warm_root, spec.get("overrides", []))
        shutil.rmtree(warm_root / DRY_RUN_DIR, ignore_errors=True)
        probes = [idle_probe(float(spec["idle_probe_s"])) for _ in range(int(spec.get("idle_probe_reps", 0)))]
        if probes:
            out["idle_probe"] = probes
            log.info(
                "driver, idle probe: %s",
                ", ".join(
                    f"{p['driver_cpu_s']:.3f}s CPU in {p['wall_s']:.1f}s = {p['driver_cores']:.4f} cores"
                    for p in probes
                ),
            )
        sizes = [str(s) for s in spec["roots"]]
        longest = 0.0
        for rep in harness.repetitions("driver"):
            for size in alternating(rep, sizes):
                if longest and not harness.fits("driver", longest):
                    harness.cut["driver"] = f"shard size {size} not run in repetition {rep} (time budget)"
                    log.warning("driver, %d node(s): %s", nodes, harness.cut["driver"])
                    continue
                root = Path(spec["roots"][size])
                m = measure(root, spec.get("overrides", []))
                shutil.rmtree(root / DRY_RUN_DIR, ignore_errors=True)
                longest = max(longest, m["wall_s"])
                out["runs"].setdefault(size, []).append(m)
                log.info(
                    "driver, %d node(s), run %s: %d samples in %.1fs, driver CPU %.3fs = %.3f ms/sample, "
                    "peak RSS %.0f MiB; data path %.2f ms CPU/sample",
                    nodes,
                    size,
                    m["samples"],
                    m["wall_s"],
                    m["driver_cpu_s"],
                    m["driver_cpu_ms_per_sample"],
                    m["driver_peak_rss_mib"],
                    m["cpu_ms_per_sample"],
                )
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    out["cut_short"] = harness.cut
    return out


# --------------------------------------------------------------------------- the section
def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions of every number (dicts of numbers included)."""
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = median(r[k] for r in runs)
        elif isinstance(v, dict):
            out[k] = {kk: median(r[k].get(kk) for r in runs) for kk in v}
    out["reps"] = len(runs)
    return out


def bench_driver(ctx: Ctx) -> dict[str, Any]:
    from bench.data import repack

    s, h = ctx.sizes, ctx.harness
    n = s.driver_samples
    repack_s, roots = timed(
        lambda: {
            size: repack(ctx.images, WORK / "data" / f"driver-{n}-s{size}", n, size).parent
            for size in s.driver_shard_sizes
        }
    )
    log.info("driver: inputs of %d samples in shards of %s ready (%.1fs)", n, s.driver_shard_sizes, repack_s)
    warm = repack(ctx.images, WORK / "data" / "driver-warmup", 20, 20).parent  # starts workers and actors, imports
    configs: dict[str, Any] = {}
    for nodes in (1, 2):
        if nodes > 1 and configs and not h.fits("driver", 0.8 * configs["1"].get("seconds", 0)):
            h.cut["driver"] = "the two-node runs (time budget)"
            log.warning("driver: skipping the two-node runs: they would overrun the time budget")
            break
        t0 = time.time()
        try:  # one failed configuration must not hide the other's figures
            configs[str(nodes)] = _run_child(nodes, roots, warm, s.driver_reps, h.deadline("driver"))
        except Exception as err:  # noqa: BLE001
            log.error("driver, %d node(s): %s", nodes, err)
            configs[str(nodes)] = {"error": f"{type(err).__name__}: {err}"}
        configs[str(nodes)]["seconds"] = time.time() - t0
        if configs[str(nodes)].get("cut_short"):
            h.cut[f"driver, {nodes} node(s)"] = configs[str(nodes)]["cut_short"]["driver"]
    failed = {label: c["error"] for label, c in configs.items() if "error" in c}
    if len(failed) == len(configs):
        raise RuntimeError("; ".join(f"{label} node(s): {message}" for label, message in failed.items()))
    for label, message in failed.items():
        h.note(f"Data path, {label} node(s): FAILED — {message.strip().splitlines()[0][:300]}")
    summary = {
        nodes: {size: _median_run(runs) for size, runs in c.get("runs", {}).items()} for nodes, c in configs.items()
    }
    _report(h, summary, n, s.driver_shard_sizes, quick=h.quick)
    fit = _fit_section(ctx, configs.get("1", {}), warm)
    return {
        "samples": n,
        "shard_sizes": list(s.driver_shard_sizes),
        "repack_s": repack_s,
        "recipe": RECIPE,
        "overrides": OVERRIDES,
        "num_cpus": NUM_CPUS,
        "summary": summary,
        "configs": configs,
        "fit": fit,
    }


# --------------------------------------------------------------------------- the fit: per second, per row, per shard
def _fit_section(ctx: Ctx, one_node: dict[str, Any], warm: Path) -> dict[str, Any]:
    """More one-node runs of other sizes, an idle probe, and the least-squares split of driver CPU."""
    from bench.data import repack

    h = ctx.harness
    sets = FIT_SETS["quick" if h.quick else "full"]
    roots = {
        f"{rows}x{size}": repack(ctx.images, WORK / "data" / f"driver-{rows}-s{size}", rows, size).parent
        for rows, size in sets
    }
    for rows, size in FAST_SETS["quick" if h.quick else "full"]:
        roots[f"{rows}x{size}{FAST}"] = repack(
            ctx.images, WORK / "data" / f"driver-failed-{rows}-s{size}", rows, size, failed_only=True
        ).parent
    deadline = max(h.deadline("driver"), time.time() + FIT_MIN_S["quick" if h.quick else "full"])
    t0 = time.time()
    try:
        child = _run_child(
            1, roots, warm, 1, deadline, name="fit", idle_probe_s=IDLE_PROBE_S, idle_probe_reps=IDLE_PROBE_REPS
        )
    except Exception as err:  # noqa: BLE001 - the main runs' figures stand; the fit uses what it has
        log.error("driver fit runs: %s", err)
        child = {"error": f"{type(err).__name__}: {err}"}
        h.note(f"Driver fit: its extra runs FAILED — {str(err).strip().splitlines()[0][:300]}")
    child["seconds"] = time.time() - t0
    if child.get("cut_short"):
        h.cut["driver, fit runs"] = child["cut_short"]["driver"]
    points = [
        {"run": f"{m['samples']}x{size}", "from": "main", **_point(m)}
        for size, runs in one_node.get("runs", {}).items()
        for m in runs
    ]
    points += [
        {"run": label, "from": "fit", **_point(m)} for label, runs in child.get("runs", {}).items() for m in runs
    ]
    probes = child.get("idle_probe", [])
    fits = fit_driver_cpu(points, probes)
    _report_fit(h, points, probes, fits)
    _report_fast(h, child.get("runs", {}), one_node.get("runs", {}))
    return {"points": points, "idle_probe": probes, "fits": fits, "child": child}


def _report_fast(
    h: Harness, fit_runs: dict[str, list[dict[str, Any]]], main_runs: dict[str, list[dict[str, Any]]]
) -> None:
    """Driver CPU per sample measured as the issue does (over a whole run), at the highest row rate this machine
    streams."""
    fast = [m for label, runs in fit_runs.items() if label.endswith(FAST) for m in runs]
    real = [m for runs in main_runs.values() for m in runs]
    if not fast:
        return
    m = max(fast, key=lambda r: r["samples_per_s"])
    h.add(
        "driver",
        "driver CPU per sample at the highest row rate",
        f"ms of driver-process CPU per sample over a "
        f"whole dry run of {m['samples']:,} failed downloads in shards of {m['samples'] // m['shards']:,} "
        f"({m['samples_per_s']:,.0f} rows/s: every stage and the bookkeeping per row, no decode); no side to "
        f"compare in this run (issue 10 quoted {QUOTED_ROW_HOLDING_MS_PER_ROW} ms for the row-holding driver)",
        m["driver_cpu_ms_per_sample"],
        None,
    )
    if real:
        r = max(real, key=lambda x: x["samples"] / x["shards"])
        h.add(
            "driver",
            "driver CPU per wall second, fastest run / real images",
            f"cores (driver CPU s / wall s) at "
            f"{m['samples_per_s']:,.0f} rows/s / at {r['samples_per_s']:,.0f} rows/s (real images, shards of "
            f"{r['samples'] // r['shards']:,}): flat means the driver's cost is per second, not per row",
            m["driver_cores"],
            r["driver_cores"],
            FLAT,
        )
        h.note(
            f"Driver at high row rates: {m['samples']:,} failed "
            "downloads (rows without an image, settled by every stage "
            f"without decoding) stream at {m['samples_per_s']:,.0f} rows/s on this machine against "
            f"{r['samples_per_s']:,.0f} rows/s for real images, and the driver's CPU per wall second stays "
            f"{m['driver_cores']:.3f} vs {r['driver_cores']:.3f} "
            "cores: what the driver spends follows the run's length "
            "(Ray Data's executor loop and the iterator's polling), "
            "not its rows. Its CPU per sample is therefore about "
            "(cores per second) / (rows per second): "
            f"{m['driver_cpu_ms_per_sample']:.3f} ms at {m['samples_per_s']:,.0f} "
            f"rows/s, {QUOTED_ROW_HOLDING_MS_PER_ROW / 20:.3f} ms (20x below the {QUOTED_ROW_HOLDING_MS_PER_ROW} ms "
            "issue 10 quoted for the row-holding driver, not measured here) from about "
            f"{20 * m['driver_cores'] / QUOTED_ROW_HOLDING_MS_PER_ROW * 1000:,.0f} rows/s, i.e. about "
            f"{20 * m['driver_cores'] / QUOTED_ROW_HOLDING_MS_PER_ROW * 1000 / GPU_IMAGES_PER_S:,.0f} "
            "captioning GPUs at "
            f"{GPU_IMAGES_PER_S:.0f} images/s; a real image costs the "
            "data path ~4 ms of CPU, so the 2 cores here cannot "
            "stream real images at that rate."
        )


def _point(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("samples", "shards", "wall_s", "driver_cpu_s")}


def _lstsq(x: Any, y: Any, names: list[str]) -> dict[str, Any]:
    """Least squares with standard errors (σ² (XᵀX)⁻¹ from the residuals) and R²."""
    import numpy as np

    n, k = x.shape
    if n < k:
        return {"error": f"{n} runs for {k} unknowns"}
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    dof = n - k
    sigma2 = float(resid @ resid) / dof if dof > 0 else float("nan")
    try:
        se = np.sqrt(np.clip(np.diag(sigma2 * np.linalg.inv(x.T @ x)), 0, None))
    except np.linalg.LinAlgError:
        se = np.full(k, float("nan"))
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "coef": dict(zip(names, map(float, coef), strict=True)),
        "se": dict(zip(names, map(float, se), strict=True)),
        "runs": n,
        "dof": dof,
        "r2": 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else None,
        "residuals_s": [float(r) for r in resid],
        "cond": float(np.linalg.cond(x)),
    }


def fit_driver_cpu(points: list[dict[str, Any]], probes: list[dict[str, Any]]) -> dict[str, Any]:
    """driver CPU = a·wall + b·rows + c·shards, by least squares over the runs; also with a constant per run (d),
    and with ``a`` fixed at the idle probe's (so that b, c, d need not be told apart from wall time, which grows with
    rows)."""
    import numpy as np

    if not points:
        return {}
    wall = np.array([p["wall_s"] for p in points], float)
    rows = np.array([p["samples"] for p in points], float)
    shards = np.array([p["shards"] for p in points], float)
    cpu = np.array([p["driver_cpu_s"] for p in points], float)
    ones = np.ones_like(wall)
    fits = {
        "a·wall + b·rows + c·shards": _lstsq(np.column_stack([wall, rows, shards]), cpu, ["a", "b", "c"]),
        "a·wall + b·rows + c·shards + d": _lstsq(
            np.column_stack([wall, rows, shards, ones]), cpu, ["a", "b", "c", "d"]
        ),
    }
    one = np.array([p["shards"] == 1 for p in points])
    if len({p["samples"] for p in points if p["shards"] == 1}) >= 2:
        fits["one-shard runs: slope over rows"] = _lstsq(
            np.column_stack([rows[one], ones[one]]), cpu[one], ["per_row", "per_run"]
        )
    if probes:
        a = float(statistics.median(p["driver_cores"] for p in probes))
        f = _lstsq(np.column_stack([rows, shards, ones]), cpu - a * wall, ["b", "c", "d"])
        if "coef" in f:
            f["coef"]["a"], f["se"]["a"] = a, float(np.std([p["driver_cores"] for p in probes]))
        fits["a from the idle probe; b·rows + c·shards + d"] = f
    return fits


def _report_fit(h: Harness, points: list[dict[str, Any]], probes: list[dict[str, Any]], fits: dict[str, Any]) -> None:
    ok = {k: f for k, f in fits.items() if "coef" in f and "b" in f["coef"]}
    rows = [
        [
            name,
            f["runs"],
            f["coef"].get("a"),
            f["se"].get("a"),
            1000 * f["coef"]["b"],
            1000 * f["se"]["b"],
            1000 * f["coef"]["c"],
            1000 * f["se"]["c"],
            None if "d" not in f["coef"] else 1000 * f["coef"]["d"],
            None if "d" not in f["se"] else 1000 * f["se"]["d"],
            f["r2"],
        ]
        for name, f in ok.items()
    ]
    h.table(
        "Driver CPU split by least squares (one node, every dry run below): a = cores per wall second (Ray Data's "
        "executor polling), b = ms per row, c = ms per shard, d = ms per run; ± one standard error",
        [
            "model",
            "runs",
            "a (cores)",
            "± a",
            "b (ms/row)",
            "± b",
            "c (ms/shard)",
            "± c",
            "d (ms/run)",
            "± d",
            "R²",
        ],
        rows,
    )
    main = ok.get("a·wall + b·rows + c·shards")
    resid = main["residuals_s"] if main else [None] * len(points)
    h.table(
        "Driver fit: the raw runs (one node; each its own dry run, driver CPU from getrusage)",
        [
            "run (samples x shard size)",
            "from",
            "samples",
            "shards",
            "wall s",
            "driver CPU s",
            "driver cores",
            "driver CPU ms/sample",
            "residual of a·wall + b·rows + c·shards (s)",
        ],
        [
            [
                p["run"],
                p["from"],
                p["samples"],
                p["shards"],
                p["wall_s"],
                p["driver_cpu_s"],
                p["driver_cpu_s"] / p["wall_s"],
                1000 * p["driver_cpu_s"] / p["samples"],
                r,
            ]
            for p, r in zip(points, resid, strict=True)
        ]
        + [["idle probe", "fit", 0, 0, q["wall_s"], q["driver_cpu_s"], q["driver_cores"], None, None] for q in probes],
    )
    if not main:
        h.note(
            "Driver fit: not enough runs for the least-squares split ("
            + "; ".join(f"{k}: {f.get('error', '')}" for k, f in fits.items())
            + ")."
        )
        return
    a, b, c = main["coef"]["a"], main["coef"]["b"], main["coef"]["c"]
    sb = main["se"]["b"]
    h.add(
        "driver",
        "driver CPU per wall second, fit (a) / idle probe",
        "cores: a of a·wall + b·rows + c·shards / driver "
        "CPU per second of a stream whose only task sleeps "
        f"{IDLE_PROBE_S:.0f} s (Ray Data's executor and iterator polling)",
        a,
        median(q["driver_cores"] for q in probes) if probes else None,
    )
    # The verdict is on the conservative bound b + 2σ: a b near zero with a small σ is a result, not noise.
    noisy = sb > abs(b) / 2 or main["r2"] is None or main["r2"] < 0.9
    h.add(
        "driver",
        "driver CPU per row, fit (b)",
        f"ms per row: b of a·wall + b·rows + c·shards over {main['runs']} one-node dry runs (±{1000 * sb:.4f} ms) "
        + QUOTED,
        1000 * b,
        None,
    )
    fit_ok = main["r2"] is not None and main["r2"] >= 0.9
    h.add(
        "driver",
        "driver CPU per row, fit's upper bound (b + 2σ)",
        f"ms per row: b plus two standard errors (R² {main['r2']:.3f}" + ("" if fit_ok else ", below 0.9") + ")",
        1000 * (b + 2 * sb),
        None,
    )
    slope = fits.get("one-shard runs: slope over rows")
    if slope and "coef" in slope:
        m, sm = slope["coef"]["per_row"], slope["se"]["per_row"]
        h.add(
            "driver",
            "driver CPU per extra row, one-shard runs",
            f"ms per row: slope of driver CPU over rows "
            f"across the {slope['runs']} one-shard runs (±{1000 * sm:.4f} "
            "ms), every extra second's cost charged to the "
            "rows (an upper bound on b that needs no a)",
            1000 * m,
            None,
        )
    h.add("driver", "driver CPU per shard, fit (c)", f"ms per shard (±{1000 * main['se']['c']:.1f})", 1000 * c, None)
    with_d = ok.get("a·wall + b·rows + c·shards + d")
    if with_d:
        h.add(
            "driver",
            "driver CPU per row, fit with a constant per run (b)",
            "ms per row: b of a·wall + b·rows + "
            f"c·shards + d (±{1000 * with_d['se']['b']:.4f} ms; d = {1000 * with_d['coef']['d']:.0f} ms per run)",
            1000 * with_d["coef"]["b"],
            None,
        )
    # Flat: a driver that held rows would cost more per wall second with larger shards (the same rows, fewer of them
    # at once); the driver's share of a core, large shards against shards of the smallest size, does not depend on
    # the fit.
    cores: dict[float, list[float]] = {}
    for p in points:
        if not p["run"].endswith(FAST):  # real images only: the shard size is what varies
            cores.setdefault(p["samples"] / p["shards"], []).append(p["driver_cpu_s"] / p["wall_s"])
    small, large = min(cores), max(cores)
    if large > small:
        h.add(
            "driver",
            f"driver CPU per wall second, shards of {large:,.0f} / of {small:,.0f}",
            "cores (driver CPU s / "
            "wall s), medians over the one-node runs of each shard size (flat: no growth with shard size)",
            median(cores[large]),
            median(cores[small]),
            FLAT,
        )
    wall_per_row = statistics.median(p["wall_s"] / p["samples"] for p in points)
    below = f"{QUOTED_ROW_HOLDING_MS_PER_ROW / (1000 * b):,.0f}x below" if b > 0 else "b ≤ 0, no per-row cost below"
    bound = b + 2 * sb
    h.note(
        f"Driver fit: driver CPU ≈ {a:.4f} cores × wall s + {1000 * b:.4f} ms × rows + {1000 * c:.1f} ms × shards over "
        f"{main['runs']} one-node dry runs (R² {main['r2']:.3f}): per row {below} the "
        f"{QUOTED_ROW_HOLDING_MS_PER_ROW} ms issue 10 quoted for the row-holding driver (not measured here)"
        + (
            f"; upper bound b + 2σ = {1000 * bound:.4f} ms "
            f"({QUOTED_ROW_HOLDING_MS_PER_ROW / (1000 * bound):,.1f}x below). "
            if bound > 0
            else ". "
        )
        + (
            "b is within two standard errors of zero: the rows' own cost is below what these runs resolve, and the "
            "bound is the figure to read"
            + (
                " (a b below zero says a is not one constant: Ray Data's loop also wakes "
                "for each finished task, and on a shared machine the polling threads wait for a core)"
                if b <= 0
                else ""
            )
            + ". "
            if noisy
            else ""
        )
        + (
            f"With a constant per run (d = {1000 * with_d['coef']['d']:.0f} ms: planning, lease, Ray Data's plan and "
            f"start; R² {with_d['r2']:.3f}): b = {1000 * with_d['coef']['b']:.4f} "
            f"± {1000 * with_d['se']['b']:.4f} ms per "
            f"row, c = {1000 * with_d['coef']['c']:.0f} ± {1000 * with_d['se']['c']:.0f} ms per shard. "
            if with_d and with_d.get("r2") is not None
            else ""
        )
        + (
            "Slope over the one-shard runs, all extra wall time's cost "
            f"charged to rows: {1000 * slope['coef']['per_row']:.4f}"
            f" ± {1000 * slope['se']['per_row']:.4f} ms per row. "
            if slope and "coef" in slope
            else ""
        )
        + f"In the real-image runs wall time grows with rows ({1000 * wall_per_row:.0f} ms of wall per row, median "
        f"over all runs), so alone they cannot tell a from b (an error of 0.001 cores in a moves b by "
        f"{wall_per_row:.3f} ms per row); the failed-downloads runs stream an order of magnitude more rows per second, "
        "which is what separates them. The other two models in the table (a constant per run, d; a fixed at the idle "
        "probe's) show how much b depends on the model. "
        + "Each run is one dry run in the same driver process; the idle probe is a vecap-shaped Ray Data stream with "
        "one sleeping task. Ray Data's executor thread loops every "
        "0.1 s (ray.wait timeout) and the consumer polls every "
        "0.01 s whatever the rows: that is a. DataContext switches tried against the probe (issue detectors off, auto "
        "log stats off, operator progress bars off, op resource "
        "reservation off; progress bars are already off) did not "
        "lower it beyond noise (0.066–0.093 cores each, on this 2-core machine), so vecap keeps Ray Data's defaults."
    )


def _run_child(
    nodes: int, roots: dict[Any, Path], warm: Path, reps: int, deadline: float, name: str = "", **extra: Any
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="vecap-bench-driver-", dir="/tmp"))
    spec = {
        "nodes": nodes,
        "roots": {str(k): str(v) for k, v in roots.items()},
        "warmup_root": str(warm),
        "reps": reps,
        "deadline": deadline,
        "num_cpus": NUM_CPUS,
        "object_store_mb": OBJECT_STORE_MB,
        "out": str(tmp / "result.json"),
        **extra,
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    log_path = WORK / "runs" / f"driver-{name or f'{nodes}-nodes'}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_TMPDIR=str(tmp))  # a private Ray temp dir: no ray_current_cluster file left for others
    timeout = max(120.0, deadline - time.time() + 300)  # a run started within the budget may end after it
    try:
        with open(log_path, "w") as logf:
            rc = subprocess.call(
                [sys.executable, "-m", "bench.driver", "--child", str(tmp / "spec.json")],
                cwd=REPO,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if rc != 0 or not (tmp / "result.json").exists():
            tail = log_path.read_text()[-1500:]
            raise RuntimeError(f"driver child ({nodes} node(s)) exited with {rc}; see {log_path}:\n{tail}")
        return json.loads((tmp / "result.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report(
    h: Harness, summary: dict[str, dict[str, dict[str, Any]]], n: int, sizes: tuple[int, ...], quick: bool
) -> None:
    small, large = str(min(sizes)), str(max(sizes))
    one, two = summary.get("1", {}), summary.get("2", {})

    def get(cfg: dict[str, Any], size: str, key: str) -> float | None:
        return cfg.get(size, {}).get(key)

    for size in (small, large):
        h.add(
            "driver",
            f"driver CPU per sample, shards of {int(size):,}",
            f"ms of driver-process CPU per sample over a whole dry run of {n:,} samples, one node " + QUOTED,
            get(one, size, "driver_cpu_ms_per_sample"),
            None,
        )
    h.add(
        "driver",
        f"driver main thread CPU per sample, shards of {int(small):,}",
        "ms per sample: the driver's main "
        "thread only (vecap's loop, Ray Data's planning and iterator; not its executor thread nor Ray's core threads)",
        get(one, small, "driver_main_ms_per_sample"),
        None,
    )
    h.add(
        "driver",
        "driver CPU per wall second",
        f"CPU seconds per second of the run (share of one core), one node, "
        f"shards of {int(large):,} / of {int(small):,}",
        get(one, large, "driver_cores"),
        get(one, small, "driver_cores"),
    )
    extra = (get(one, small, "shards") or 0) - (get(one, large, "shards") or 0)
    if extra > 0:

        def per_shard(key: str, scale: float) -> float | None:
            a, b = get(one, small, key), get(one, large, key)
            return None if a is None or b is None else scale * (a - b) / extra

        how = (
            f"from the two one-node runs of the same {n:,} samples: (CPU in shards of {int(small):,} − in shards of "
            f"{int(large):,}) / {extra} extra shards (the longer run's per-second costs included)"
        )
        h.add("driver", "driver CPU per extra shard (ms)", how, per_shard("driver_cpu_s", 1000.0), None)
        h.add(
            "driver",
            "data path CPU per extra shard (s)",
            how.replace("CPU in", "Ray process tree CPU in"),
            per_shard("tree_cpu_s", 1.0),
            None,
        )
    h.add(
        "driver",
        f"driver CPU per sample, shards of {int(large):,} / of {int(small):,}",
        "ms per sample, one node (flat: the driver's cost does not grow with shard size)",
        get(one, large, "driver_cpu_ms_per_sample"),
        get(one, small, "driver_cpu_ms_per_sample"),
        FLAT,
    )
    h.add(
        "driver",
        "driver CPU per sample, 2 nodes / 1 node",
        f"ms per sample, shards of {int(small):,}",
        get(two, small, "driver_cpu_ms_per_sample"),
        get(one, small, "driver_cpu_ms_per_sample"),
        FLAT,
    )
    h.add(
        "driver",
        "driver CPU per wall second, 2 nodes / 1 node",
        f"cores, shards of {int(small):,} (b: per second, "
        "which leaves out how long two Ray nodes sharing this machine's cores take)",
        get(two, small, "driver_cores"),
        get(one, small, "driver_cores"),
    )
    h.add(
        "driver",
        f"driver peak RSS, shards of {int(large):,} / of {int(small):,}",
        "MiB, one node",
        get(one, large, "driver_peak_rss_mib"),
        get(one, small, "driver_peak_rss_mib"),
        FLAT,
    )
    h.add(
        "driver",
        "driver peak RSS, 2 nodes / 1 node",
        f"MiB, shards of {int(small):,}",
        get(two, small, "driver_peak_rss_mib"),
        get(one, small, "driver_peak_rss_mib"),
        FLAT,
    )
    for size in (large, small):
        h.add(
            "driver",
            f"data path: samples/s per CPU core, shards of {int(size):,}",
            "samples / CPU seconds of the whole Ray process tree, one node",
            get(one, size, "samples_per_s_per_core"),
            None,
        )
        h.add(
            "driver",
            f"CPU cores needed per GPU at {GPU_IMAGES_PER_S:.0f} images/s, shards of {int(size):,}",
            f"{GPU_IMAGES_PER_S:.0f} × CPU seconds per sample of the whole Ray process tree, one node (B: from the "
            "steps' own timings, wall time inside each step)",
            get(one, size, "cores_per_gpu_at_50"),
            get(one, size, "steps_cores_per_gpu_at_50"),
        )
    runs = []
    for nodes, by_size in summary.items():
        for size, m in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            threads = ", ".join(f"{k} {v:.2f}" for k, v in list(m.get("driver_threads_cpu_s", {}).items())[:4] if v)
            runs.append(
                [
                    nodes,
                    f"{int(size):,}",
                    m["shards"],
                    m["samples"],
                    m["wall_s"],
                    m["samples_per_s"],
                    m["driver_cpu_s"],
                    m["driver_cpu_ms_per_sample"],
                    m["driver_main_ms_per_sample"],
                    m["driver_cpu_s_per_10k"],
                    m["driver_cores"],
                    m["driver_peak_rss_mib"],
                    m["driver_rss_growth_mib"],
                    m["cpu_ms_per_sample"],
                    m["cores_per_gpu_at_50"],
                    threads,
                ]
            )
    h.table(
        f"Data path (dry run, {RECIPE} recipe, {n:,} samples per run{', quick sizes' if quick else ''})",
        [
            "nodes",
            "shard size",
            "shards",
            "samples",
            "wall s",
            "samples/s",
            "driver CPU s",
            "driver CPU ms/sample",
            "main thread ms/sample",
            "driver CPU s per 10k",
            "driver cores",
            "driver peak RSS MiB",
            "RSS growth MiB",
            "tree CPU ms/sample",
            f"cores/GPU @{GPU_IMAGES_PER_S:.0f} img/s",
            "driver CPU by thread (s)",
        ],
        runs,
    )
    steps = []
    for nodes, by_size in summary.items():
        for size, m in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            per = m.get("steps_ms_per_sample", {})
            steps.append([nodes, f"{int(size):,}", *[per.get(k) for k in STEPS], sum(v or 0 for v in per.values())])
    h.table(
        "Data path steps: ms per sample (the markers' timings: wall time inside each step)",
        ["nodes", "shard size", *[k[2:] for k in STEPS], "sum"],
        steps,
    )
    cpu_rows = []
    for nodes, by_size in summary.items():
        for size, m in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            per = m.get("cpu_steps_s_per_sample", {})
            total = m.get("cpu_s_per_sample")
            cpu_rows.append(
                [
                    nodes,
                    f"{int(size):,}",
                    *[1000 * (per.get(k) or 0) for k in CPU_STEPS],
                    None if total is None else 1000 * total,
                    *[None if total is None else rate * total for rate in RATES],
                    m["cores_per_gpu_at_50"],
                ]
            )
    h.table(
        "CPU side per sample outside the engines (dry run; the markers' cpu_* seconds, write: wall): ms per sample, "
        "and CPU cores per GPU at a GPU's images/s",
        [
            "nodes",
            "shard size",
            *CPU_STEPS.values(),
            "sum (ms)",
            *[f"cores/GPU @{r:.0f} img/s" for r in RATES],
            "whole Ray tree, cores/GPU @50",
        ],
        cpu_rows,
    )
    big = one.get(large, {})
    if big.get("cpu_s_per_sample") is not None:
        h.add(
            "driver",
            f"CPU-seconds per sample outside the engines, shards of {int(large):,}",
            "ms: sum of the steps' "
            "process CPU (read + decode + resize, caption check, fuse prompts, fuse check, write) / the whole Ray "
            "process tree's CPU per sample (Ray's own costs included)",
            1000 * big["cpu_s_per_sample"],
            big["cpu_ms_per_sample"],
        )
        h.add(
            "driver",
            f"CPU cores per GPU at {GPU_IMAGES_PER_S:.0f} images/s",
            "the steps' CPU / the whole tree's",
            GPU_IMAGES_PER_S * big["cpu_s_per_sample"],
            big["cores_per_gpu_at_50"],
        )
    h.note(
        "Data path: each configuration runs in its own driver "
        f"process (one Ray instance, {NUM_CPUS} logical CPUs split "
        "between its nodes, one warm-up run first); `vecap.pipeline.run(cfg, "
        f"dry_run=True)` with the packaged `{RECIPE}` "
        f"recipe and {', '.join(OVERRIDES)}. Inputs: the generated "
        f"sample repacked into {n:,} samples (each image repeated)"
        + (" — quick sizes: the issue's figures are for 10,000 samples (`python -m bench`)." if quick else ".")
    )
    h.note(
        "Driver CPU is the driver process's getrusage(RUSAGE_SELF) "
        "over the run (every thread: vecap's loop, Ray Data's "
        "executor, Ray's core worker), less the bench's sampler thread; 'driver cores' is that per wall second. The "
        "before-figure is issue 10's fit of the row-holding driver: 0.7 ms per row plus 34 ms per shard."
    )
    h.note(
        "Cores per GPU: CPU seconds of the whole Ray process tree "
        "(driver, GCS, raylets, workers, actors) per sample × 50 "
        "images/s; it includes Ray's fixed overheads, which weigh more on a small, slow machine. Step timings are wall "
        "time inside each step: on a shared 2-core machine they include waiting for a core."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="one driver configuration of the data-path benchmark (run by `python -m bench`)"
    )
    p.add_argument("--child", required=True, help="spec JSON written by the bench")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_env()
    spec = json.loads(Path(args.child).read_text())
    result = child(spec)
    Path(spec["out"]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
