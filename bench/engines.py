"""Engine sections: the caption and fuse stages against the bare engine given every request in
one call (what a user's own script does), and vLLM against hf.

Output lengths: random-weight models never stop early, so every output of a batch would have
the same length and no tail would ever appear. Both sides run with the recipe's
``synthetic_lengths`` (EOS ignored; each request stops after a length drawn from its seed:
captions 8–40 tokens, fusions 20–80), and the bare engine's requests are built from the same
rows with the same seeds, so both get the same draw. The engines' ``max_num_seqs`` is set below
the number of requests (``Sizes.max_num_seqs``) so that an engine can be full at all.

Sides of each comparison (one after the other in each repetition, alternating order, medians):

- **pipeline**: ``vecap.pipeline.run(cfg, [stage])`` on a fresh root; requests / (run wall −
  the actor's engine start-up, ``<stage>_engine_start_s`` in the markers' ``engine`` counters).
  The markers carry no call timestamps, so the engine's own first-to-last-call wall is not
  known from outside; run wall − start-up is, and it is conservative: it charges the stage
  with Ray Data's planning, the first shard's read before the first batch, the CPU steps
  sharing the machine's cores with the engine, and the last commit (fill and drain, which a
  run of millions of samples amortises and a run of a few dozen does not);
- **actor**: the stage's own engine actor class (``CaptionWorker`` / ``FuseWorker``) driven in
  this process by an asyncio loop that keeps ``max_batches_in_flight`` batches of
  ``batch_size`` rows submitted, as Ray Data does when the upstream keeps up: requests / (first
  call to last return), the stage's engine wall without Ray Data;
- **single call**: that actor's engine given all requests in one ``generate`` call;
- **batches**: the same engine fed batch by batch (the old baseline), for reference.

Busy fraction: 1 − underfull_steps / steps (steps running fewer sequences than
``max_num_seqs``), from the markers' engine counters (pipeline) or the engine's ``stats()``
deltas (the others). On a GPU a decode step costs about the same for 1 or 256 sequences, so
it is the figure that carries over; on a CPU step time grows with the batch. Nothing of the
library is subclassed or patched.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import CAPTION_LENGTHS, FUSE_LENGTHS, WORK, Ctx, busy_fraction, read_markers, summed_timings
from bench.harness import Target, median, timed
from bench.workload import caption_rows, fuse_rows, vllm_reset, work_rows_schema, write_captions

log = logging.getLogger("bench")

STAGE_VS_ENGINE = Target(">=", 0.95)
BUSY_WITHIN_5_POINTS = Target(">=", -0.05, "difference")
VLLM_VS_HF = Target(">=", 3.0)
COUNTERS = ("steps", "underfull_steps", "seq_steps", "busy_s")


# --------------------------------------------------------------------------- shared
def _check(out: list) -> None:
    errors = [g.error for g in out if g.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(out)} requests failed, e.g. {errors[0]}")


def run_batches(engine: Any, requests: list, batch_size: int) -> tuple[float, list]:
    """Hand the engine the requests in batches, one call after the other; (seconds, outputs)."""
    vllm_reset(engine)

    def go() -> list:
        out: list = []
        for i in range(0, len(requests), batch_size):
            out += engine.generate(requests[i : i + batch_size])
        return out

    seconds, out = timed(go)
    _check(out)
    return seconds, out


def counted(engine: Any, fn: Any) -> tuple[float, Any, dict[str, float]]:
    """(seconds, result, the engine's counters over the call) of ``fn()``."""
    before = engine.stats()
    seconds, out = timed(fn)
    after = engine.stats()
    return seconds, out, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS if k in after}


