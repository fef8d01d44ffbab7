"""The cost of one engine-core death: seconds from a SIGKILL of the engine core to the actor's
restart and to the stage's next commit, with the engine core in its own process (as on a GPU).

``python -m bench.stall [--stage fuse] [--reps 2] [--shards 12]``: runs the demo recipe (tiny
models, ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` for both engine stages) over repacked sample
shards in this process; once the stage has committed its first shard, a monitor thread SIGKILLs
the ``VLLM::EngineCore`` child of the stage's engine actor and times, from the kill:

- *restart*: a new engine actor process of the stage exists (Ray restarted the actor);
- *engine up*: that actor's engine core exists again (vLLM is loading the model);
- *next commit*: the stage's first ``_done`` marker after that engine is up, the end of the stall
  (*any commit*: the first marker after the kill, often a shard whose batches were back before it).

Also printed: the stage's engine start-up (``<stage>_engine_start_s`` in the markers, summed
over the starts of the run), which is most of the stall on this machine and a few seconds to
minutes on a GPU, and whether the output equals a run without the kill. Results go to
``bench/results/stall.{md,json}``. ``--set KEY=VALUE`` passes recipe overrides (e.g. a
``caption.call_timeout_s``) to both runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.context import RESULTS, WORK, set_env
from bench.harness import Harness, median

log = logging.getLogger("bench")

WORKERS = {"caption": "MapBatches(CaptionWorker)", "fuse": "MapBatches(FuseWorker)"}
FOLDERS = {"caption": "captions", "fuse": "fused"}
CORE = "VLLM::EngineCore"
MOMENTS = ("first_commit", "restart", "engine_up", "next_commit")  # seconds from the kill, in the table's order


def _actors(worker: str) -> list[Any]:
    import psutil

    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if worker in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _cores(worker: str) -> list[Any]:
    import psutil

    out = []
    for actor in _actors(worker):
        try:
            out += [c for c in actor.children() if c.name() == CORE]
        except psutil.Error:
            continue
    return out


class StallMonitor(threading.Thread):
    """Kills the stage's engine core after its first commit and times what follows."""

    def __init__(self, root: Path, stage: str, timeout_s: float = 1800) -> None:
        super().__init__(daemon=True)
        self.root, self.worker, self.done = root, WORKERS[stage], root / FOLDERS[stage] / "_done"
        self.deadline = time.time() + timeout_s
        self.times: dict[str, float] = {}
        self.killed: dict[str, Any] = {}

    def _commits(self) -> dict[str, float]:
        return {p.name: p.stat().st_mtime for p in self.done.glob("*.json")} if self.done.exists() else {}

    def run(self) -> None:
        while time.time() < self.deadline and not (self._commits() and _cores(self.worker)):
            time.sleep(0.05)
        (core,) = _cores(self.worker)[:1] or [None]
        if core is None:
            return
        old_actors = {p.pid for p in _actors(self.worker)}
        before = set(self._commits())
        self.killed = {"pid": core.pid, "name": core.name(), "commits_before": len(before)}
        t0 = time.time()
        core.send_signal(signal.SIGKILL)
        # A shard whose batches were back before the kill may still commit during the stall: the
        # stall ends with the first commit after the restarted actor's engine is up.
        while time.time() < self.deadline and "next_commit" not in self.times:
            now = time.time()
            if "restart" not in self.times and {p.pid for p in _actors(self.worker)} - old_actors:
                self.times["restart"] = now - t0
            if "restart" in self.times and "engine_up" not in self.times and _cores(self.worker):
                self.times["engine_up"] = now - t0
            later = sorted(v - t0 for k, v in self._commits().items() if k not in before)
            if later and "first_commit" not in self.times:
                self.times["first_commit"] = later[0]
            after_up = [t for t in later if "engine_up" in self.times and t >= self.times["engine_up"]]
            if after_up:
                self.times["next_commit"] = after_up[0]
            time.sleep(0.05)


