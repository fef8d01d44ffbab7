"""Side-by-side benchmarks: each comparison runs both sides in one run, on the same inputs.

``vecap bench`` (``make bench``) measures, with bench-scale random-weight models
(:mod:`vecap.tiny_models`, ``scale="bench"``) and the generated img2dataset sample
(:mod:`vecap.sample_data`):

1. caption stage (``pipeline.run(cfg, ["caption"])``, Ray Data + engine actor) against
   the same vLLM engine called directly on the same already-decoded images;
2. fuse stage against the bare engine, with vLLM prefix caching on and off;
3. the vLLM backend against the hf (transformers ``generate``) backend, bare engines,
   same requests, greedy;
4. the I/O path (``ShardReader`` + ``prepare_image`` + a Parquet commit) against a
   plain ``tarfile`` + PIL loop;
5. peak memory of a whole ``vecap run`` over N and 4N samples (a subprocess each,
   process tree sampled with psutil; ``--quick``: ``vecap caption``).

Where a stage misses its target, one extra repetition with ``cpus_per_actor=2`` shows
the effect of the engine actor's thread count (Ray sets ``OMP_NUM_THREADS`` to an
actor's ``num_cpus``).

Each side is repeated (the order alternates between repetitions) and the median is
reported. Both sides see the same requests: the bare engine's requests are built with
the stages' own functions. Engine start-up is timed on its own and left out of the
throughput figures, for the pipeline as well: a thin subclass of the stage's actor
records when its engine was ready and when each batch started and ended (nothing
else changes). Caches do not carry over: each pipeline run starts a fresh engine,
and the bare engine's prefix and multimodal caches are reset before each repetition
(identical prompts would otherwise be served from the cache).

Sizes suit a 2-core machine: about 10 minutes in all (``--quick``: about 3). Each section
has a time budget: a repetition starts only if it should end within the budgets so far,
so a machine slowed by other jobs gets fewer repetitions (said in the results) rather
than a run past 15 minutes.

Results go to ``<out>/results.json`` and ``<out>/results.md``. Models, data and
scratch roots are kept under ``.cache/bench/`` (reused between runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from vecap.stages.caption import CaptionWorker as _CaptionWorker
from vecap.stages.fuse import FuseWorker as _FuseWorker

from vecap.cpu_env import offline_cpu_env

log = logging.getLogger("vecap.bench")

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".cache" / "bench"
TIMINGS_ENV = "VECAP_BENCH_TIMINGS"

# What vLLM on a CPU needs (see pipelines/demo.yaml); caches stay inside the workspace.
ENV = offline_cpu_env(REPO / ".cache")

TARGETS = {
    "caption": ("≥ 0.9 × bare engine", lambda r: r >= 0.9),
    "fuse": ("≥ 0.9 × bare engine", lambda r: r >= 0.9),
    "backends": ("vLLM several × hf (≥ 3×)", lambda r: r >= 3.0),
    "io": ("≥ 0.8 × plain loop", lambda r: r >= 0.8),
    "memory": ("4N/N ≤ 1.3", lambda r: r <= 1.3),
}


@dataclass(frozen=True)
class Sizes:
    reps: int  # repetitions of each comparison (fewer if a section runs out of its time budget)
    n_images: int  # generated sample images: one data set for every section
    shard_size: int
    caption_shards: int
    fuse_shards: int
    batch_size: int
    backend_caption_requests: int
    backend_fuse_requests: int
    io_shards: int
    memory_shards: int  # N = the samples of this many shards; 4N = four times as many shards
    memory_command: str  # the `vecap` subcommand of the memory runs: run (all stages) or caption
    thread_variant: bool  # also time both stages with cpus_per_actor=2 (one repetition each)
    # Seconds per section; a section starts another repetition only if it should end before
    # the sum of the budgets so far (time a section leaves unused passes to the next).
    budget_s: dict[str, float] = field(default_factory=dict)
    io_image_size: int = 336  # LLaVA-1.5's input: what a real run decodes to


FULL = Sizes(reps=3, n_images=320, shard_size=32, caption_shards=3, fuse_shards=2, batch_size=16,
             backend_caption_requests=16, backend_fuse_requests=8, io_shards=10, memory_shards=2,
             memory_command="run", thread_variant=True,
             budget_s={"setup": 45, "io": 20, "memory": 110, "caption": 200, "fuse": 380, "backends": 75})
QUICK = Sizes(reps=1, n_images=64, shard_size=8, caption_shards=2, fuse_shards=1, batch_size=4,
              backend_caption_requests=4, backend_fuse_requests=4, io_shards=8, memory_shards=1,
              memory_command="caption", thread_variant=False,
              budget_s={"setup": 40, "io": 10, "memory": 50, "caption": 40, "fuse": 60, "backends": 20})


# --------------------------------------------------------------------------- timed actors
class _Timed:
    """Mixin for the stages' engine actors: records engine start-up and every batch.

    Writes one JSON file per actor into ``$VECAP_BENCH_TIMINGS`` after each event. Per
    batch it adds two clock readings and a count; the stage's code is otherwise unchanged.
    """

    stage = ""  # (the stage's ``flag`` comes from the actor class: this mixin must not shadow it)

    def _timed_init(self, init: Callable[[], None], args: tuple, kwargs: dict) -> None:
        t0 = time.time()
        spec = kwargs.get("spec", args[0] if args else None)
        if getattr(spec, "backend", None) == "vllm":
            import vllm  # noqa: F401 - timed on its own: each new actor process imports it first

        t1 = time.time()
        init()
        self._rec: dict[str, Any] = {"stage": self.stage, "pid": os.getpid(), "init_start": t0, "import_s": t1 - t0,
                                     "init_end": time.time(), "calls": [], "threads": _thread_settings()}
        self._gen_s = 0.0
        generate = self.engine.generate

        def timed_generate(requests):
            t = time.time()
            try:
                return generate(requests)
            finally:
                self._gen_s += time.time() - t

        self.engine.generate = timed_generate
        self._dump()

    def _timed_call(self, call: Callable[[Any], Any], batch: Any) -> Any:
        import pyarrow.compute as pc

        t0 = time.time()
        self._gen_s = 0.0
        n = int(pc.sum(batch.column(self.flag).fill_null(False)).as_py() or 0)
        out = call(batch)
        self._rec["calls"].append([t0, time.time(), n, self._gen_s])
        self._dump()
        return out

    def _dump(self) -> None:
        folder = os.environ.get(TIMINGS_ENV)
        if not folder:
            return
        path = Path(folder) / f"{self.stage}-{os.getpid()}-{id(self):x}.json"
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(self._rec))
        os.replace(tmp, path)


class TimedCaptionWorker(_Timed, _CaptionWorker):
    stage = "caption"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._timed_init(lambda: _CaptionWorker.__init__(self, *args, **kwargs), args, kwargs)

    def __call__(self, batch: Any) -> Any:
        return self._timed_call(lambda b: _CaptionWorker.__call__(self, b), batch)


class TimedFuseWorker(_Timed, _FuseWorker):
    stage = "fuse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._timed_init(lambda: _FuseWorker.__init__(self, *args, **kwargs), args, kwargs)

    def __call__(self, batch: Any) -> Any:
        return self._timed_call(lambda b: _FuseWorker.__call__(self, b), batch)


def _thread_settings() -> dict[str, Any]:
    """What decides how many cores an engine uses: torch's threads, the CPU affinity, OMP_NUM_THREADS."""
    settings: dict[str, Any] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    if "torch" in sys.modules:
        settings["torch_threads"] = sys.modules["torch"].get_num_threads()
    return settings


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _read_timings(folder: Path, stage: str, since: float) -> list[dict[str, Any]]:
    recs = []
    for p in sorted(folder.glob(f"{stage}-*.json")):
        rec = json.loads(p.read_text())
        if rec["init_start"] >= since:
            recs.append(rec)
        p.unlink()
    return recs


