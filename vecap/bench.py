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
   process tree sampled with psutil).

Each side is repeated (the order alternates between repetitions) and the median is
reported. Both sides see the same requests: the bare engine's requests are built with
the stages' own functions. Engine start-up is timed on its own and left out of the
throughput figures, for the pipeline as well: a thin subclass of the stage's actor
records when its engine was ready and when each batch started and ended (nothing
else changes). Caches do not carry over: each pipeline run starts a fresh engine,
and the bare engine's prefix and multimodal caches are reset before each repetition
(identical prompts would otherwise be served from the cache).

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

log = logging.getLogger("vecap.bench")

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".cache" / "bench"
TIMINGS_ENV = "VECAP_BENCH_TIMINGS"

# What vLLM on a CPU needs (see pipelines/demo.yaml); caches stay inside the workspace.
ENV = {
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "HF_HOME": str(REPO / ".cache" / "hf"),
    "VLLM_CACHE_ROOT": str(REPO / ".cache" / "vllm"),
}

TARGETS = {
    "caption": ("≥ 0.9 × bare engine", lambda r: r >= 0.9),
    "fuse": ("≥ 0.9 × bare engine", lambda r: r >= 0.9),
    "backends": ("vLLM several × hf (≥ 3×)", lambda r: r >= 3.0),
    "io": ("≥ 0.8 × plain loop", lambda r: r >= 0.8),
    "memory": ("4N/N ≤ 1.3", lambda r: r <= 1.3),
}


@dataclass(frozen=True)
class Sizes:
    reps: int
    n_images: int  # generated sample images (one data set for every section)
    shard_size: int
    caption_shards: int
    fuse_shards: int
    batch_size: int
    backend_caption_requests: int
    backend_fuse_requests: int
    io_shards: int
    memory_shards: int  # N = this many shards; 4N = four times as many
    io_image_size: int = 336  # LLaVA-1.5's input: what a real run decodes to


FULL = Sizes(reps=3, n_images=320, shard_size=32, caption_shards=6, fuse_shards=3, batch_size=32,
             backend_caption_requests=32, backend_fuse_requests=16, io_shards=10, memory_shards=2)
QUICK = Sizes(reps=2, n_images=320, shard_size=32, caption_shards=1, fuse_shards=1, batch_size=16,
              backend_caption_requests=8, backend_fuse_requests=8, io_shards=4, memory_shards=1)


# --------------------------------------------------------------------------- timed actors
class _Timed:
    """Mixin for the stages' engine actors: records engine start-up and every batch.

    Writes one JSON file per actor into ``$VECAP_BENCH_TIMINGS`` after each event.
    Adds two ``time.time()`` calls per batch; the stage's code is otherwise unchanged.
    """

    stage = ""

    def _timed_init(self, init: Callable[[], None]) -> None:
        t0 = time.time()
        init()
        self._rec: dict[str, Any] = {"stage": self.stage, "pid": os.getpid(), "init_start": t0,
                                     "init_end": time.time(), "calls": []}
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

    def _timed_call(self, call, batch):
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

    def __init__(self, *args, **kwargs) -> None:
        self._timed_init(lambda: _CaptionWorker.__init__(self, *args, **kwargs))

    def __call__(self, batch):
        return self._timed_call(lambda b: _CaptionWorker.__call__(self, b), batch)


class TimedFuseWorker(_Timed, _FuseWorker):
    stage = "fuse"

    def __init__(self, *args, **kwargs) -> None:
        self._timed_init(lambda: _FuseWorker.__init__(self, *args, **kwargs))

    def __call__(self, batch):
        return self._timed_call(lambda b: _FuseWorker.__call__(self, b), batch)


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
    overrides: list[str] = field(default_factory=list)
    engines: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, list] = field(default_factory=dict)

    def cfg(self, root: Path, *extra: str):
        from vecap.config import load_config

        return load_config(REPO / "pipelines" / "demo.yaml", [f"root={root}", *self.overrides, *extra])