def side(seconds: float, requests: int, counters: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One repetition of one side: throughput and the engine's counters."""
    from bench.harness import load

    steps, busy_s = counters.get("steps"), counters.get("busy_s")
    return {
        "seconds": seconds,
        "requests": requests,
        "per_s": requests / seconds if seconds else None,
        **{k: counters.get(k) for k in COUNTERS},
        "busy_fraction": busy_fraction(steps, counters.get("underfull_steps")),
        "mean_seqs_per_step": counters["seq_steps"] / steps if steps else None,
        "per_busy_s": requests / busy_s if busy_s else None,  # requests per second inside engine.step()
        "idle_s": seconds - busy_s if busy_s is not None else None,  # the side's seconds outside engine.step()
        "step_share": busy_s / seconds if busy_s is not None and seconds else None,  # share of the wall inside step()
        "load": load(),
        **extra,
    }


def single_rep(engine: Any, requests: list) -> dict[str, Any]:
    """The bare engine given every request in one call, caches emptied first."""
    vllm_reset(engine)
    seconds, out, c = counted(engine, lambda: engine.generate(list(requests)))
    _check(out)
    return side(seconds, len(requests), c, _out=out)


def batches_rep(engine: Any, requests: list, batch_size: int) -> dict[str, Any]:
    """The bare engine fed batch by batch (the old baseline)."""
    seconds, (_, out), c = counted(engine, lambda: run_batches(engine, requests, batch_size))
    return side(seconds, len(requests), c, _out=out)


def drive_actor(worker: Any, tables: list, in_flight: int) -> list:
    """Call an engine actor's async ``__call__`` on every table, at most ``in_flight`` at once (FIFO)."""
    import asyncio

    async def go() -> list:
        gate = asyncio.Semaphore(in_flight)

        async def one(table: Any) -> Any:
            async with gate:
                return await worker(table)

        return await asyncio.gather(*(one(t) for t in tables))

    return asyncio.run(go())


def actor_rep(worker: Any, rows: list[dict[str, Any]], batch_size: int, in_flight: int, flag: str) -> dict[str, Any]:
    """The stage's engine actor in this process, ``in_flight`` batches of ``batch_size`` rows submitted."""
    from vecap.stages.base import work_table

    vllm_reset(worker.engine)
    schema = work_rows_schema()
    tables = [work_table([dict(r) for r in rows[i : i + batch_size]], schema) for i in range(0, len(rows), batch_size)]
    seconds, out, c = counted(worker.engine, lambda: drive_actor(worker, tables, in_flight))
    done = sum(t.num_rows for t in out)
    if done != len(rows) or any(v for t in out for v in t[flag].to_pylist()):
        raise RuntimeError(f"the actor returned {done} rows of {len(rows)}, or left some unanswered")
    return side(seconds, len(rows), c, batches=len(tables), in_flight=in_flight)


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of every numeric field, and the repetitions themselves (outputs left out)."""
    keys = [k for k, v in reps[0].items() if isinstance(v, (int, float)) and not k.startswith("_")]
    return {k: median(r.get(k) for r in reps) for k in keys} | {
        "reps": [{k: v for k, v in r.items() if not k.startswith("_")} for r in reps]
    }


def ensure_ray(ctx: Ctx) -> None:
    """The pipeline runs' local Ray (the recipe's), started once before any timing."""
    from vecap.ray_env import init_ray

    init_ray(ctx.cfg(WORK / "runs" / "ray"))


def engine_overrides(ctx: Ctx, stage: str) -> list[str]:
    """The engine sections' recipe settings: realistic output lengths and an engine that can be full."""
    lo, hi = CAPTION_LENGTHS if stage == "caption" else FUSE_LENGTHS
    return [f"{stage}.synthetic_lengths=[{lo},{hi}]", f"{stage}.engine.max_num_seqs={ctx.sizes.max_num_seqs}"]


def pipeline_rep(cfg: Any, stage: str, shards: list[str]) -> dict[str, Any]:
    """One run of one stage; requests, start-up and engine counters from the stage's own markers."""
    import pyarrow.parquet as pq

    from vecap import pipeline

    wall, result = timed(lambda: pipeline.run(cfg, [stage], overwrite=True, shards=shards, progress=False))
    layout = result.layout
    t = summed_timings(read_markers(layout, stage))
    done = pq.read_table(
        layout.stage(stage), columns=["key", "finish_reason"]
    )  # the stage's rows, as pandas reads them
    answered = done.num_rows - done["finish_reason"].null_count  # rows the engine answered
    requests = int(t.get(f"{stage}_requests", answered))
    startup = t.get(f"{stage}_engine_start_s", 0.0)
    counters = {k: t[f"{stage}_{k}"] for k in COUNTERS if f"{stage}_{k}" in t}
    span = t.get(f"{stage}_span_s")  # the actor's first engine call to its last return (one actor here)
    return side(
        wall - startup,
        requests,
        counters,
        wall_s=wall,
        rows=result.tallies[stage].rows,
        answered=answered,
        engine_start_s=startup,
        engine_starts=t.get(f"{stage}_engine_starts", 0),
        e2e_per_s=requests / wall,
        engine_calls_s=t.get(f"t_{stage}_engine", 0.0),
        span_s=span,
        span_per_s=requests / span if span else None,
    )