# --------------------------------------------------------------------------- helpers
def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _setup_env() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def _fresh_root(name: str, images: Path) -> Path:
    root = WORK / "runs" / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "images").symlink_to(images.resolve(), target_is_directory=True)
    return root


@dataclass
class Ctx:
    sizes: Sizes
    images: Path
    shards: list[str]
    models: dict[str, Path]
    tiny: dict[str, Path]
    timings: Path
    t_start: float
    overrides: list[str] = field(default_factory=list)
    engines: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, list] = field(default_factory=dict)
    cut: dict[str, str] = field(default_factory=dict)  # sections cut short by their time budget

    def cfg(self, root: Path, *extra: str) -> Any:
        from vecap.config import load_config

        return load_config(REPO / "pipelines" / "demo.yaml", [f"root={root}", *self.overrides, *extra])

    def deadline(self, section: str) -> float:
        total = 0.0
        for name, seconds in self.sizes.budget_s.items():
            total += seconds
            if name == section:
                break
        return self.t_start + total

    def reps(self, section: str) -> Iterator[int]:
        """Repetition numbers: up to ``sizes.reps``, while the next one should fit in the budget."""
        durations: list[float] = []
        for rep in range(self.sizes.reps):
            if rep and time.time() + max(durations) > self.deadline(section):
                self.cut[section] = f"{rep} of {self.sizes.reps} repetitions (time budget)"
                log.warning("%s: stopping after %d repetition(s): the next would overrun the time budget", section, rep)
                return
            t0 = time.time()
            yield rep
            durations.append(time.time() - t0)


def _vllm_reset(engine: Any) -> None:
    """Empty the engine's prefix and multimodal caches: the next call starts cold, as in a new run."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return
    llm.reset_prefix_cache()
    if hasattr(llm, "reset_mm_cache"):
        llm.reset_mm_cache()


def _run_batches(engine: Any, requests: list, batch_size: int) -> tuple[float, list]:
    """Hand the engine the requests in batches, as the stage's actor gets them; returns (seconds, outputs)."""
    _vllm_reset(engine)
    out: list = []
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        out += engine.generate(requests[i : i + batch_size])
    seconds = time.perf_counter() - t0
    errors = [g.error for g in out if g.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(out)} requests failed, e.g. {errors[0]}")
    return seconds, out


def _load_engine_timed(spec: Any) -> tuple[Any, float]:
    from vecap.backends import load_engine

    t0 = time.perf_counter()
    engine = load_engine(spec)
    return engine, time.perf_counter() - t0


def _pipeline_rep(ctx: Ctx, stage: str, cfg: Any, shards: list[str]) -> dict[str, Any]:
    """One pipeline run of one stage; throughput from its engine actor's own records."""
    from vecap import pipeline
    from vecap.stages import caption as caption_stage
    from vecap.stages import fuse as fuse_stage

    module, name, timed = {
        "caption": (caption_stage, "CaptionWorker", TimedCaptionWorker),
        "fuse": (fuse_stage, "FuseWorker", TimedFuseWorker),
    }[stage]
    t0 = time.time()
    with _patched(module, name, timed):
        result = pipeline.run(cfg, [stage], overwrite=True, shards=shards, progress=False)
    wall = time.time() - t0
    recs = _read_timings(ctx.timings, stage, t0)
    if len(recs) != 1:
        raise RuntimeError(f"expected one {stage} actor, found {len(recs)} timing records")
    rec = recs[0]
    calls = rec["calls"]
    n = sum(c[2] for c in calls)
    startup = rec["init_end"] - rec["init_start"]
    steady_n = sum(c[2] for c in calls[1:])
    steady_s = calls[-1][1] - calls[0][1] if len(calls) > 1 else None
    return {
        "wall_s": wall,
        "requests": n,
        "rows": result.tallies[stage].rows,
        "calls": len(calls),
        "engine_startup_s": startup,  # the actor's constructor: import vllm + engine construction
        "import_vllm_s": rec["import_s"],
        "actor_started_after_s": rec["init_start"] - t0,  # Ray Data planning, worker process, imports
        "first_call_s": calls[0][1] - calls[0][0] if calls else None,
        "after_last_call_s": t0 + wall - calls[-1][1] if calls else None,  # last commit, stream teardown
        "e2e_per_s": n / wall,
        "excl_startup_per_s": n / (wall - startup),
        "steady_per_s": steady_n / steady_s if steady_s else None,
        # share of the steady window the engine spent generating; the rest is the actor's own
        # row handling (Arrow ↔ Python, requests) and waiting for input
        "engine_busy": sum(c[3] for c in calls[1:]) / steady_s if steady_s else None,
        "actor_overhead_s": sum((c[1] - c[0]) - c[3] for c in calls),
        "load": _load(),
        "actor_threads": rec.get("threads"),
    }


