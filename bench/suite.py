"""``python -m bench``: every CPU section in one run, results to ``bench/results/results.{json,md}``.

Sections, in the order they run (each one's figures come from public interfaces of vecap:
``pipeline.run``, the stages' markers and functions, ``load_engine``):

1. ``io``: the stages' read + decode + resize + commit path against a plain tarfile + PIL loop;
2. ``driver``: the data path with the dry run: driver CPU and memory per sample for shards of
   100 and of 10,000 samples, one node against two; CPU cores needed per GPU;
3. ``memory``: peak memory of a whole ``vecap`` run over N and 4N samples;
4. ``caption``: the caption stage against the bare vLLM engine given every request in one call
   (realistic output lengths, busy fractions), the stage's actor alone, and batch by batch;
5. ``fuse``: the same for the fuse stage, prefix caching on and off (on only with ``--quick``);
6. ``backends``: the vLLM backend against the hf backend, same requests, greedy, and a profile
   of one call on each (:mod:`bench.profile`);
7. ``peers``: ``vecap caption`` / ``vecap fuse`` against the same jobs written as a user's own Ray
   Data LLM script (:mod:`bench.peers`), each side a fresh process, alternating.

Sizes suit a 2-core machine: ``--quick`` about 12 minutes, the full run about 30 (the
data-path runs of 10,000 samples take up to 15 of them), plus the peers section (each side a
fresh process that starts Ray and its engine): about 9 minutes more with ``--quick``, 12 in full.
Each section has a time budget (:class:`bench.harness.Harness`): a loaded machine gives fewer
repetitions, said in the results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import FULL, QUICK, RESULTS, SECTIONS, Ctx, prepare, set_env
from bench.harness import Harness

log = logging.getLogger("bench")

NOTES = """\
A and B are medians over the repetitions; the two sides of a comparison run one after the other in each repetition, \
in alternating order, on the same inputs. Rows marked (b), (c) show the same comparison measured another way; only \
the first row of each carries the target.
Models: bench-scale random-weight LLaVA and Llama (`vecap.demo.tiny_models`, scale=bench) with the packaged `demo` \
recipe's settings (float32, eager); the memory runs use the tiny models.
Engine sections: realistic output lengths with random weights (`synthetic_lengths`: EOS ignored, each request stops \
after a length drawn from its seed, captions 8–40 tokens, fusions 20–80; the same draw on every side) and an engine \
max_num_seqs below the number of requests. Pipeline side: `vecap.pipeline.run(cfg, [stage], overwrite=True)` on a \
fresh root, with Ray started beforehand; requests / (run wall time − the actor's engine start-up, \
`<stage>_engine_start_s` in the markers' `engine` counters): planning, the first read, CPU steps sharing the cores and \
the last commit count against the stage (the markers carry no call timestamps). Actor side (b): the stage's own \
engine actor class driven in the bench process with max_batches_in_flight batches submitted, requests / (first call to \
last return). Single-call side: that actor's engine given all requests in one `generate` call (what a user's own \
script does); batch-by-batch: the same engine fed one batch after the other (the old baseline). Busy fraction: \
1 − underfull_steps / steps (steps running fewer than max_num_seqs sequences), from the engine counters; on a GPU it \
is the share of the engine's time doing full work, on a CPU step time grows with the batch. Engines' prefix, encoder \
and multimodal caches are emptied before each side.
Fuse input: captions committed through `vecap.outputs.StageOutput`, made of in-domain sentences (the random VLM's \
captions are mostly empty or byte soup, which the stage settles without the LLM). The bench tokenizer is a small BPE: \
the fuse prompt is ~3x longer in tokens than with Llama-3's tokenizer, which favours prefix caching.
Memory: psutil samples every 0.25 s of the `python -m vecap.cli` subprocess and all its descendants (Ray's GCS, \
raylet, workers, engine actors); PSS from /proc/<pid>/smaps_rollup."""


def _sections() -> dict[str, Callable[[Ctx], dict[str, Any]]]:
    from bench.driver import bench_driver
    from bench.engines import bench_backends, bench_caption, bench_fuse
    from bench.iopath import bench_io
    from bench.memory import bench_memory
    from bench.peers import bench_peers

    return {
        "io": bench_io,
        "driver": bench_driver,
        "memory": bench_memory,
        "caption": bench_caption,
        "fuse": bench_fuse,
        "backends": bench_backends,
        "peers": bench_peers,
    }


def main(quick: bool = False, sections: Sequence[str] = SECTIONS, out_dir: str | Path = RESULTS) -> int:
    """Run the chosen sections; write ``results.json`` and ``results.md``; 0 if every section ran."""
    set_env()
    sizes = QUICK if quick else FULL
    budgets = {k: v for k, v in sizes.budget_s.items() if k == "setup" or k in sections}
    harness = Harness(budgets, reps=sizes.reps, quick=quick)
    t0 = time.time()
    ctx = prepare(sizes, harness, need_models=bool(set(sections) & {"memory", "caption", "fuse", "backends", "peers"}))
    harness.section_s["setup"] = time.time() - t0
    fns = _sections()
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp  # a private Ray temp dir: no ray_current_cluster file left for others
    try:
        for name in SECTIONS:
            if name in sections:
                harness.section(name, partial(fns[name], ctx))
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for note in NOTES.split("\n"):
            harness.note(note)
        md = harness.write(
            out_dir,
            "results",
            "vecap benchmarks",
            sizes=asdict(sizes),
            sections=list(sections),
            config_overrides=ctx.overrides,
            data=str(ctx.images),
        )
    log.info("benchmark results (%s):\n%s", md, md.read_text())
    return 1 if harness.failed() else 0
