"""``python -m bench``: every CPU section in one run, results to ``bench/results/results.{json,md}``.

Sections, in the order they run (each one's figures come from public interfaces of vecap:
``pipeline.run``, the stages' markers and functions, ``load_engine``):

1. ``io``: the stages' read + decode + resize + commit path against a plain tarfile + PIL loop;
2. ``driver``: the data path with the dry run: driver CPU and memory per sample for shards of
   100 and of 10,000 samples, one node against two; CPU cores needed per GPU;
3. ``memory``: peak memory of a whole ``vecap`` run over N and 4N samples;
4. ``caption``: the caption stage against the bare vLLM engine on the same requests;
5. ``fuse``: the fuse stage against the bare engine, prefix caching on and off;
6. ``backends``: the vLLM backend against the hf backend, same requests, greedy.

Sizes suit a 2-core machine: ``--quick`` about 6 minutes, the full run about 25 (the
data-path runs of 10,000 samples take up to 15 of them). Each section has a time budget
(:class:`bench.harness.Harness`): a loaded machine gives fewer repetitions, said in the results.
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
Pipeline side: `vecap.pipeline.run(cfg, [stage], overwrite=True)` on a fresh root, with Ray started beforehand; \
requests / (run wall time − the start-up the stage records in its markers, `timings.engine_start_s`): planning, reads, \
CPU steps and commits count against the stage. Rows (b) use the markers' `t_caption_engine` / `t_fuse_engine` (the \
engine actor's calls summed; they overlap with several batches in flight, so those rows understate the stage). The \
bare engine is warmed up once: the pipeline's figure carries a cold engine's first batch.
Bare-engine side: `load_engine(spec).generate(batch)` in the bench process, with the stage's own EngineSpec, the same \
requests (built by the stages' own functions) and batch size; its prefix and multimodal caches are emptied before \
each repetition (the same prompts would otherwise come from the cache).
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

    return {"io": bench_io, "driver": bench_driver, "memory": bench_memory, "caption": bench_caption,
            "fuse": bench_fuse, "backends": bench_backends}


def main(quick: bool = False, sections: Sequence[str] = SECTIONS, out_dir: str | Path = RESULTS) -> int:
    """Run the chosen sections; write ``results.json`` and ``results.md``; 0 if every section ran."""
    set_env()
    sizes = QUICK if quick else FULL
    budgets = {k: v for k, v in sizes.budget_s.items() if k == "setup" or k in sections}
    harness = Harness(budgets, reps=sizes.reps, quick=quick)
    t0 = time.time()
    ctx = prepare(sizes, harness, need_models=bool(set(sections) & {"memory", "caption", "fuse", "backends"}))
    harness.section_s["setup"] = time.time() - t0
    fns = _sections()
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp  # a private Ray temp dir: no ray_current_cluster file left for others
    try:
        for name in SECTIONS:
            if name in sections:
                harness.section(name, lambda fn=fns[name]: fn(ctx))
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for note in NOTES.split("\n"):
            harness.note(note)
        md = harness.write(out_dir, "results", "vecap benchmarks", sizes=asdict(sizes), sections=list(sections),
                           config_overrides=ctx.overrides, data=str(ctx.images))
    log.info("benchmark results (%s):\n%s", md, md.read_text())
    return 1 if harness.failed() else 0
