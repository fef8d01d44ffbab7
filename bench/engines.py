"""Engine sections: caption and fuse stage against the bare engine, and vLLM against hf.

Pipeline side: ``vecap.pipeline.run(cfg, [stage])`` on a fresh root; its start-up is what
the stage records in its shard markers (``timings.engine_start_s``), and its throughput is
requests / (run wall time − start-up). The markers' ``timings.t_<stage>_engine`` (the
engine actor's calls, summed over the shard's rows) is reported too; with several batches
in flight per actor (``max_batches_in_flight``) those calls overlap, so their sum exceeds
the engine's busy time and requests / sum understates the stage's throughput. Bare side: ``vecap.backends.load_engine(spec).generate``
in this process, with the stage's own ``EngineSpec``, the same requests (built with the
stages' own functions) and batch size. Nothing of the library is subclassed or patched.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.context import WORK, Ctx, read_markers, summed_timings
from bench.harness import Target, median, timed

log = logging.getLogger("bench")

STAGE_VS_ENGINE = Target(">=", 0.9)
VLLM_VS_HF = Target(">=", 3.0)


# --------------------------------------------------------------------------- shared
def vllm_reset(engine: Any) -> None:
    """Empty a vLLM engine's prefix and multimodal caches: the next call starts cold, as in a new run."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return
    llm.reset_prefix_cache()
    if hasattr(llm, "reset_mm_cache"):
        llm.reset_mm_cache()


def run_batches(engine: Any, requests: list, batch_size: int) -> tuple[float, list]:
    """Hand the engine the requests in batches, as the stage's actor gets them; (seconds, outputs)."""
    vllm_reset(engine)

    def go() -> list:
        out: list = []
        for i in range(0, len(requests), batch_size):
            out += engine.generate(requests[i : i + batch_size])
        return out

    seconds, out = timed(go)
    errors = [g.error for g in out if g.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(out)} requests failed, e.g. {errors[0]}")
    return seconds, out


def bare_rep(engine: Any, requests: list, batch_size: int) -> dict[str, Any]:
    from bench.harness import load

    seconds, out = run_batches(engine, requests, batch_size)
    return {"seconds": seconds, "requests": len(requests), "per_s": len(requests) / seconds, "load": load(), "_out": out}


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of every numeric field, and the repetitions themselves (outputs left out)."""
    keys = [k for k, v in reps[0].items() if isinstance(v, (int, float)) and not k.startswith("_")]
    return {k: median(r.get(k) for r in reps) for k in keys} | {
        "reps": [{k: v for k, v in r.items() if not k.startswith("_")} for r in reps]
    }


def ensure_ray(ctx: Ctx) -> None:
    """The pipeline runs' local Ray (the recipe's), started once before any timing."""
    from vecap.pipeline import init_ray

    init_ray(ctx.cfg(WORK / "runs" / "ray"))


def pipeline_rep(cfg: Any, stage: str, shards: list[str]) -> dict[str, Any]:
    """One run of one stage; its engine time and start-up from the stage's own markers."""
    import pyarrow.parquet as pq

    from bench.harness import load
    from vecap import pipeline

    wall, result = timed(lambda: pipeline.run(cfg, [stage], overwrite=True, shards=shards, progress=False))
    layout = result.layout
    t = summed_timings(read_markers(layout, stage))
    done = pq.read_table(layout.stage(stage), columns=["key", "finish_reason"])  # the stage's rows, as pandas reads them
    requests = done.num_rows - done["finish_reason"].null_count  # rows the engine answered
    engine_s = t.get(f"t_{stage}_engine", 0.0)
    startup = t.get("engine_start_s", 0.0)
    return {
        "wall_s": wall,
        "rows": result.tallies[stage].rows,
        "requests": requests,
        "engine_calls_s": engine_s,  # the actor's calls, summed over rows by the stage (overlapping when in flight > 1)
        "engine_start_s": startup,  # the actor's engine construction (import + load)
        "engine_starts": t.get("engine_starts", 0),
        "engine_calls_per_s": requests / engine_s if engine_s else None,
        "excl_startup_per_s": requests / (wall - startup) if wall > startup else None,
        "e2e_per_s": requests / wall,
        "load": load(),
    }