def report_stage(
    ctx: Ctx, label: str, unit: str, n: str, reps: dict[str, list[dict[str, Any]]], in_flight: int
) -> dict[str, dict[str, Any]]:
    """The rows and table of one stage's comparison; returns the sides' summaries."""
    h = ctx.harness
    sec = label.split(",")[0]
    s = {name: summarise(r) for name, r in reps.items()}
    p, a, one, b = s["pipeline"], s["actor"], s["single"], s["batches"]
    h.add(
        sec,
        f"{label} stage / single-call engine",
        f"{unit}: requests / (run wall − the actor's engine start-up) "
        f"/ the bare engine given all requests in one call ({n})",
        p["per_s"],
        one["per_s"],
        STAGE_VS_ENGINE,
    )
    h.add(
        sec,
        f"{label} stage / single-call engine (d), steady state",
        f"{unit}: requests / the engine actor's span "
        "(its first engine call to its last return, markers' span_s: includes any wait for input between calls, "
        "leaves out the stream's fill before the first batch and the commit after the last) / single call",
        p["span_per_s"],
        one["per_s"],
        STAGE_VS_ENGINE,
    )
    h.add(
        sec,
        f"{label} stage / single-call engine (b), actor in-process",
        f"{unit}: the stage's engine actor, "
        f"{in_flight} batches in flight, requests / (first call to last return), no Ray Data / single call",
        a["per_s"],
        one["per_s"],
    )
    h.add(
        sec,
        f"{label} stage / single-call engine (c), engine steps only",
        f"{unit} per second inside engine.step() (Σ busy_s): pipeline / single call",
        p["per_busy_s"],
        one["per_busy_s"],
    )
    h.add(
        sec,
        f"{label} busy fraction, stage − single-call engine",
        "1 − underfull_steps/steps: pipeline (markers' engine counters) vs single call; target: at most 5 points below",
        p["busy_fraction"],
        one["busy_fraction"],
        BUSY_WITHIN_5_POINTS,
    )
    h.add(
        sec,
        f"{label} busy fraction (b), actor in-process − single call",
        "1 − underfull_steps/steps",
        a["busy_fraction"],
        one["busy_fraction"],
        BUSY_WITHIN_5_POINTS,
    )
    h.add(
        sec,
        f"{label} batch by batch / single-call engine (the old baseline)",
        f"{unit}: the bare engine fed one batch after the other / all requests in one call",
        b["per_s"],
        one["per_s"],
    )
    h.table(
        f"{label}: engine sides ({n}; medians; pipeline seconds: run wall − engine start-up)",
        [
            "side",
            "requests",
            "seconds",
            unit,
            "steps",
            "underfull steps",
            "busy fraction",
            "mean seqs/step",
            f"{unit} inside step()",
            "s outside step()",
        ],
        [
            [
                name,
                v["requests"],
                v["seconds"],
                v["per_s"],
                v["steps"],
                v["underfull_steps"],
                v["busy_fraction"],
                v["mean_seqs_per_step"],
                v["per_busy_s"],
                v["idle_s"],
            ]
            for name, v in s.items()
        ],
    )
    return s