def _vllm_reset(engine: Any) -> None:
    """Empty the engine's prefix and multimodal caches: the next call starts cold, as a new run."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return
    llm.reset_prefix_cache()
    if hasattr(llm, "reset_mm_cache"):
        llm.reset_mm_cache()


def _run_batches(engine: Any, requests: list, batch_size: int) -> tuple[float, list]:
    """Hand the engine the requests in batches, as the stage's actor gets them; returns (seconds, outputs)."""
    _vllm_reset(engine)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        out += engine.generate(requests[i : i + batch_size])
    return time.perf_counter() - t0, out


def _load_engine_timed(spec: Any) -> tuple[Any, float]:
    from vecap.backends import load_engine

    t0 = time.perf_counter()
    engine = load_engine(spec)
    return engine, time.perf_counter() - t0


def _pipeline_rep(ctx: Ctx, stage: str, cfg: Any, shards: list[str]) -> dict[str, Any]:
    """One pipeline run of one stage; throughput from its actor's own records."""
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
    first_call_s = calls[0][1] - calls[0][0] if calls else None
    return {
        "wall_s": wall,
        "requests": n,
        "rows": result.tallies[stage].rows,
        "calls": len(calls),
        "engine_startup_s": startup,
        "engine_ready_after_s": rec["init_end"] - t0,
        "first_call_s": first_call_s,
        "e2e_per_s": n / wall,
        "excl_startup_per_s": n / (wall - startup),
        "steady_per_s": steady_n / steady_s if steady_s else None,
        # share of the steady window the engine was generating (the rest: the actor's own
        # row handling, and waiting for input)
        "engine_busy": sum(c[3] for c in calls[1:]) / steady_s if steady_s else None,
        "actor_overhead_s": sum((c[1] - c[0]) - c[3] for c in calls),
        "load": _load(),
    }


def _bare_rep(engine: Any, requests: list, batch_size: int) -> dict[str, Any]:
    seconds, out = _run_batches(engine, requests, batch_size)
    return {"seconds": seconds, "requests": len(requests), "per_s": len(requests) / seconds,
            "errors": sum(g.error is not None for g in out), "load": _load(), "_out": out}