# --------------------------------------------------------------------------- 1. caption
def caption_requests(cfg: Any, images: Path, shards: list[str]) -> tuple[list, list[str]]:
    """The caption actor's requests, built as the stage builds them (same keys, seeds, messages, pixels)."""
    from PIL import Image

    from vecap.backends import Request
    from vecap.stages.caption import CaptionStage, read_image_rows
    from vecap.storage import Storage

    stage = CaptionStage(cfg.caption, cfg.seed)
    messages = stage.prompt.messages(image=True)
    storage = Storage.for_path(str(images))
    requests, keys = [], []
    for shard in shards:
        for table in read_image_rows(storage, str(images), shard, stage.read_options):
            for r in table.to_pylist():
                if r.get("needs_caption"):
                    image = Image.frombytes("RGB", (r["pixels_w"], r["pixels_h"]), r["pixels"])
                    requests.append(Request(messages=messages, seed=r["caption_seed"], image=image))
                    keys.append(r["key"])
    return requests, keys


def bench_caption(ctx: Ctx) -> dict[str, Any]:
    from vecap.backends import load_engine
    from vecap.stages.base import engine_spec

    s, h = ctx.sizes, ctx.harness
    ensure_ray(ctx)
    shards = ctx.shards[: s.caption_shards]
    cfg0 = ctx.cfg(WORK / "runs" / "caption")
    requests, keys = caption_requests(cfg0, ctx.images, shards)
    spec = engine_spec(cfg0.caption, multimodal=True)
    startup, engine = timed(lambda: load_engine(spec))
    ctx.engines["caption"], ctx.requests["caption"] = engine, requests
    warm_s, _ = run_batches(engine, requests[: s.batch_size], s.batch_size)
    log.info("caption: bare engine up in %.1fs, warm-up batch %.1fs; %d images", startup, warm_s, len(requests))
    roots: list[Path] = []

    def pipe() -> dict[str, Any]:
        root = ctx.fresh_root(f"caption-{len(roots)}")
        roots.append(root)
        rep = pipeline_rep(ctx.cfg(root), "caption", shards)
        log.info("caption pipeline: %.2f img/s excluding start-up, %.1fs wall, engine start %.1fs",
                 rep["excl_startup_per_s"] or 0, rep["wall_s"], rep["engine_start_s"])
        return rep

    def bare() -> dict[str, Any]:
        rep = bare_rep(engine, requests, s.batch_size)
        log.info("caption bare engine: %.2f img/s", rep["per_s"])
        return rep

    reps = h.compare("caption", {"pipeline": pipe, "bare": bare})
    same = _same_captions(roots[0], keys, reps["bare"][0]["_out"])
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    p, b = summarise(reps["pipeline"]), summarise(reps["bare"])
    n = f"{len(requests)} images, batch {s.batch_size}"
    h.add("caption", "caption stage / bare engine", f"images/s: images / (run wall time − the actor's engine_start_s) / "
          f"the bare engine's generate calls ({n})", p["excl_startup_per_s"], b["per_s"], STAGE_VS_ENGINE)
    h.add("caption", "caption stage / bare engine (b)", f"images/s over the actor's summed calls (Σ t_caption_engine; "
          f"overlapping with {cfg0.caption.max_batches_in_flight} batches in flight)", p["engine_calls_per_s"], b["per_s"])
    h.add("caption", "caption stage / bare engine (c)", "images/s: images / whole run wall time (start-up included)",
          p["e2e_per_s"], b["per_s"])
    h.add("caption", "caption engine start-up", "s: the actor's engine_start_s / load_engine in this process",
          p["engine_start_s"], startup)
    if p["requests"] != len(requests):
        log.warning("caption: the pipeline captioned %d images, the bare engine %d", p["requests"], len(requests))
    return {"images": len(requests), "shards": shards, "batch_size": s.batch_size, "model": str(spec.model),
            "bare_engine_startup_s": startup, "bare_warmup_batch_s": warm_s, "pipeline": p, "bare": b,
            "outputs_identical": same}


def _same_captions(root: Path, keys: list[str], outs: list) -> str:
    """Greedy captions of the pipeline and of the bare engine, key by key (a sanity check)."""
    import pyarrow.parquet as pq

    from vecap.layout import Layout

    committed = dict(zip(*pq.read_table(Layout(str(root)).stage("caption"), columns=["key", "vlm_caption"]).to_pydict().values()))
    same = sum(committed.get(k) == ((g.text or "").strip() or None) for k, g in zip(keys, outs))
    return f"{same}/{len(keys)}"