def _run(root: Path, models: dict[str, Path], stage: str | None, overrides: list[str]) -> dict[str, Any]:
    from vecap.config import load_config
    from vecap.pipeline import run

    mp = json.dumps({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    cfg = load_config(
        "demo",
        [
            f"root={root}",
            f"caption.model={models['llava']}",
            f"fuse.model={models['llama']}",
            f"caption.env={mp}",
            f"fuse.env={mp}",
            "caption.batch_size=4",
            "fuse.batch_size=4",
            *overrides,
        ],
    )
    monitor = StallMonitor(root, stage) if stage else None
    if monitor:
        monitor.start()
    t0 = time.time()
    result = run(cfg, progress=False)
    wall = time.time() - t0
    if monitor:
        monitor.join(timeout=5)
    from vecap.layout import Layout
    from vecap.outputs import StageOutput

    markers = StageOutput(Layout(str(root)), stage or "fuse").markers()
    engine: dict[str, float] = {}
    for m in markers.values():
        for k, v in (m.get("engine") or {}).items():
            engine[k] = engine.get(k, 0.0) + float(v)
    return {
        "wall_s": wall,
        "failed": dict(result.failed),
        "times": monitor.times if monitor else {},
        "killed": monitor.killed if monitor else {},
        "engine": engine,
        "restarts": result.engine_restarts.get(stage or "fuse", 0),
    }


def _mean_start(engine: dict[str, float], stage: str) -> float:
    """Seconds per engine start of the stage, from the markers' summed engine stats."""
    return engine.get(f"{stage}_engine_start_s", 0) / max(engine.get(f"{stage}_engine_starts", 1), 1)


def _fused_rows(root: Path) -> list[dict[str, Any]]:
    from vecap.layout import Layout
    from vecap.outputs import StageOutput

    out = StageOutput(Layout(str(root)), "fuse")
    return [r for s in sorted(out.done()) for r in out.read_table(s).to_pylist()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(WORKERS), default="fuse")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    set_env()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bench.data import repack, sample_images
    from vecap.demo.tiny_models import build_tiny_models
    from vecap.ray_env import start_local_ray

    models = build_tiny_models(WORK / "models", scale="tiny")
    sample = sample_images(WORK / "data" / "stall-sample", 32, 8)
    start_local_ray(num_cpus=8, object_store_memory=400 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    harness = Harness({"stall": 1e9}, reps=args.reps)
    rows, clean = [], None
    for rep in range(args.reps + 1):
        root = WORK / "stall" / f"root-{rep}"
        shutil.rmtree(root, ignore_errors=True)
        repack(sample, root, args.shards * args.shard_size, args.shard_size)
        killed = rep > 0  # the first run is the clean reference
        out = _run(root, models, args.stage if killed else None, args.overrides)
        out["equal_to_clean"] = None if not killed else _fused_rows(root) == clean
        if not killed:
            clean = _fused_rows(root)
        rows.append(out)
        log.info("run %d: %s", rep, json.dumps(out, default=str))
    kills = [r for r in rows[1:] if r["times"]]
    stage = args.stage
    table = [
        [
            i + 1,
            r["killed"].get("pid"),
            *(f"{r['times'].get(k, float('nan')):.1f}" for k in MOMENTS),
            f"{_mean_start(r['engine'], stage):.1f}",
            r["restarts"],
            f"{r['wall_s']:.0f}",
            f"{rows[0]['wall_s']:.0f}",
            r["equal_to_clean"],
        ]
        for i, r in enumerate(kills)
    ]
    harness.table(
        f"One SIGKILL of the {stage} actor's engine core (engine core in its own process)",
        [
            "kill",
            "core pid",
            "any commit s",
            "restart s",
            "engine core up s",
            "next commit s",
            "mean engine start s",
            "restarts",
            "run wall s",
            "clean run wall s",
            "output = clean run's",
        ],
        table,
    )
    stall = median(r["times"].get("next_commit") for r in kills)
    harness.note(
        f"Stall (kill → the stage's next commit), median of {len(kills)}: "
        f"{stall if stall is None else round(stall, 1)} s. Seconds from the SIGKILL; any commit = the first marker "
        "after it; restart = a new engine actor process of the stage; engine core up = its "
        "engine-core child exists (the model is loading); next commit = the first marker after that; restarts = "
        "RunResult.engine_restarts of the stage. The stall is mostly that engine start on this machine."
    )
    md = harness.write(
        args.out,
        "stall",
        "vecap: the stall of one engine-core death",
        stage=stage,
        shards=args.shards,
        shard_size=args.shard_size,
        overrides=args.overrides,
    )
    print(md.read_text())
    ok = kills and len(kills) == args.reps and all(r["equal_to_clean"] and not r["failed"] for r in kills)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