def _bare_rep(engine: Any, requests: list, batch_size: int) -> dict[str, Any]:
    seconds, out = _run_batches(engine, requests, batch_size)
    return {"seconds": seconds, "requests": len(requests), "per_s": len(requests) / seconds, "load": _load(), "_out": out}


def _alternate(rep: int, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[Any, Any]:
    """Run both sides of a comparison, ``a`` first in even repetitions and ``b`` first in odd ones."""
    if rep % 2 == 0:
        ra = a()
        return ra, b()
    rb = b()
    return a(), rb


_PIPE_KEYS = ("wall_s", "engine_startup_s", "import_vllm_s", "actor_started_after_s", "first_call_s", "after_last_call_s",
              "e2e_per_s", "excl_startup_per_s", "steady_per_s", "engine_busy", "actor_overhead_s")


def _summarise_pipeline(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: _median([r[k] for r in reps]) for k in _PIPE_KEYS} | {"requests": reps[0]["requests"], "reps": reps}


def _summarise_bare(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"per_s": _median([r["per_s"] for r in reps]), "seconds": _median([r["seconds"] for r in reps]),
            "reps": [{k: v for k, v in r.items() if not k.startswith("_")} for r in reps]}


# --------------------------------------------------------------------------- 1. caption
def caption_requests(cfg: Any, images_dir: Path, shards: list[str]) -> list:
    """The caption actor's requests, built beforehand: the same keys, seeds, messages and pixels."""
    from vecap import schemas
    from vecap.backends import Request
    from vecap.images import ImageRejected, prepare_image
    from vecap.prompts import load_prompt
    from vecap.reader import ShardReader
    from vecap.stages.common import seed_for

    c = cfg.caption
    messages = load_prompt("caption", c.prompt).messages(image=True)
    requests = []
    for shard in shards:
        seen: set[str] = set()
        for sample in ShardReader(str(images_dir), shard, max_image_bytes=c.max_image_bytes):
            if sample.key in seen:
                continue
            seen.add(sample.key)
            if sample.status != schemas.OK:
                continue
            try:
                img = prepare_image(sample.image, c.image_size, c.max_image_pixels, c.max_image_bytes)
            except ImageRejected:
                continue
            request = Request(messages=messages, seed=seed_for(cfg.seed, "caption", sample.key), image=img.to_pil())
            request.key = sample.key  # type: ignore[attr-defined]  # to compare outputs
            requests.append(request)
    return requests


def bench_caption(ctx: Ctx) -> dict[str, Any]:
    from vecap.stages.common import engine_spec

    s = ctx.sizes
    shards = ctx.shards[: s.caption_shards]
    cfg0 = ctx.cfg(WORK / "runs" / "caption")
    requests = caption_requests(cfg0, ctx.images, shards)
    spec = engine_spec(cfg0.caption, multimodal=True)
    engine, startup = _load_engine_timed(spec)
    ctx.engines["caption"], ctx.requests["caption"] = engine, requests
    warm_s, _ = _run_batches(engine, requests[: s.batch_size], s.batch_size)
    log.info("caption: bare engine up in %.1fs (first vLLM engine of this process), warm-up batch %.1fs; %d images",
             startup, warm_s, len(requests))
    pipe: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    same = None
    for rep in ctx.reps("caption"):
        root = _fresh_root(f"caption-{rep}", ctx.images)
        cfg = ctx.cfg(root)
        p_rep, b_rep = _alternate(rep, partial(_pipeline_rep, ctx, "caption", cfg, shards),
                                  partial(_bare_rep, engine, requests, s.batch_size))
        pipe.append(p_rep)
        bare.append(b_rep)
        log.info("caption rep %d: pipeline %.2f img/s steady (%.1fs wall, engine start %.1fs), bare engine %.2f img/s",
                 rep, p_rep["steady_per_s"] or 0, p_rep["wall_s"], p_rep["engine_startup_s"], b_rep["per_s"])
        if rep == 0:
            same = _compare_captions(root, requests, b_rep["_out"])
        shutil.rmtree(root)
    if pipe[0]["requests"] != len(requests):
        log.warning("caption: the pipeline captioned %d images, the bare engine %d", pipe[0]["requests"], len(requests))
    variant = None
    missed = not TARGETS["caption"][1](_ratio(_median([p["steady_per_s"] for p in pipe]), _median([b["per_s"] for b in bare])) or 0)
    if s.thread_variant and missed and time.time() + 1.2 * max(p["wall_s"] for p in pipe) \
            + _median([b["seconds"] for b in bare]) < ctx.deadline("caption"):
        # Ray sets OMP_NUM_THREADS to an actor's num_cpus: with cpus_per_actor=1 the engine gets one thread.
        root = _fresh_root("caption-variant", ctx.images)
        cfg = ctx.cfg(root, "caption.cpus_per_actor=2")
        variant = {"setting": "caption.cpus_per_actor=2", "pipeline": _pipeline_rep(ctx, "caption", cfg, shards),
                   "bare": _bare_rep(engine, requests, s.batch_size)}
        variant["bare"].pop("_out")
        log.info("caption, cpus_per_actor=2: pipeline %.2f img/s steady, bare engine %.2f img/s",
                 variant["pipeline"]["steady_per_s"] or 0, variant["bare"]["per_s"])
        shutil.rmtree(root)
    return {
        "images": len(requests),
        "shards": shards,
        "batch_size": s.batch_size,
        "model": str(spec.model),
        "bare_engine_startup_s": startup,
        "bare_warmup_batch_s": warm_s,
        "bare_threads": _thread_settings(),
        "pipeline": _summarise_pipeline(pipe),
        "bare": _summarise_bare(bare),
        "outputs_identical": same,
        "variant": variant,
    }


def _compare_captions(root: Path, requests: list, outs: list) -> str:
    """Greedy captions of the pipeline and of the bare engine, key by key (a sanity check)."""
    import pyarrow.parquet as pq

    committed = {}
    for path in (root / "captions").glob("*.parquet"):
        for r in pq.read_table(path, columns=["key", "vlm_caption"]).to_pylist():
            committed[r["key"]] = r["vlm_caption"]
    same = sum(committed.get(r.key) == ((g.text or "").strip() or None) for r, g in zip(requests, outs))
    return f"{same}/{len(requests)}"


# --------------------------------------------------------------------------- 2. fuse
def _write_captions(root: Path, shards: list[str], cfg: Any) -> None:
    """Committed captions as the fuse stage's input: in-domain sentences for the bench tokenizer.

    (The random bench VLM's captions are byte soup, often empty, which the fuse stage
    settles without the LLM; real captions are one sentence.)
    """
    from vecap import schemas
    from vecap.images import ImageRejected, prepare_image
    from vecap.reader import ShardReader
    from vecap.stages.common import seed_for
    from vecap.tiny_models import training_sentences
    from vecap.writer import StageDir

    sentences = training_sentences(2000)
    c = cfg.caption
    out = StageDir(root / "captions")
    i = 0
    for shard in shards:
        rows, seen = [], set()
        for sample in ShardReader(str(root / "images"), shard, max_image_bytes=c.max_image_bytes):
            if sample.key in seen:
                continue
            seen.add(sample.key)
            row = {"key": sample.key, "shard": shard, "status": sample.status, "error": sample.error,
                   "vlm_caption": None, "model": "bench-synthetic", "prompt_id": "bench", "prompt_sha256": "0" * 64,
                   "params_sha256": "0" * 64, "seed": seed_for(cfg.seed, "caption", sample.key)}
            if sample.status == schemas.OK:
                try:
                    prepare_image(sample.image, c.image_size, c.max_image_pixels, c.max_image_bytes)
                    row["vlm_caption"] = sentences[i % len(sentences)]
                    i += 1
                except ImageRejected as err:
                    row.update(status=err.status, error=str(err))
            rows.append(row)
        stats = {"stage": "caption", "shard": shard, "n_rows": len(rows), "fingerprint": None}
        out.commit(shard, stats, schemas.table(rows, schemas.CAPTIONS), schemas.CAPTIONS)


def fuse_requests(cfg: Any, root: Path, shards: list[str]) -> list:
    """The fuse actor's requests, built with the stage's own CPU steps (same messages and seeds)."""
    from vecap.backends import Request
    from vecap.prompts import load_prompt
    from vecap.stages import fuse as fuse_stage

    f = cfg.fuse
    prompt = load_prompt("fuse", f.prompt)
    requests = []
    for shard in shards:
        for table in fuse_stage.read_caption_rows(shard, str(root / "images"), str(root / "captions")):
            table = fuse_stage.prepare_fuse_requests(table, prompt, f.max_alt_text_words, cfg.seed)
            for r in table.to_pylist():
                if r.get("needs_fuse"):
                    requests.append(Request(messages=json.loads(r["fuse_messages"]), seed=r["fuse_seed"]))
    return requests


def bench_fuse(ctx: Ctx) -> dict[str, Any]:
    from vecap.stages.common import engine_spec

    s = ctx.sizes
    shards = ctx.shards[: s.fuse_shards]
    base = _fresh_root("fuse-input", ctx.images)
    cfg0 = ctx.cfg(base)
    _write_captions(base, shards, cfg0)
    requests = fuse_requests(cfg0, base, shards)
    modes = {"on": "fuse.engine.enable_prefix_caching=true", "off": "fuse.engine.enable_prefix_caching=false"}
    result: dict[str, Any] = {"requests": len(requests), "shards": shards, "batch_size": s.batch_size,
                              "model": cfg0.fuse.model, "prefix_caching": {m: {} for m in modes}}
    engines: dict[str, Any] = {}
    for mode, override in modes.items():
        # Both engines stay alive to the end: destroying an in-process vLLM engine tears down
        # vLLM's process-wide parallel state, which breaks the other engines of this process.
        engines[mode], startup = _load_engine_timed(engine_spec(ctx.cfg(base, override).fuse, multimodal=False))
        warm_s, out = _run_batches(engines[mode], requests[: s.batch_size], s.batch_size)
        result["prefix_caching"][mode] |= {"bare_engine_startup_s": startup, "bare_warmup_batch_s": warm_s}
        log.info("fuse, prefix caching %s: bare engine up in %.1fs, warm-up batch %.1fs", mode, startup, warm_s)
    result["prompt_tokens_mean"] = statistics.mean(g.n_prompt_tokens or 0 for g in out)
    result["output_tokens_mean"] = statistics.mean(g.n_output_tokens or 0 for g in out)
    ctx.engines["fuse"], ctx.engines["fuse_no_prefix_caching"], ctx.requests["fuse"] = engines["on"], engines["off"], requests
    pipe: dict[str, list] = {m: [] for m in modes}
    bare: dict[str, list] = {m: [] for m in modes}
    for rep in ctx.reps("fuse"):
        for mode in modes if rep % 2 == 0 else reversed(modes):
            root = _fresh_root(f"fuse-{rep}-{mode}", ctx.images)
            shutil.copytree(base / "captions", root / "captions")
            cfg = ctx.cfg(root, modes[mode])
            p_rep, b_rep = _alternate(rep, partial(_pipeline_rep, ctx, "fuse", cfg, shards),
                                      partial(_bare_rep, engines[mode], requests, s.batch_size))
            pipe[mode].append(p_rep)
            bare[mode].append(b_rep)
            log.info("fuse rep %d, prefix caching %s: pipeline %.2f/s steady (%.1fs wall), bare engine %.2f/s",
                     rep, mode, p_rep["steady_per_s"] or 0, p_rep["wall_s"], b_rep["per_s"])
            shutil.rmtree(root)
    for mode in modes:
        result["prefix_caching"][mode] |= {"pipeline": _summarise_pipeline(pipe[mode]), "bare": _summarise_bare(bare[mode])}
        if pipe[mode][0]["requests"] != len(requests):
            log.warning("fuse: the pipeline sent %d requests, the bare engine %d", pipe[mode][0]["requests"], len(requests))
    result["variant"] = None
    on = (_median([p["steady_per_s"] for p in pipe["on"]]), _median([b["per_s"] for b in bare["on"]]))
    if s.thread_variant and not TARGETS["fuse"][1](_ratio(*on) or 0) and time.time() \
            + 1.2 * max(p["wall_s"] for p in pipe["on"]) + _median([b["seconds"] for b in bare["on"]]) < ctx.deadline("fuse"):
        root = _fresh_root("fuse-variant", ctx.images)
        shutil.copytree(base / "captions", root / "captions")
        cfg = ctx.cfg(root, modes["on"], "fuse.cpus_per_actor=2")
        variant = {"setting": "fuse.cpus_per_actor=2", "pipeline": _pipeline_rep(ctx, "fuse", cfg, shards),
                   "bare": _bare_rep(engines["on"], requests, s.batch_size)}
        variant["bare"].pop("_out")
        log.info("fuse, prefix caching on, cpus_per_actor=2: pipeline %.2f/s steady, bare engine %.2f/s",
                 variant["pipeline"]["steady_per_s"] or 0, variant["bare"]["per_s"])
        result["variant"] = variant
        shutil.rmtree(root)
    shutil.rmtree(base)
    return result


# --------------------------------------------------------------------------- 3. vLLM vs hf
def bench_backends(ctx: Ctx) -> dict[str, Any]:
    from vecap.stages.common import engine_spec

    s = ctx.sizes
    cfg = ctx.cfg(WORK / "runs" / "backends")
    out: dict[str, Any] = {}
    for kind, section, multimodal, n in (("caption", cfg.caption, True, s.backend_caption_requests),
                                         ("fuse", cfg.fuse, False, s.backend_fuse_requests)):
        if kind not in ctx.engines:
            log.warning("backends: no %s engine (its section failed); skipped", kind)
            continue
        requests = ctx.requests[kind][:n]
        vllm_engine = ctx.engines[kind]
        hf_spec = replace(engine_spec(section, multimodal), backend="hf", engine_kwargs={})
        hf_engine, hf_startup = _load_engine_timed(hf_spec)
        _run_batches(hf_engine, requests[: min(2, n)], s.batch_size)  # warm-up
        v: list[dict[str, Any]] = []
        h: list[dict[str, Any]] = []
        for rep in ctx.reps("backends"):
            v_rep, h_rep = _alternate(rep, partial(_bare_rep, vllm_engine, requests, s.batch_size),
                                      partial(_bare_rep, hf_engine, requests, s.batch_size))
            v.append(v_rep)
            h.append(h_rep)
            log.info("backends, %s model, rep %d: vLLM %.2f/s, hf %.2f/s", kind, rep, v_rep["per_s"], h_rep["per_s"])
        same = sum((a.text or "") == (b.text or "") for a, b in zip(v[0]["_out"], h[0]["_out"]))
        out[kind] = {
            "requests": len(requests),
            "batch_size": s.batch_size,
            "model": str(section.model),
            "hf_startup_s": hf_startup,
            "vllm": _summarise_bare(v),
            "hf": _summarise_bare(h),
            "outputs_identical": f"{same}/{len(requests)}",
        }
        del hf_engine
    return out


# --------------------------------------------------------------------------- 4. I/O
def _io_vecap(images: Path, shards: list[str], out_root: Path, cfg: Any, image_size: int) -> int:
    """The pipeline's CPU path for a shard, model left out: read + decode + resize (the caption
    stage's own read step) and the atomic Parquet commit of the shard's rows (captions/ layout)."""
    from vecap import schemas
    from vecap.stages import caption as caption_stage
    from vecap.stages.common import Provenance
    from vecap.writer import StageDir

    c = cfg.caption
    prov = Provenance("none", "none", "0" * 64, "0" * 64)
    out = StageDir(out_root / "captions")
    n = 0
    for shard in shards:
        rows, report = [], {}
        for table in caption_stage.read_image_rows(shard, str(images), image_size=image_size, max_pixels=c.max_image_pixels,
                                                   max_bytes=c.max_image_bytes, run_seed=cfg.seed):
            for r in table.to_pylist():
                if r["is_marker"]:
                    report = json.loads(r["report"])
                else:
                    rows.append(r)
        n += len(rows)
        stats = {"stage": "caption", "shard": shard, "n_rows": len(rows), "read_report": report}
        out.commit(shard, stats, schemas.table(caption_stage.caption_rows(rows, prov), schemas.CAPTIONS), schemas.CAPTIONS)
    return n


def _io_plain(images: Path, shards: list[str], resize_to: int | None = None) -> int:
    """A plain loop: tarfile + PIL decode to RGB (+ a plain resize to ``resize_to`` on the short side)."""
    import io as _io
    import tarfile

    from PIL import Image

    exts = {"jpg", "jpeg", "png", "webp"}
    n = 0
    for shard in shards:
        with tarfile.open(images / f"{shard}.tar") as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in exts:
                    data = tar.extractfile(member).read()
                    with contextlib.suppress(Exception):  # the sample's one non-image page
                        im = Image.open(_io.BytesIO(data)).convert("RGB")
                        if resize_to and min(im.size) > resize_to:
                            scale = resize_to / min(im.size)
                            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
                    n += 1
    return n


def bench_io(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    shards = ctx.shards[: s.io_shards]
    cfg = ctx.cfg(WORK / "runs" / "io")
    times: dict[str, list[float]] = {"vecap": [], "plain": [], "plain_resize": []}
    counts: dict[str, int] = {}
    out_root = WORK / "runs" / "io"

    def vecap() -> int:
        shutil.rmtree(out_root, ignore_errors=True)
        n = _io_vecap(ctx.images, shards, out_root, cfg, s.io_image_size)
        shutil.rmtree(out_root, ignore_errors=True)
        return n

    sides = {"vecap": vecap, "plain": partial(_io_plain, ctx.images, shards),
             "plain_resize": partial(_io_plain, ctx.images, shards, s.io_image_size)}
    _io_plain(ctx.images, shards)  # page cache warm for every side
    for rep in range(max(3, s.reps)):
        for name in sides if rep % 2 == 0 else reversed(sides):
            t0 = time.perf_counter()
            counts[name] = sides[name]()
            times[name].append(time.perf_counter() - t0)
    samples = counts["plain"]  # image members of the tars; the vecap side also has rows for failed downloads
    log.info("io: per pass over %d samples: vecap %.2fs, plain %.2fs, plain+resize %.2fs", samples,
             _median(times["vecap"]), _median(times["plain"]), _median(times["plain_resize"]))
    return {
        "samples": samples,
        "vecap_rows": counts["vecap"],
        "shards": len(shards),
        "image_size": s.io_image_size,
        **{f"{k}_per_s": samples / _median(v) for k, v in times.items()},
        "seconds": times,
    }


# --------------------------------------------------------------------------- 5. memory
def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _sample_tree(proc: Any, stop: threading.Event, peak: dict[str, int], interval: float = 0.25) -> None:
    """Peak memory of a process and all its descendants, sampled until ``stop``."""
    import psutil

    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            procs = []
        rss = pss = biggest = 0
        for p in procs:
            try:
                r = p.memory_info().rss
            except psutil.Error:
                continue
            rss += r
            biggest = max(biggest, r)
            pss += (_pss_kib(p.pid) or r // 1024) * 1024
        for key, value in (("rss", rss), ("pss", pss), ("largest_process_rss", biggest), ("processes", len(procs))):
            peak[key] = max(peak.get(key, 0), value)
        stop.wait(interval)


def _memory_run(ctx: Ctx, shards: list[str], name: str) -> dict[str, Any]:
    import psutil

    root = _fresh_root(name, ctx.images)
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    cmd = [sys.executable, "-m", "vecap.cli", ctx.sizes.memory_command, "--config", str(REPO / "pipelines" / "demo.yaml"),
           "--no-progress", "--set", f"root={root}", "--set", f"caption.model={ctx.tiny['llava']}",
           "--set", f"fuse.model={ctx.tiny['llama']}", "--shards", *shards]
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop(TIMINGS_ENV, None)
    log_path = WORK / "runs" / f"{name}.log"
    peak: dict[str, int] = {}
    stop = threading.Event()
    t0 = time.time()
    with open(log_path, "w") as logf:
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=_sample_tree, args=(psutil.Process(child.pid), stop, peak), daemon=True)
        sampler.start()
        try:
            rc = child.wait(timeout=400)
        except subprocess.TimeoutExpired:
            child.kill()
            rc = child.wait()
        stop.set()
        sampler.join()
    wall = time.time() - t0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        raise RuntimeError(f"memory run {name} failed (exit {rc}); see {log_path}")
    last = {"run": "vecap", "caption": "captions"}[ctx.sizes.memory_command]
    rows = sum(json.loads(p.read_text()).get("n_rows", 0) for p in (root / last).glob("*_stats.json"))
    shutil.rmtree(root)
    mib = 2**20
    return {"shards": len(shards), "samples": rows, "wall_s": wall,
            "peak_pss_mib": peak.get("pss", 0) / mib, "peak_rss_sum_mib": peak.get("rss", 0) / mib,
            "largest_process_rss_mib": peak.get("largest_process_rss", 0) / mib, "max_processes": peak.get("processes", 0)}


def bench_memory(ctx: Ctx) -> dict[str, Any]:
    k = ctx.sizes.memory_shards
    if 4 * k > len(ctx.shards):
        raise RuntimeError(f"need {4 * k} shards, have {len(ctx.shards)}")
    small = _memory_run(ctx, ctx.shards[:k], "memory-n")
    log.info("memory: N=%d samples, peak PSS %.0f MiB (%.0fs)", small["samples"], small["peak_pss_mib"], small["wall_s"])
    large = _memory_run(ctx, ctx.shards[: 4 * k], "memory-4n")
    log.info("memory: 4N=%d samples, peak PSS %.0f MiB (%.0fs)", large["samples"], large["peak_pss_mib"], large["wall_s"])
    return {"command": ctx.sizes.memory_command, "n": small, "4n": large, "ratio_pss": large["peak_pss_mib"] / small["peak_pss_mib"],
            "ratio_rss_sum": large["peak_rss_sum_mib"] / small["peak_rss_sum_mib"],
            "models": {name: str(path) for name, path in ctx.tiny.items()}}


# --------------------------------------------------------------------------- report
def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(results: dict[str, Any]) -> tuple[list[list[str]], dict[str, bool | None]]:
    """Rows of: comparison | what is measured | A | B | A/B | target | met."""
    rows: list[list[str]] = []
    verdicts: dict[str, bool | None] = {}

    def add(name: str, measured: str, a: Any, b: Any, key: str | None = None) -> None:
        ratio = _ratio(a, b)
        target, ok = "", None
        if key:
            target = TARGETS[key][0]
            ok = TARGETS[key][1](ratio) if ratio is not None else None
            verdicts[name] = ok
        rows.append([name, measured, _fmt(a), _fmt(b), _fmt(ratio), target, {True: "yes", False: "**no**", None: ""}[ok]])

    def ok(section: str) -> dict[str, Any] | None:
        v = results.get(section)
        return v if isinstance(v, dict) and "error" not in v else None

    if c := ok("caption"):
        p, b = c["pipeline"], c["bare"]
        n = f"{c['images']} images, batch {c['batch_size']}"
        add("caption stage / bare engine", f"images/s in steady state, after the engine's first batch ({n})",
            p["steady_per_s"], b["per_s"], "caption")
        add("caption stage / bare engine (b)", "images/s: images / (run wall time − the actor's engine start-up)",
            p["excl_startup_per_s"], b["per_s"])
        add("caption stage / bare engine (c)", "images/s: images / whole run wall time (start-up included)",
            p["e2e_per_s"], b["per_s"])
        add("caption engine start-up", "s: actor (import vllm + engine) / first engine of the bench process (import + engine)",
            p["engine_startup_s"], c["bare_engine_startup_s"])
        add("caption first batch", "s: the actor's first batch (warm-up) / the bare engine's warm-up batch",
            p["first_call_s"], c["bare_warmup_batch_s"])
        threads = p["reps"][0].get("actor_threads") or {}
        add("caption engine threads", f"torch threads: actor (OMP_NUM_THREADS={threads.get('OMP_NUM_THREADS')}, set by Ray "
            "from cpus_per_actor) / bench process", threads.get("torch_threads"), c["bare_threads"].get("torch_threads"))
        if v := c.get("variant"):
            add("caption stage / bare engine (d), caption.cpus_per_actor=2", "images/s in steady state, one repetition "
                "(Ray then sets OMP_NUM_THREADS=2 in the actor)", v["pipeline"]["steady_per_s"], v["bare"]["per_s"])
    if f := ok("fuse"):
        tok = f"{f['requests']} requests, batch {f['batch_size']}, ~{f['prompt_tokens_mean']:.0f} prompt tokens"
        for mode in ("on", "off"):
            m = f["prefix_caching"][mode]
            add(f"fuse stage / bare engine, prefix caching {mode}", f"fusions/s in steady state ({tok})",
                m["pipeline"]["steady_per_s"], m["bare"]["per_s"], "fuse")
            add(f"fuse stage / bare engine, prefix caching {mode} (b)", "fusions/s: requests / (run wall time − engine start-up)",
                m["pipeline"]["excl_startup_per_s"], m["bare"]["per_s"])
        on, off = f["prefix_caching"]["on"], f["prefix_caching"]["off"]
        add("prefix caching on / off, bare engine", "fusions/s", on["bare"]["per_s"], off["bare"]["per_s"])
        add("prefix caching on / off, fuse stage", "fusions/s in steady state",
            on["pipeline"]["steady_per_s"], off["pipeline"]["steady_per_s"])
        add("fuse engine start-up", "s: actor (import vllm + engine) / another engine in the bench process (no import)",
            on["pipeline"]["engine_startup_s"], on["bare_engine_startup_s"])
        if v := f.get("variant"):
            add("fuse stage / bare engine (d), prefix caching on, fuse.cpus_per_actor=2", "fusions/s in steady state, "
                "one repetition (Ray then sets OMP_NUM_THREADS=2 in the actor)", v["pipeline"]["steady_per_s"], v["bare"]["per_s"])
    if b := ok("backends"):
        for kind in ("caption", "fuse"):
            if kind in b:
                v = b[kind]
                add(f"vLLM / hf, {kind} model", f"requests/s, bare engines, greedy, {v['requests']} requests, batch "
                    f"{v['batch_size']} (identical outputs: {v['outputs_identical']})", v["vllm"]["per_s"], v["hf"]["per_s"],
                    "backends")
    if i := ok("io"):
        add("I/O: vecap path / plain loop", f"samples/s: read + decode + resize to {i['image_size']} + Parquet commit / "
            f"tarfile + PIL decode ({i['samples']} samples, {i['shards']} shards)", i["vecap_per_s"], i["plain_per_s"], "io")
        add("I/O: vecap path / plain loop + resize", f"samples/s: as above / tarfile + PIL decode + resize to {i['image_size']}",
            i["vecap_per_s"], i["plain_resize_per_s"])
    if m := ok("memory"):
        add("memory: 4N / N", f"peak PSS (MiB) of the `vecap {m['command']}` process tree, tiny models, N={m['n']['samples']} "
            f"samples, 4N={m['4n']['samples']}", m["4n"]["peak_pss_mib"], m["n"]["peak_pss_mib"], "memory")
        add("memory: 4N / N (b)", "peak RSS summed over the tree (MiB; shared pages counted in every process)",
            m["4n"]["peak_rss_sum_mib"], m["n"]["peak_rss_sum_mib"])
    return rows, verdicts


NOTES = """\
- A and B are medians over the repetitions; the two sides of a comparison run one after the other in
  each repetition, in alternating order, on the same inputs. Rows marked (b), (c) show the same
  comparison measured another way; only the first row of each carries the target.
- Models: bench-scale random-weight LLaVA and Llama (`vecap.tiny_models`, scale=bench), with the
  settings of `pipelines/demo.yaml` (float32, eager); the memory runs use the tiny models.
- Pipeline side: `vecap.pipeline.run(cfg, [stage], overwrite=True)` on a fresh root per repetition,
  with Ray started beforehand. A subclass of the stage's engine actor records when its engine was
  ready and when each batch started and ended (nothing else changes). Steady state = requests after
  the actor's first batch / time from the end of its first batch to the end of its last. A new
  engine's first batch is slower (warm-up): it is left out on both sides.
- Bare-engine side: `load_engine(spec).generate(batch)` in the bench process, with the stage's own
  EngineSpec, the same requests (built by the stages' own functions; images decoded beforehand with
  `prepare_image`) and the same batch size; warmed up once, and its prefix and multimodal caches are
  emptied before each repetition (the same prompts would otherwise come from the cache).
- Fuse input: committed captions made of in-domain sentences (the random VLM's captions are mostly
  empty or byte soup, which the stage settles without the LLM). The bench tokenizer is a small BPE:
  the fuse prompt is ~3x longer in tokens than with Llama-3's tokenizer, which favours prefix caching.
- Memory: psutil samples every 0.25 s of the `python -m vecap.cli run` (quick: `caption`) subprocess and all its
  descendants (Ray's GCS, raylet, workers, engine actors); PSS from /proc/<pid>/smaps_rollup.
"""


def _markdown(results: dict[str, Any]) -> str:
    rows, _ = _table(results)
    head = ["comparison", "measured", "A", "B", "A/B", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    meta = results["meta"]
    summary = (
        f"{'Quick' if meta['quick'] else 'Full'} run: up to {meta['reps']} repetition(s) per comparison; "
        f"{meta['seconds']:.0f} s in all; load average {meta['load_start']} at the start and {meta['load_end']} at "
        f"the end, on {meta['cpus']} CPUs (a shared machine: other jobs slow either side at random)."
    )
    lines += ["", summary, "", NOTES.rstrip()]
    if meta["cut_short"]:
        lines += ["", "Cut short by the time budget: " + "; ".join(f"{k}: {v}" for k, v in meta["cut_short"].items())]
    errors = [f"- {k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["", "Sections that failed:", *errors]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- main
def _prepare(sizes: Sizes, t_start: float) -> Ctx:
    from vecap.reader import list_shards
    from vecap.sample_data import make_sample_data
    from vecap.tiny_models import build_tiny_models

    models = build_tiny_models(WORK / "models", scale="bench")
    tiny = build_tiny_models(WORK / "models", scale="tiny")
    data = make_sample_data(WORK / "data" / f"n{sizes.n_images}-s{sizes.shard_size}", n_images=sizes.n_images,
                            shard_size=sizes.shard_size)
    vision = json.loads((models["llava"] / "config.json").read_text())["vision_config"]
    timings = WORK / "timings"
    shutil.rmtree(timings, ignore_errors=True)
    timings.mkdir(parents=True)
    overrides = [
        f"caption.model={models['llava']}",
        f"fuse.model={models['llama']}",
        f"caption.image_size={vision['image_size']}",  # the bench LLaVA's input size
        f"caption.batch_size={sizes.batch_size}",
        f"fuse.batch_size={sizes.batch_size}",
    ]
    return Ctx(sizes=sizes, images=data, shards=list_shards(str(data)), models=models, tiny=tiny,
               timings=timings, t_start=t_start, overrides=overrides)


def main(out_dir: str = "bench/results", quick: bool = False) -> int:
    """Run every comparison; write ``results.json`` and ``results.md`` to ``out_dir``. 0 if every section ran."""
    _setup_env()
    t_start = time.time()
    sizes = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_start = _load()
    ctx = _prepare(sizes, t_start)
    os.environ[TIMINGS_ENV] = str(ctx.timings)  # inherited by the local Ray's workers
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    results: dict[str, Any] = {}
    section_s: dict[str, float] = {"setup": time.time() - t_start}
    sections: list[tuple[str, Callable[[Ctx], dict[str, Any]]]] = [
        ("io", bench_io),
        ("memory", bench_memory),  # subprocesses, before this process holds any engine
        ("caption", bench_caption),
        ("fuse", bench_fuse),
        ("backends", bench_backends),
    ]
    try:
        for name, fn in sections:
            t0 = time.time()
            log.info("=== %s", name)
            try:
                if name == "caption":  # the local Ray of the pipeline runs, started before any timing
                    from vecap.pipeline import init_ray

                    os.environ["RAY_TMPDIR"] = ray_tmp
                    init_ray(ctx.cfg(WORK / "runs" / "ray"))
                results[name] = fn(ctx)
            except Exception as err:  # one failed section must not hide the others
                log.exception("section %s failed", name)
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            section_s[name] = time.time() - t0
            log.info("=== %s done in %.0fs", name, section_s[name])
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results["meta"] = {
        "quick": quick,
        "sizes": asdict(sizes),
        "reps": sizes.reps,
        "seconds": time.time() - t_start,
        "section_seconds": section_s,
        "cut_short": ctx.cut,
        "load_start": load_start,
        "load_end": _load(),
        "cpus": os.cpu_count(),
        "config": str(REPO / "pipelines" / "demo.yaml"),
        "config_overrides": ctx.overrides,
        "data": str(ctx.images),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results["verdicts"] = _table(results)[1]
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2, default=str) + "\n")
    md = _markdown(results)
    (out / "results.md").write_text(md)
    log.info("benchmark results (%s):\n%s", out / "results.md", md)
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(quick="--quick" in sys.argv))