# --------------------------------------------------------------------------- 2. fuse
def write_captions(root: Path, shards: list[str], cfg: Any) -> None:
    """Committed captions as the fuse stage's input, through the library's commit path.

    In-domain sentences for the bench tokenizer: the random bench VLM's captions are byte
    soup, often empty, which the fuse stage settles without the LLM; real captions are one sentence.
    """
    from vecap import schemas
    from vecap.demo.tiny_models import training_sentences
    from vecap.layout import Layout
    from vecap.outputs import StageOutput
    from vecap.stages.base import seed_for
    from vecap.stages.caption import CaptionStage, read_image_rows
    from vecap.storage import Storage

    sentences = training_sentences(2000)
    stage = CaptionStage(cfg.caption, cfg.seed)
    storage = Storage.for_path(str(root))
    layout = Layout(str(root))
    out = StageOutput(layout, "caption", storage)
    i = 0
    for shard in shards:
        rows = []
        for table in read_image_rows(storage, layout.images, shard, stage.read_options):
            for r in table.to_pylist():
                if r["is_marker"]:
                    continue
                row = {"key": r["key"], "shard": shard, "status": r["status"], "error": r["error"],
                       "seed": seed_for(cfg.seed, "caption", r["key"]), "model": "bench-synthetic", "prompt_id": "bench",
                       "prompt_sha256": "0" * 64, "params_sha256": "0" * 64}
                if r.get("needs_caption"):
                    row.update(vlm_caption=sentences[i % len(sentences)], finish_reason="stop")
                    i += 1
                rows.append(row)
        table = schemas.table(sorted(rows, key=lambda r: r["key"]), schemas.CAPTIONS)
        out.commit(shard, table, {"stage": "caption", "shard": shard, "n_rows": len(rows), "fingerprint": None})


def fuse_requests(cfg: Any, root: Path, shards: list[str]) -> list:
    """The fuse actor's requests, built with the stage's own CPU steps (same messages and seeds)."""
    from vecap.backends import Request
    from vecap.layout import Layout
    from vecap.stages.fuse import FuseStage, prepare_fuse_requests, read_caption_rows
    from vecap.storage import Storage

    f = cfg.fuse
    stage = FuseStage(f, cfg.seed)
    storage = Storage.for_path(str(root))
    requests = []
    for shard in shards:
        for table in read_caption_rows(storage, Layout(str(root)), shard):
            table = prepare_fuse_requests(table, stage.prompt, f.max_alt_text_words, cfg.seed)
            for r in table.to_pylist():
                if r.get("needs_fuse"):
                    requests.append(Request(messages=json.loads(r["fuse_messages"]), seed=r["fuse_seed"]))
    return requests