def _alternate(rep: int, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[Any, Any]:
    """Run both sides of a comparison, ``a`` first in even repetitions and ``b`` first in odd ones."""
    if rep % 2 == 0:
        ra = a()
        return ra, b()
    rb = b()
    return a(), rb


def _summarise_pipeline(reps: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_s", "engine_startup_s", "engine_ready_after_s", "first_call_s", "e2e_per_s",
            "excl_startup_per_s", "steady_per_s", "engine_busy", "actor_overhead_s")
    return {k: _median([r[k] for r in reps]) for k in keys} | {"requests": reps[0]["requests"], "reps": reps}


def _strip(reps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in reps]


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
            requests.append(Request(messages=messages, seed=seed_for(cfg.seed, "caption", sample.key), image=img.to_pil()))
            requests[-1].key = sample.key  # for comparing outputs
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
    log.info("caption: bare engine up in %.1fs, first batch (warm-up) %.1fs; %d images, %d reps",
             startup, warm_s, len(requests), s.reps)
    pipe, bare = [], []
    for rep in range(s.reps):
        root = _fresh_root(f"caption-{rep}", ctx.images)
        cfg = ctx.cfg(root)
        p_rep, b_rep = _alternate(rep, partial(_pipeline_rep, ctx, "caption", cfg, shards),
                                  partial(_bare_rep, engine, requests, s.batch_size))
        pipe.append(p_rep)
        bare.append(b_rep)
        log.info("caption rep %d: pipeline %.2f img/s steady (%.1fs wall, engine start %.1fs), bare %.2f img/s",
                 rep, pipe[-1]["steady_per_s"] or 0, pipe[-1]["wall_s"], pipe[-1]["engine_startup_s"], bare[-1]["per_s"])
        if rep == 0:
            same = _compare_captions(root, requests, bare[-1]["_out"])
        shutil.rmtree(root)
    if pipe[0]["requests"] != len(requests):
        log.warning("caption: pipeline captioned %d images, bare engine %d", pipe[0]["requests"], len(requests))
    return {
        "images": len(requests),
        "shards": shards,
        "batch_size": s.batch_size,
        "model": str(spec.model),
        "bare_engine_startup_s": startup,
        "bare_warmup_batch_s": warm_s,
        "pipeline": _summarise_pipeline(pipe),
        "bare": {"per_s": _median([r["per_s"] for r in bare]), "seconds": _median([r["seconds"] for r in bare]),
                 "reps": _strip(bare)},
        "outputs_identical": same,
    }


def _compare_captions(root: Path, requests: list, outs: list) -> str:
    """Greedy captions of the pipeline and of the bare engine, key by key (a sanity check)."""
    import pyarrow.parquet as pq

    committed = {}
    for p in (root / "captions").glob("*.parquet"):
        for r in pq.read_table(p, columns=["key", "vlm_caption"]).to_pylist():
            committed[r["key"]] = r["vlm_caption"]
    same = sum(committed.get(r.key) == (g.text or "").strip() for r, g in zip(requests, outs))
    return f"{same}/{len(requests)}"


# --------------------------------------------------------------------------- 2. fuse
def _write_captions(root: Path, shards: list[str], cfg: Any) -> None:
    """Committed captions for the fuse stage's input: in-domain sentences of the bench tokenizer.

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
    result: dict[str, Any] = {"requests": len(requests), "shards": shards, "batch_size": s.batch_size,
                              "model": cfg0.fuse.model, "prefix_caching": {}}
    engines, pipe, bare = {}, {True: [], False: []}, {True: [], False: []}
    for pc_on in (True, False):
        spec = engine_spec(ctx.cfg(base, f"fuse.engine.enable_prefix_caching={str(pc_on).lower()}").fuse, multimodal=False)
        engines[pc_on], startup = _load_engine_timed(spec)
        warm_s, out = _run_batches(engines[pc_on], requests[: s.batch_size], s.batch_size)
        result["prefix_caching"][pc_on] = {"bare_engine_startup_s": startup, "bare_warmup_batch_s": warm_s}
        log.info("fuse (prefix caching %s): bare engine up in %.1fs, warm-up batch %.1fs, prompt ~%d tokens",
                 "on" if pc_on else "off", startup, warm_s, out[0].n_prompt_tokens or 0)
    result["prompt_tokens_mean"] = statistics.mean(g.n_prompt_tokens or 0 for g in out)
    ctx.engines["fuse"], ctx.requests["fuse"] = engines[True], requests
    for rep in range(s.reps):
        for pc_on in (True, False) if rep % 2 == 0 else (False, True):
            root = WORK / "runs" / f"fuse-{rep}-{pc_on}"
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            (root / "images").symlink_to(ctx.images.resolve(), target_is_directory=True)
            shutil.copytree(base / "captions", root / "captions")
            cfg = ctx.cfg(root, f"fuse.engine.enable_prefix_caching={str(pc_on).lower()}")
            p_rep, b_rep = _alternate(rep, partial(_pipeline_rep, ctx, "fuse", cfg, shards),
                                      partial(_bare_rep, engines[pc_on], requests, s.batch_size))
            pipe[pc_on].append(p_rep)
            bare[pc_on].append(b_rep)
            log.info("fuse rep %d, prefix caching %s: pipeline %.2f/s steady (%.1fs wall), bare %.2f/s",
                     rep, "on" if pc_on else "off", pipe[pc_on][-1]["steady_per_s"] or 0, pipe[pc_on][-1]["wall_s"],
                     bare[pc_on][-1]["per_s"])
            shutil.rmtree(root)
    for pc_on in (True, False):
        result["prefix_caching"][pc_on] |= {
            "pipeline": _summarise_pipeline(pipe[pc_on]),
            "bare": {"per_s": _median([r["per_s"] for r in bare[pc_on]]),
                     "seconds": _median([r["seconds"] for r in bare[pc_on]]), "reps": _strip(bare[pc_on])},
        }
        if pipe[pc_on][0]["requests"] != len(requests):
            log.warning("fuse: pipeline sent %d requests, bare engine %d", pipe[pc_on][0]["requests"], len(requests))
    engines[False].close()
    shutil.rmtree(base)
    result["prefix_caching"] = {("on" if k else "off"): v for k, v in result["prefix_caching"].items()}
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
        _run_batches(hf_engine, requests[: min(4, n)], s.batch_size)  # warm-up
        v, h = [], []
        for rep in range(s.reps):
            v_rep, h_rep = _alternate(rep, partial(_bare_rep, vllm_engine, requests, s.batch_size),
                                      partial(_bare_rep, hf_engine, requests, s.batch_size))
            v.append(v_rep)
            h.append(h_rep)
            log.info("backends %s rep %d: vLLM %.2f/s, hf %.2f/s", kind, rep, v[-1]["per_s"], h[-1]["per_s"])
        same = sum((a.text or "") == (b.text or "") for a, b in zip(v[0]["_out"], h[0]["_out"]))
        out[kind] = {
            "requests": len(requests),
            "batch_size": s.batch_size,
            "model": str(section.model),
            "hf_startup_s": hf_startup,
            "vllm_per_s": _median([r["per_s"] for r in v]),
            "hf_per_s": _median([r["per_s"] for r in h]),
            "outputs_identical": f"{same}/{len(requests)}",
            "vllm_reps": _strip(v),
            "hf_reps": _strip(h),
        }
        del hf_engine
    return out


# --------------------------------------------------------------------------- 4. I/O
def _io_vecap(images: Path, shards: list[str], out_root: Path, cfg: Any, image_size: int) -> int:
    """The pipeline's CPU path for a shard, model left out: read + decode (the caption stage's
    own read UDF) and the Parquet commit of the shard's rows (captions/ layout, no captions)."""
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
        n += sum(1 for r in rows if r["needs_caption"] or r["status"] != "ok")
        table_rows = caption_stage.caption_rows(rows, prov)
        stats = {"stage": "caption", "shard": shard, "n_rows": len(rows), "read_report": report}
        out.commit(shard, stats, schemas.table(table_rows, schemas.CAPTIONS), schemas.CAPTIONS)
    return n