# --------------------------------------------------------------------------- 1. caption
def bench_caption(ctx: Ctx) -> dict[str, Any]:
    from vecap.stages.base import engine_spec
    from vecap.stages.caption import CaptionStage, CaptionWorker

    s, h = ctx.sizes, ctx.harness
    ensure_ray(ctx)
    shards = ctx.shards[: s.caption_shards]
    extra = engine_overrides(ctx, "caption")
    cfg0 = ctx.cfg(WORK / "runs" / "caption", *extra)
    spec = engine_spec(cfg0.caption, multimodal=True)
    in_flight = cfg0.caption.max_batches_in_flight
    prompt = CaptionStage(cfg0.caption, cfg0.seed).prompt
    startup, worker = timed(lambda: CaptionWorker(spec, prompt, batches_in_flight=in_flight))
    engine = worker.engine
    ctx.engines["caption"] = worker  # kept alive to the end (see bench_fuse)
    rows = caption_rows(cfg0, ctx.images, shards)
    requests, keys = [worker.request(r) for r in rows], [r["key"] for r in rows]
    ctx.requests["caption"] = requests
    warm_s, _ = run_batches(engine, requests[: s.batch_size], s.batch_size)
    log.info("caption: bare engine up in %.1fs, warm-up batch %.1fs; %d images", startup, warm_s, len(requests))
    roots: list[Path] = []

    def pipe() -> dict[str, Any]:
        root = ctx.fresh_root(f"caption-{len(roots)}")
        roots.append(root)
        rep = pipeline_rep(ctx.cfg(root, *extra), "caption", shards)
        log.info(
            "caption pipeline: %.2f img/s excluding start-up (%.1fs wall, engine start %.1fs), busy %.2f",
            rep["per_s"] or 0,
            rep["wall_s"],
            rep["engine_start_s"],
            rep["busy_fraction"] or 0,
        )
        return rep

    def sides() -> dict[str, Any]:
        return {
            "pipeline": pipe,
            "actor": lambda: actor_rep(worker, rows, s.batch_size, in_flight, "needs_caption"),
            "single": lambda: single_rep(engine, requests),
            "batches": lambda: batches_rep(engine, requests, s.batch_size),
        }

    reps = h.compare("caption", sides())
    for name, r in reps.items():
        log.info("caption %s: %.2f img/s, busy fraction %s", name, r[0]["per_s"] or 0, r[0]["busy_fraction"])
    same = _same_captions(roots[0], keys, reps["single"][0]["_out"])
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    n = (
        f"{len(requests)} images, batch {s.batch_size}, {in_flight} in flight, max_num_seqs {s.max_num_seqs}, "
        f"outputs of {CAPTION_LENGTHS[0]}–{CAPTION_LENGTHS[1]} tokens"
    )
    summary = report_stage(ctx, "caption", "images/s", n, reps, in_flight)
    p = summary["pipeline"]
    h.add(
        "caption",
        "caption engine start-up",
        "s: the actor's engine start-up (markers) / the worker's in this process",
        p["engine_start_s"],
        startup,
    )
    if p["requests"] != len(requests):
        log.warning("caption: the pipeline captioned %d images, the bare engine %d", p["requests"], len(requests))
    return {
        "images": len(requests),
        "shards": shards,
        "batch_size": s.batch_size,
        "max_batches_in_flight": in_flight,
        "max_num_seqs": s.max_num_seqs,
        "output_lengths": list(CAPTION_LENGTHS),
        "model": str(spec.model),
        "bare_engine_startup_s": startup,
        "bare_warmup_batch_s": warm_s,
        **summary,
        "outputs_identical": same,
    }


def _same_captions(root: Path, keys: list[str], outs: list) -> str:
    """Greedy captions of the pipeline and of the bare engine, key by key (a sanity check)."""
    import pyarrow.parquet as pq

    from vecap.layout import Layout

    committed = dict(
        zip(
            *pq.read_table(Layout(str(root)).stage("caption"), columns=["key", "vlm_caption"]).to_pydict().values(),
            strict=True,
        )
    )
    same = sum(committed.get(k) == ((g.text or "").strip() or None) for k, g in zip(keys, outs, strict=True))
    return f"{same}/{len(keys)}"


