"""A chaos run: random kills of engine actors, a worker node and the driver over a multi-shard run.

``python -m bench.chaos [--shards 12] [--seed 0]``: builds a root of repacked sample shards, then
runs ``vecap run`` (the demo recipe, tiny models) as a driver process on a two-node cluster on
this machine, while a chaos thread SIGKILLs random engine actor processes and removes the worker
node at random times; the driver itself is SIGKILLed at a random time and started again until the
run completes. At the end it counts, over the committed outputs: keys lost, keys written twice,
and silent fallbacks (rows whose VeC caption fell back because of the infrastructure).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.context import WORK, set_env

DRIVER = textwrap.dedent(
    """
    import json, os, random, signal, sys, threading, time
    from pathlib import Path
    import psutil, ray
    from ray.cluster_utils import Cluster
    from vecap.config import load_config
    from vecap.pipeline import run

    root, models, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "object_store_memory": 250_000_000})
    worker = cluster.add_node(num_cpus=6, object_store_memory=250_000_000)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = load_config("demo", [f"root={root}", f"caption.model={models / 'tiny-llava'}",
                               f"fuse.model={models / 'tiny-llama'}", "caption.cpus_per_actor=1",
                               "fuse.cpus_per_actor=1", "caption.batch_size=4", "fuse.batch_size=4",
                               "max_inflight_shards=2"])
    events = []

    def chaos():
        time.sleep(rng.uniform(15, 30))
        for _ in range(rng.randint(2, 4)):  # engine actors, found among this driver's process tree
            procs = [p for p in psutil.Process().children(recursive=True)
                     if any(w in " ".join(p.cmdline()) for w in ("CaptionWorker", "FuseWorker"))]
            if procs:
                victim = rng.choice(procs)
                events.append(f"SIGKILL actor {victim.pid}")
                victim.send_signal(signal.SIGKILL)
            time.sleep(rng.uniform(5, 20))
        if worker in cluster.worker_nodes:
            events.append("remove worker node")
            cluster.remove_node(worker)

    threading.Thread(target=chaos, daemon=True).start()
    result = run(cfg, progress=False)
    print("RESULT " + json.dumps({"events": events, "failed": result.failed}), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_env()
    import shutil

    from bench.data import repack, sample_images
    from vecap import vocab
    from vecap.demo.tiny_models import build_tiny_models
    from vecap.layout import Layout
    from vecap.outputs import StageOutput
    from vecap.reader import ShardReader, list_shards

    models = build_tiny_models(WORK / "models", scale="tiny")
    models_dir = Path(models["llava"]).parent
    sample = sample_images(WORK / "data" / "chaos-sample", 32, 8)
    root = WORK / "chaos" / f"root-{args.seed}"
    shutil.rmtree(root, ignore_errors=True)
    images = repack(sample, root, args.shards * args.shard_size, args.shard_size)
    rng = random.Random(args.seed)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    attempts, driver_kills, events = 0, 0, []
    while True:
        attempts += 1
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(root), str(models_dir), str(args.seed + attempts)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        kill_at = time.time() + rng.uniform(40, 120) if driver_kills == 0 else None
        while proc.poll() is None:
            if kill_at is not None and time.time() > kill_at:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started
                driver_kills += 1
                events.append(f"attempt {attempts}: SIGKILL driver")
                break
            time.sleep(1)
        proc.wait()
        out = proc.stdout.read() if proc.stdout else ""
        for line in out.splitlines():
            if line.startswith("RESULT "):
                events += [f"attempt {attempts}: {e}" for e in json.loads(line[7:])["events"]]
        if proc.returncode == 0:
            break
        if attempts >= 6:
            print(f"the run did not complete in {attempts} attempts")
            return 1
    layout = Layout(str(root))
    expected = {s.key for shard in list_shards(str(images)) for s in ShardReader(str(images), shard)}
    written = [
        k
        for s in sorted(StageOutput(layout, "write").done())
        for k in StageOutput(layout, "write").read_table(s)["key"].to_pylist()
    ]
    fused = [
        r
        for s in sorted(StageOutput(layout, "fuse").done())
        for r in StageOutput(layout, "fuse").read_table(s).to_pylist()
    ]
    silent = [r for r in fused if r["reason"] in vocab.INFRA_REASONS]
    report = {
        "shards": args.shards,
        "samples": len(expected),
        "driver_attempts": attempts,
        "events": events,
        "keys_lost": len(expected - set(written)),
        "keys_duplicated": len(written) - len(set(written)),
        "infra_fallbacks": len(silent),
    }
    print(json.dumps(report, indent=2))
    return 0 if not (report["keys_lost"] or report["keys_duplicated"] or report["infra_fallbacks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