def bench_fuse(ctx: Ctx) -> dict[str, Any]:
    from vecap.backends import load_engine
    from vecap.stages.base import engine_spec

    s, h = ctx.sizes, ctx.harness
    ensure_ray(ctx)
    shards = ctx.shards[: s.fuse_shards]
    base = ctx.fresh_root("fuse-input")
    cfg0 = ctx.cfg(base)
    write_captions(base, shards, cfg0)
    requests = fuse_requests(cfg0, base, shards)
    modes = {"on": "fuse.engine.enable_prefix_caching=true", "off": "fuse.engine.enable_prefix_caching=false"}
    result: dict[str, Any] = {"requests": len(requests), "shards": shards, "batch_size": s.batch_size,
                              "model": cfg0.fuse.model, "prefix_caching": {m: {} for m in modes}}
    engines: dict[str, Any] = {}
    out: list = []
    for mode, override in modes.items():
        # Both engines stay alive to the end: destroying an in-process vLLM engine tears down
        # vLLM's process-wide parallel state, which breaks the other engines of this process.
        startup, engines[mode] = timed(lambda o=override: load_engine(engine_spec(ctx.cfg(base, o).fuse, multimodal=False)))
        warm_s, out = run_batches(engines[mode], requests[: s.batch_size], s.batch_size)
        result["prefix_caching"][mode] |= {"bare_engine_startup_s": startup, "bare_warmup_batch_s": warm_s}
        log.info("fuse, prefix caching %s: bare engine up in %.1fs, warm-up batch %.1fs", mode, startup, warm_s)
    result["prompt_tokens_mean"] = statistics.mean(g.n_prompt_tokens or 0 for g in out)
    result["output_tokens_mean"] = statistics.mean(g.n_output_tokens or 0 for g in out)
    ctx.engines["fuse"], ctx.requests["fuse"] = engines["on"], requests
    n_roots = [0]

    def pipe(mode: str) -> dict[str, Any]:
        n_roots[0] += 1
        root = ctx.fresh_root(f"fuse-{n_roots[0]}")
        shutil.copytree(base / "captions", root / "captions")
        rep = pipeline_rep(ctx.cfg(root, modes[mode]), "fuse", shards)
        shutil.rmtree(root, ignore_errors=True)
        log.info("fuse pipeline, prefix caching %s: %.2f/s excluding start-up (%.1fs wall)", mode,
                 rep["excl_startup_per_s"] or 0, rep["wall_s"])
        return rep

    def bare(mode: str) -> dict[str, Any]:
        rep = bare_rep(engines[mode], requests, s.batch_size)
        log.info("fuse bare engine, prefix caching %s: %.2f/s", mode, rep["per_s"])
        return rep

    sides = {f"{side}-{mode}": (lambda f=fn, m=mode: f(m)) for mode in modes for side, fn in (("pipeline", pipe), ("bare", bare))}
    reps = h.compare("fuse", sides)
    tok = f"{len(requests)} requests, batch {s.batch_size}, ~{result['prompt_tokens_mean']:.0f} prompt tokens"
    for mode in modes:
        p, b = summarise(reps[f"pipeline-{mode}"]), summarise(reps[f"bare-{mode}"])
        result["prefix_caching"][mode] |= {"pipeline": p, "bare": b}
        h.add("fuse", f"fuse stage / bare engine, prefix caching {mode}", f"fusions/s: requests / (run wall time − "
              f"engine_start_s) ({tok})", p["excl_startup_per_s"], b["per_s"], STAGE_VS_ENGINE)
        h.add("fuse", f"fuse stage / bare engine, prefix caching {mode} (b)", "fusions/s over the actor's summed calls "
              "(Σ t_fuse_engine; overlapping with batches in flight)", p["engine_calls_per_s"], b["per_s"])
        if p["requests"] != len(requests):
            log.warning("fuse: the pipeline sent %d requests, the bare engine %d", p["requests"], len(requests))
    on, off = result["prefix_caching"]["on"], result["prefix_caching"]["off"]
    h.add("fuse", "prefix caching on / off, bare engine", "fusions/s", on["bare"]["per_s"], off["bare"]["per_s"])
    h.add("fuse", "prefix caching on / off, fuse stage", "fusions/s excluding start-up",
          on["pipeline"]["excl_startup_per_s"], off["pipeline"]["excl_startup_per_s"])
    h.add("fuse", "fuse engine start-up", "s: the actor's engine_start_s / load_engine in this process (vLLM imported)",
          on["pipeline"]["engine_start_s"], on["bare_engine_startup_s"])
    shutil.rmtree(base, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- 3. vLLM vs hf
def bench_backends(ctx: Ctx) -> dict[str, Any]:
    from vecap.backends import load_engine
    from vecap.stages.base import engine_spec

    s, h = ctx.sizes, ctx.harness
    cfg = ctx.cfg(WORK / "runs" / "backends")
    out: dict[str, Any] = {}
    for kind, section, multimodal, n in (("caption", cfg.caption, True, s.backend_caption_requests),
                                         ("fuse", cfg.fuse, False, s.backend_fuse_requests)):
        if kind not in ctx.engines:
            log.warning("backends: no %s engine (its section failed or did not run); skipped", kind)
            continue
        requests = ctx.requests[kind][:n]
        vllm_engine = ctx.engines[kind]
        hf_startup, hf_engine = timed(lambda: load_engine(replace(engine_spec(section, multimodal), backend="hf",
                                                                  engine_kwargs={})))
        run_batches(hf_engine, requests[: min(2, n)], s.batch_size)  # warm-up
        reps = h.compare("backends", {"vllm": lambda: bare_rep(vllm_engine, requests, s.batch_size),
                                      "hf": lambda: bare_rep(hf_engine, requests, s.batch_size)})
        v, f = reps["vllm"], reps["hf"]
        same = sum((a.text or "") == (b.text or "") for a, b in zip(v[0]["_out"], f[0]["_out"]))
        out[kind] = {"requests": len(requests), "batch_size": s.batch_size, "model": str(section.model),
                     "hf_startup_s": hf_startup, "vllm": summarise(v), "hf": summarise(f),
                     "outputs_identical": f"{same}/{len(requests)}"}
        h.add("backends", f"vLLM / hf, {kind} model", f"requests/s, bare engines, greedy, {len(requests)} requests, batch "
              f"{s.batch_size} (identical outputs: {same}/{len(requests)})", out[kind]["vllm"]["per_s"],
              out[kind]["hf"]["per_s"], VLLM_VS_HF)
        log.info("backends, %s model: vLLM %.2f/s, hf %.2f/s", kind, out[kind]["vllm"]["per_s"], out[kind]["hf"]["per_s"])
        del hf_engine
    return out