def _io_plain(images: Path, shards: list[str]) -> int:
    """A plain loop: tarfile + PIL decode to RGB, nothing else."""
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
                        Image.open(_io.BytesIO(data)).convert("RGB")
                    n += 1
    return n


def bench_io(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    shards = ctx.shards[: s.io_shards]
    cfg = ctx.cfg(WORK / "runs" / "io")
    vec, plain = [], []
    n_vec = n_plain = 0

    def one_vecap() -> None:
        nonlocal n_vec
        root = WORK / "runs" / "io"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        n_vec = _io_vecap(ctx.images, shards, root, cfg, s.io_image_size)
        vec.append(time.perf_counter() - t0)
        shutil.rmtree(root, ignore_errors=True)

    def one_plain() -> None:
        nonlocal n_plain
        t0 = time.perf_counter()
        n_plain = _io_plain(ctx.images, shards)
        plain.append(time.perf_counter() - t0)

    one_plain()  # page cache warm for both
    plain.clear()
    for rep in range(max(3, s.reps)):
        _alternate(rep, one_vecap, one_plain)
    log.info("io: vecap %.2fs, plain %.2fs per pass over %d samples", _median(vec), _median(plain), n_plain)
    return {
        "samples": n_plain,
        "vecap_samples": n_vec,
        "shards": len(shards),
        "image_size": s.io_image_size,
        "vecap_per_s": n_plain / _median(vec),
        "plain_per_s": n_plain / _median(plain),
        "vecap_s": vec,
        "plain_s": plain,
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


def _sample_tree(proc, stop: threading.Event, peak: dict[str, Any], interval: float = 0.25) -> None:
    import psutil

    while not stop.is_set():
        try:
            procs = [proc] + proc.children(recursive=True)
        except psutil.Error:
            procs = []
        rss = pss = 0
        biggest = 0
        for p in procs:
            try:
                r = p.memory_info().rss
            except psutil.Error:
                continue
            rss += r
            biggest = max(biggest, r)
            pss += (_pss_kib(p.pid) or r // 1024) * 1024
        peak["rss"] = max(peak.get("rss", 0), rss)
        peak["pss"] = max(peak.get("pss", 0), pss)
        peak["largest_process_rss"] = max(peak.get("largest_process_rss", 0), biggest)
        peak["processes"] = max(peak.get("processes", 0), len(procs))
        stop.wait(interval)


def _memory_run(ctx: Ctx, shards: list[str], name: str) -> dict[str, Any]:
    import psutil

    root = _fresh_root(name, ctx.images)
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    cmd = [sys.executable, "-m", "vecap.cli", "run", "--config", str(REPO / "pipelines" / "demo.yaml"),
           "--no-progress", "--set", f"root={root}", "--set", f"caption.model={ctx.tiny['llava']}",
           "--set", f"fuse.model={ctx.tiny['llama']}", "--shards", *shards]
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop(TIMINGS_ENV, None)
    log_path = WORK / "runs" / f"{name}.log"
    peak: dict[str, Any] = {}
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
    rows = 0
    for stats in (root / "vecap").glob("*_stats.json"):
        rows += json.loads(stats.read_text()).get("n_rows", 0)
    if rc != 0:
        raise RuntimeError(f"memory run {name} failed (exit {rc}); see {log_path}")
    shutil.rmtree(root)
    return {"shards": len(shards), "samples": rows, "wall_s": wall,
            "peak_pss_mib": peak.get("pss", 0) / 2**20, "peak_rss_sum_mib": peak.get("rss", 0) / 2**20,
            "largest_process_rss_mib": peak.get("largest_process_rss", 0) / 2**20,
            "max_processes": peak.get("processes", 0)}


def bench_memory(ctx: Ctx) -> dict[str, Any]:
    k = ctx.sizes.memory_shards
    if 4 * k > len(ctx.shards):
        raise RuntimeError(f"need {4 * k} shards, have {len(ctx.shards)}")
    small = _memory_run(ctx, ctx.shards[:k], "memory-n")
    log.info("memory: N=%d samples peak PSS %.0f MiB (%.0fs)", small["samples"], small["peak_pss_mib"], small["wall_s"])
    large = _memory_run(ctx, ctx.shards[: 4 * k], "memory-4n")
    log.info("memory: 4N=%d samples peak PSS %.0f MiB (%.0fs)", large["samples"], large["peak_pss_mib"], large["wall_s"])
    return {"n": small, "4n": large, "ratio_pss": large["peak_pss_mib"] / small["peak_pss_mib"],
            "ratio_rss_sum": large["peak_rss_sum_mib"] / small["peak_rss_sum_mib"],
            "models": {k2: str(v) for k2, v in ctx.tiny.items()}}


# --------------------------------------------------------------------------- report
def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(results: dict[str, Any]) -> tuple[list[list[str]], dict[str, bool | None]]:
    """Rows: comparison | measured | A | B | A/B | target | met."""
    rows: list[list[str]] = []
    verdicts: dict[str, bool | None] = {}

    def add(name: str, measured: str, a: Any, b: Any, key: str | None, ratio: float | None = None, unit: str = "") -> None:
        ratio = _ratio(a, b) if ratio is None else ratio
        target, ok = ("", None)
        if key:
            target = TARGETS[key][0]
            ok = TARGETS[key][1](ratio) if ratio is not None else None
            verdicts[f"{key}:{name}"] = ok
        rows.append([name, measured, f"{_fmt(a)}{unit}", f"{_fmt(b)}{unit}", _fmt(ratio),
                     target, {True: "yes", False: "**no**", None: ""}[ok]])

    c = results.get("caption")
    if c and "error" not in c:
        p = c["pipeline"]
        n = f"{c['images']} images, batch {c['batch_size']}"
        add("caption stage / bare engine", f"images/s, steady state (after the first batch; {n})",
            p["steady_per_s"], c["bare"]["per_s"], "caption")
        add("caption stage / bare engine", "images/s, run wall time minus the actor's engine start-up",
            p["excl_startup_per_s"], c["bare"]["per_s"], None)
        add("caption stage / bare engine", "images/s, whole run (incl. engine start-up) / bare incl. nothing",
            p["e2e_per_s"], c["bare"]["per_s"], None)
        add("caption engine start-up", "s: in the pipeline's actor / first construction in this process",
            p["engine_startup_s"], c["bare_engine_startup_s"], None)
        add("caption first batch (warm-up)", "s: pipeline actor's first batch / bare engine's first batch",
            p["first_call_s"], c["bare_warmup_batch_s"], None)
    f = results.get("fuse")
    if f and "error" not in f:
        for mode in ("on", "off"):
            m = f["prefix_caching"][mode]
            add(f"fuse stage / bare engine, prefix caching {mode}",
                f"fusions/s, steady state ({f['requests']} requests, batch {f['batch_size']}, ~{f['prompt_tokens_mean']:.0f} prompt tokens)",
                m["pipeline"]["steady_per_s"], m["bare"]["per_s"], "fuse")
            add(f"fuse stage / bare engine, prefix caching {mode}", "fusions/s, run wall time minus engine start-up",
                m["pipeline"]["excl_startup_per_s"], m["bare"]["per_s"], None)
        add("prefix caching on / off", "fusions/s of the bare engine",
            f["prefix_caching"]["on"]["bare"]["per_s"], f["prefix_caching"]["off"]["bare"]["per_s"], None)
        add("fuse engine start-up", "s: pipeline actor (caching on) / first construction here",
            f["prefix_caching"]["on"]["pipeline"]["engine_startup_s"], f["prefix_caching"]["on"]["bare_engine_startup_s"], None)
    b = results.get("backends")
    if b and "error" not in b:
        for kind, v in b.items():
            if not isinstance(v, dict):
                continue
            add(f"vLLM / hf, {kind} model", f"requests/s, bare engines, greedy, {v['requests']} requests, batch {v['batch_size']}"
                f" (identical outputs {v['outputs_identical']})", v["vllm_per_s"], v["hf_per_s"], "backends")
    i = results.get("io")
    if i and "error" not in i:
        add("I/O: vecap path / plain loop", f"samples/s: read+decode+resize to {i['image_size']}+Parquet commit / tarfile+PIL decode"
            f" ({i['samples']} samples, {i['shards']} shards)", i["vecap_per_s"], i["plain_per_s"], "io")
    m = results.get("memory")
    if m and "error" not in m:
        add("memory: 4N / N", f"peak PSS MiB of `vecap run` process tree (tiny models; N={m['n']['samples']}, 4N={m['4n']['samples']})",
            m["4n"]["peak_pss_mib"], m["n"]["peak_pss_mib"], "memory", unit="")
        add("memory: 4N / N", "peak summed RSS MiB (counts shared pages once per process)",
            m["4n"]["peak_rss_sum_mib"], m["n"]["peak_rss_sum_mib"], None)
    return rows, verdicts


def _markdown(results: dict[str, Any]) -> str:
    rows, _ = _table(results)
    head = ["comparison", "measured", "A", "B", "A/B", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    meta = results["meta"]
    errors = [f"- {k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v]
    notes = [
        "",
        f"{'quick' if meta['quick'] else 'full'} run, {meta['reps']} repetitions (median; the order of the two sides alternates), "
        f"{meta['seconds']:.0f}s in all; load average {meta['load_start']} at the start, {meta['load_end']} at the end "
        f"on {meta['cpus']} CPUs (a shared machine: other jobs slow either side at random).",
        "",
        "- Models: bench-scale random-weight LLaVA and Llama (vecap.tiny_models, scale=bench), float32, "
        "the settings of pipelines/demo.yaml; the memory runs use the tiny models.",
        "- Pipeline: `vecap.pipeline.run(cfg, [stage], overwrite=True)` on a fresh root each repetition, Ray started beforehand. "
        "Steady state: requests after the engine actor's first batch / time from the end of its first batch to the end of its "
        "last (from the actor's own clock: a subclass of the stage's actor records the times). The first batch of a new engine "
        "is slower (warm-up) and is left out on both sides: the bare engine gets a warm-up batch before timing.",
        "- Bare engine: `load_engine(spec).generate(batch)` with the same EngineSpec, the same requests (built by the stages' own "
        "functions, images decoded beforehand) and the same batch size; its prefix and multimodal caches are reset before each "
        "repetition.",
        "- Fuse input: committed captions with in-domain sentences (the random VLM's captions would mostly be settled without "
        "the LLM); the requests are what the fuse stage sends.",
        "- Memory: psutil samples (every 0.25 s) of the `vecap run` subprocess and all its descendants (Ray's GCS, raylet, "
        "workers and engine actors); PSS from /proc/<pid>/smaps_rollup.",
    ]
    if errors:
        notes += ["", "Sections that failed:", *errors]
    return "\n".join(lines + notes) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- main
def _prepare(sizes: Sizes) -> Ctx:
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
        f"caption.image_size={vision['image_size']}",
        f"caption.batch_size={sizes.batch_size}",
        f"fuse.batch_size={sizes.batch_size}",
    ]
    return Ctx(sizes=sizes, images=data, shards=list_shards(str(data)), models=models, tiny=tiny,
               timings=timings, overrides=overrides)


def main(out_dir: str = "bench/results", quick: bool = False) -> int:
    """Run every comparison; write ``results.json`` and ``results.md`` to ``out_dir``; 0 if all sections ran."""
    _setup_env()
    t_start = time.time()
    sizes = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_start = _load()
    ctx = _prepare(sizes)
    os.environ[TIMINGS_ENV] = str(ctx.timings)
    ray_tmp = tempfile.mkdtemp(prefix="vecap-bench-ray-", dir="/tmp")
    results: dict[str, Any] = {}
    section_s: dict[str, float] = {}
    sections: list[tuple[str, Callable[[Ctx], dict[str, Any]]]] = [
        ("io", bench_io),
        ("memory", bench_memory),
        ("caption", bench_caption),
        ("fuse", bench_fuse),
        ("backends", bench_backends),
    ]
    try:
        for name, fn in sections:
            if name == "caption":  # Ray for the in-process pipeline runs, started before any timing
                import ray

                from vecap.pipeline import init_ray

                os.environ["RAY_TMPDIR"] = ray_tmp
                init_ray(ctx.cfg(WORK / "runs" / "ray"))
                log.info("Ray up: %s", ray.cluster_resources())
            t0 = time.time()
            log.info("=== %s", name)
            try:
                results[name] = fn(ctx)
            except Exception as err:  # one failed section must not hide the others
                log.exception("section %s failed", name)
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            section_s[name] = time.time() - t0
            log.info("=== %s done in %.0fs", name, time.time() - t0)
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
        "load_start": load_start,
        "load_end": _load(),
        "cpus": os.cpu_count(),
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
