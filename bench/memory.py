"""Memory section: peak memory of a whole ``vecap`` run over N and over 4N samples.

Each run is a ``python -m vecap.cli`` subprocess (its own local Ray) whose process tree
(Ray's GCS, raylet, workers, engine actors) is sampled by :class:`bench.harness.TreeSampler`.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from bench.context import REPO, WORK, Ctx, read_markers
from bench.harness import Target, timed

log = logging.getLogger("bench")

FLAT = Target("<=", 1.3)


def memory_run(ctx: Ctx, shards: list[str], name: str) -> dict[str, Any]:
    import os

    from bench.harness import TreeSampler
    from vecap.layout import Layout

    root = ctx.fresh_root(name)
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    cmd = [
        sys.executable,
        "-m",
        "vecap.cli",
        ctx.sizes.memory_command,
        "--config",
        "demo",
        "--no-progress",
        "--set",
        f"root={root}",
        "--set",
        f"caption.model={ctx.tiny['llava']}",
        "--set",
        f"fuse.model={ctx.tiny['llama']}",
        "--shards",
        *shards,
    ]
    log_path = WORK / "runs" / f"{name}.log"
    timeout = max(60.0, ctx.harness.left("memory") + 60)
    with open(log_path, "w") as logf:
        child = subprocess.Popen(
            cmd, cwd=REPO, env=dict(os.environ, RAY_TMPDIR=ray_tmp), stdout=logf, stderr=subprocess.STDOUT
        )
        with TreeSampler(child.pid, tree_every_s=0.25) as sampler:

            def wait() -> int:
                try:
                    return child.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    child.kill()
                    return child.wait()

            wall, rc = timed(wait)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        raise RuntimeError(f"memory run {name} failed (exit {rc}); see {log_path}")
    step = "write" if ctx.sizes.memory_command == "run" else "caption"
    rows = sum(int(m.get("n_rows", 0)) for m in read_markers(Layout(str(root)), step).values())
    shutil.rmtree(root)
    return {"shards": len(shards), "samples": rows, "wall_s": wall, **sampler.result()}


def bench_memory(ctx: Ctx) -> dict[str, Any]:
    h = ctx.harness
    k = ctx.sizes.memory_shards
    if 4 * k > len(ctx.shards):
        raise RuntimeError(f"need {4 * k} shards, have {len(ctx.shards)}")
    small = memory_run(ctx, ctx.shards[:k], "memory-n")
    log.info(
        "memory: N=%d samples, peak PSS %.0f MiB (%.0fs)", small["samples"], small["tree_peak_pss_mib"], small["wall_s"]
    )
    large = memory_run(ctx, ctx.shards[: 4 * k], "memory-4n")
    log.info(
        "memory: 4N=%d samples, peak PSS %.0f MiB (%.0fs)",
        large["samples"],
        large["tree_peak_pss_mib"],
        large["wall_s"],
    )
    cmd = ctx.sizes.memory_command
    h.add(
        "memory",
        "memory: 4N / N",
        f"peak PSS (MiB) of the `vecap {cmd}` process tree, tiny models, "
        f"N={small['samples']} samples, 4N={large['samples']}",
        large["tree_peak_pss_mib"],
        small["tree_peak_pss_mib"],
        FLAT,
    )
    h.add(
        "memory",
        "memory: 4N / N (b)",
        "peak RSS summed over the tree (MiB; shared pages counted in every process)",
        large["tree_peak_rss_sum_mib"],
        small["tree_peak_rss_sum_mib"],
    )
    h.add(
        "memory",
        "memory: 4N / N (c), driver",
        f"peak RSS of the `vecap {cmd}` process itself (MiB)",
        large["root_peak_rss_mib"],
        small["root_peak_rss_mib"],
        FLAT,
    )
    return {"command": cmd, "n": small, "4n": large, "models": {k: str(v) for k, v in ctx.tiny.items()}}