# --------------------------------------------------------------------------- 2. fuse
def bench_fuse(ctx: Ctx) -> dict[str, Any]:
    from vecap.stages.base import engine_spec
    from vecap.stages.fuse import FuseWorker

    s, h = ctx.sizes, ctx.harness
    ensure_ray(ctx)
    shards = ctx.shards[: s.fuse_shards]
    base = ctx.fresh_root("fuse-input")
    extra = engine_overrides(ctx, "fuse")
    cfg0 = ctx.cfg(base, *extra)
    write_captions(base, shards, cfg0)
    rows = fuse_rows(cfg0, base, shards)
    modes = {m: f"fuse.engine.enable_prefix_caching={'true' if m == 'on' else 'false'}" for m in s.fuse_prefix_modes}
    in_flight = cfg0.fuse.max_batches_in_flight
    result: dict[str, Any] = {
        "requests": len(rows),
        "shards": shards,
        "batch_size": s.batch_size,
        "max_batches_in_flight": in_flight,
        "max_num_seqs": s.max_num_seqs,
        "output_lengths": list(FUSE_LENGTHS),
        "model": cfg0.fuse.model,
        "prefix_caching": {m: {} for m in modes},
    }
    workers: dict[str, Any] = {}
    out: list = []
    for mode, override in modes.items():
        # The engines stay alive to the end: destroying an in-process vLLM engine tears down
        # vLLM's process-wide parallel state, which breaks the other engines of this process.
        spec = engine_spec(ctx.cfg(base, *extra, override).fuse, multimodal=False)
        startup, workers[mode] = timed(partial(FuseWorker, spec, batches_in_flight=in_flight))
        ctx.engines[f"fuse-{mode}"] = workers[mode]
        warm = [workers[mode].request(r) for r in rows[: s.batch_size]]
        warm_s, out = run_batches(workers[mode].engine, warm, s.batch_size)
        result["prefix_caching"][mode] |= {"bare_engine_startup_s": startup, "bare_warmup_batch_s": warm_s}
        log.info("fuse, prefix caching %s: bare engine up in %.1fs, warm-up batch %.1fs", mode, startup, warm_s)
    requests = [next(iter(workers.values())).request(r) for r in rows]
    result["prompt_tokens_mean"] = statistics.mean(g.n_prompt_tokens or 0 for g in out)
    ctx.requests["fuse"] = requests
    n_roots = [0]

    def pipe(mode: str) -> dict[str, Any]:
        n_roots[0] += 1
        root = ctx.fresh_root(f"fuse-{n_roots[0]}")
        shutil.copytree(base / "captions", root / "captions")
        rep = pipeline_rep(ctx.cfg(root, *extra, modes[mode]), "fuse", shards)
        shutil.rmtree(root, ignore_errors=True)
        log.info(
            "fuse pipeline, prefix caching %s: %.2f/s excluding start-up (%.1fs wall), busy %.2f",
            mode,
            rep["per_s"] or 0,
            rep["wall_s"],
            rep["busy_fraction"] or 0,
        )
        return rep

    def sides(mode: str) -> dict[str, Any]:
        w = workers[mode]
        return {
            "pipeline": lambda: pipe(mode),
            "actor": lambda: actor_rep(w, rows, s.batch_size, in_flight, "needs_fuse"),
            "single": lambda: single_rep(w.engine, requests),
            "batches": lambda: batches_rep(w.engine, requests, s.batch_size),
        }

    all_sides = {f"{name}-{mode}": fn for mode in modes for name, fn in sides(mode).items()}
    reps = h.compare("fuse", all_sides)
    outs = reps[f"single-{next(iter(modes))}"][0]["_out"]
    result["output_tokens_mean"] = statistics.mean(g.n_output_tokens or 0 for g in outs)
    n = (
        f"{len(requests)} requests, batch {s.batch_size}, {in_flight} in flight, max_num_seqs {s.max_num_seqs}, "
        f"~{result['prompt_tokens_mean']:.0f} prompt tokens, outputs of {FUSE_LENGTHS[0]}–{FUSE_LENGTHS[1]} tokens"
    )
    for mode in modes:
        by_side = {name: reps[f"{name}-{mode}"] for name in ("pipeline", "actor", "single", "batches")}
        summary = report_stage(ctx, f"fuse, prefix caching {mode}", "fusions/s", n, by_side, in_flight)
        result["prefix_caching"][mode] |= summary
        if summary["pipeline"]["requests"] != len(requests):
            log.warning(
                "fuse: the pipeline sent %d requests, the bare engine %d",
                summary["pipeline"]["requests"],
                len(requests),
            )
    pc = result["prefix_caching"]
    if "on" in pc and "off" in pc:
        h.add(
            "fuse",
            "prefix caching on / off, single-call engine",
            "fusions/s",
            pc["on"]["single"]["per_s"],
            pc["off"]["single"]["per_s"],
        )
        h.add(
            "fuse",
            "prefix caching on / off, fuse stage",
            "fusions/s excluding start-up",
            pc["on"]["pipeline"]["per_s"],
            pc["off"]["pipeline"]["per_s"],
        )
    first = pc[next(iter(modes))]
    h.add(
        "fuse",
        "fuse engine start-up",
        "s: the actor's engine start-up (markers) / the worker's in this process",
        first["pipeline"]["engine_start_s"],
        first["bare_engine_startup_s"],
    )
    shutil.rmtree(base, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- 3. vLLM vs hf
def bench_backends(ctx: Ctx) -> dict[str, Any]:
    """vLLM and hf on the same requests in one call each (greedy, fixed max_new_tokens), then one
    profiled call of each (:mod:`bench.profile`): where the time goes on each side."""
    from bench.profile import BACKENDS_EXPLAINED, breakdown_rows, explain_profiles, profile_call
    from vecap.backends import load_engine
    from vecap.stages.base import engine_spec

    s, h = ctx.sizes, ctx.harness
    cfg = ctx.cfg(
        WORK / "runs" / "backends"
    )  # the recipe's engines: no synthetic lengths (hf has none), default max_num_seqs
    out: dict[str, Any] = {}
    for kind, section, multimodal, n in (
        ("caption", cfg.caption, True, s.backend_caption_requests),
        ("fuse", cfg.fuse, False, s.backend_fuse_requests),
    ):
        if kind not in ctx.requests:
            log.warning("backends: no %s requests (its section failed or did not run); skipped", kind)
            continue
        requests = ctx.requests[kind][:n]
        spec = engine_spec(section, multimodal)
        vllm_startup, vllm_engine = timed(partial(load_engine, spec))
        ctx.engines[f"{kind}-plain"] = vllm_engine  # kept alive to the end (see bench_fuse)
        hf_startup, hf_engine = timed(partial(load_engine, replace(spec, backend="hf", engine_kwargs={})))
        for e in (vllm_engine, hf_engine):
            e.generate(requests[: min(2, n)])  # warm-up
        reps = h.compare(
            "backends",
            {"vllm": partial(single_rep, vllm_engine, requests), "hf": partial(single_rep, hf_engine, requests)},
        )
        v, f = reps["vllm"], reps["hf"]
        same = sum((a.text or "") == (b.text or "") for a, b in zip(v[0]["_out"], f[0]["_out"], strict=True))
        profiles = {"vllm": profile_call(vllm_engine, requests), "hf": profile_call(hf_engine, requests)}
        out[kind] = {
            "requests": len(requests),
            "model": str(section.model),
            "max_new_tokens": section.max_new_tokens,
            "vllm_startup_s": vllm_startup,
            "hf_startup_s": hf_startup,
            "vllm": summarise(v),
            "hf": summarise(f),
            "outputs_identical": f"{same}/{len(requests)}",
            "profile": profiles,
        }
        h.add(
            "backends",
            f"vLLM / hf, {kind} model",
            f"requests/s, bare engines, greedy, {len(requests)} requests in one "
            f"call, {section.max_new_tokens} new tokens (identical outputs: {same}/{len(requests)})",
            out[kind]["vllm"]["per_s"],
            out[kind]["hf"]["per_s"],
            VLLM_VS_HF,
        )
        head, rows = breakdown_rows(profiles)
        h.table(
            f"vLLM vs hf, {kind} model: where one call of {len(requests)} requests spends its time (seconds; "
            "`python -m bench.profile` for the same alone)",
            head,
            rows,
        )
        h.note(explain_profiles(kind, profiles))
        log.info(
            "backends, %s model: vLLM %.2f/s, hf %.2f/s", kind, out[kind]["vllm"]["per_s"], out[kind]["hf"]["per_s"]
        )
        del hf_engine
    if out:
        h.note(BACKENDS_EXPLAINED)
    return out
