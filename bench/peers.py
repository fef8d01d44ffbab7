"""Peers section: ``vecap caption`` / ``vecap fuse`` against the same jobs written as a user's own
Ray Data LLM script (``ray.data.llm``), on the same img2dataset shards, in one run.

The first part of this module is **what a user would write** (:func:`caption_job`,
:func:`fuse_job`): read the shards (``ray.data.read_webdataset`` for the images, the per-shard
Parquet files for alt-texts and committed captions), decode and downscale on CPU tasks to the
size the recipe uses, render the prompt with the model's chat template, one
``build_processor(vLLMEngineProcessorConfig(...))`` with the recipe's model, engine options,
sampling parameters, batch size and number of engines, then ``write_parquet``. Nothing of vecap
is imported there. The bench hands the script the recipe's settings as plain values
(:func:`script_args`), and two things only a benchmark needs: each request's output length
(``max_tokens``: random weights never stop, so both sides ignore EOS and draw each request's
length from its key's seed, as ``synthetic_lengths`` does), and, for the fuse job, the alt-text
cleaner (vecap's ``clean_alt_text``), so that both sides send the same prompts.

The second part is the benchmark: each side runs in a fresh process (``python -m bench.peers
script|vecap ...``), the two alternating (ABAB...) over the repetitions
(:meth:`bench.harness.Harness.compare`), on the same shards, and reports per job:

- **whole job**: the process's wall time, from its start to its exit (Python start-up, Ray's
  start and shutdown, engine start-up, reading, the engine, writing, commits);
- **steady state**: engine requests / the engine span, the first request entering the engine to
  the last one finishing. vecap: the markers' ``<stage>_span_s`` (the engine actor's first call to
  its last return, what the engine sections use for their (d) row); the script: from vLLM's own
  per-request timestamps (``metrics`` of each output: arrival, last token), which the user's
  ``postprocess`` keeps;
- **rows out** (vecap writes one row per input key, failed downloads included; the script one
  per request), the CPU seconds of each side's whole process tree, and how many greedy outputs are
  identical key by key (vecap stores captions tidied, so the script's text is tidied by the same
  function before comparing; pixels that differ between the two decoders are counted apart).

:func:`compare_job` is shared with ``python -m bench.gpu --peers`` (the same two sides on a GPU
machine with the real model configurations).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")


# =====================================================================================
# What a user would write: two Ray Data LLM scripts (nothing of vecap is imported here).
# =====================================================================================
def load_image(data: bytes, short_side: int | None, max_area: int | None = None) -> Any:
    """Image bytes → an RGB ``numpy`` array whose shorter side is at most ``short_side`` (and area at
    most ``max_area``), aspect kept, never upscaled; None when the bytes are not an image."""
    import math

    import numpy as np
    from PIL import Image, ImageOps

    def target(w: int, h: int) -> tuple[int, int]:
        scale = 1.0 if short_side is None else min(1.0, short_side / min(w, h))
        if max_area is not None and w * h * scale * scale > max_area:
            scale = math.sqrt(max_area / (w * h))
            return max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
        return (w, h) if scale == 1.0 else (max(1, round(w * scale)), max(1, round(h * scale)))

    try:
        raw = Image.open(io.BytesIO(data))
        if raw.format == "JPEG":
            raw.draft("RGB", target(*raw.size))  # decode big JPEGs at a reduced scale
        im = ImageOps.exif_transpose(raw).convert("RGB")
        size = target(*im.size)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im)
    except Exception:  # noqa: BLE001 - a web image that does not decode is skipped
        return None


def _sampling(key: str, temperature: float, top_p: float, max_tokens: int | Mapping[str, int], ignore_eos: bool):
    n = max_tokens if isinstance(max_tokens, int) else max_tokens[key]
    return {"temperature": temperature, "top_p": top_p, "max_tokens": int(n), "ignore_eos": ignore_eos}


def _timing(row: dict[str, Any]) -> dict[str, float]:
    """Benchmark only: when the request entered vLLM and when its last token came (wall clock), from
    vLLM's per-request metrics (``arrival_time`` is wall clock, the ``*_ts`` are CLOCK_MONOTONIC,
    which is system-wide on Linux)."""
    m = row.get("metrics") or {}
    if m.get("arrival_time") and m.get("last_token_ts"):
        return {
            "t_arrival": float(m["arrival_time"]),
            "t_done": float(m["last_token_ts"]) + time.time() - time.monotonic(),
        }
    now = time.time()
    return {"t_arrival": now - float(row.get("time_taken_llm") or 0.0), "t_done": now}


def _processor(
    model: str,
    engine_kwargs: dict[str, Any],
    batch_size: int,
    engines: int,
    cpus_per_engine: float,
    gpus_per_engine: float,
    env: dict[str, str],
    preprocess: Callable[[dict[str, Any]], dict[str, Any]],
    postprocess: Callable[[dict[str, Any]], dict[str, Any]],
) -> Any:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    bundle: dict[str, float] = {"CPU": cpus_per_engine}
    if gpus_per_engine:
        bundle["GPU"] = gpus_per_engine
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs,
        batch_size=batch_size,
        concurrency=engines,
        # The prompt is rendered here, with the model's chat template: Ray's own chat-template and
        # multimodal stages import a vLLM module that moved in vLLM 0.32.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM's output already carries the text
        placement_group_config={"bundles": [bundle]},
        log_engine_metrics=False,
        runtime_env={"env_vars": env} if env else None,
    )
    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def _start_ray(ray_init: dict[str, Any]) -> None:
    import ray

    env = ray_init.get("env") or {}
    os.environ.update(env)
    ray.init(
        address="local",
        num_cpus=ray_init.get("num_cpus"),
        object_store_memory=ray_init.get("object_store_memory"),
        include_dashboard=False,
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=False,
    )


def caption_job(
    images: str,
    out: str,
    *,
    model: str,
    engine_kwargs: dict[str, Any],
    instruction: str,
    system: str | None,
    image_size: int | None,
    image_pixels: int | None,
    batch_size: int,
    engines: int,
    cpus_per_engine: float,
    gpus_per_engine: float,
    temperature: float,
    top_p: float,
    max_tokens: int | Mapping[str, int],
    ignore_eos: bool,
    ray_init: dict[str, Any],
    engine_env: dict[str, str] | None = None,
    shards: list[str] | None = None,
) -> None:
    """Caption every image of an img2dataset folder with a VLM; one Parquet row per captioned image."""
    import ray.data
    from PIL import Image
    from transformers import AutoProcessor

    _start_ray(ray_init)
    tars = sorted(str(p) for p in Path(images).glob("*.tar") if shards is None or p.stem in shards)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]})
    prompt = AutoProcessor.from_pretrained(model).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )

    def decode(row: dict[str, Any]) -> list[dict[str, Any]]:
        pixels = load_image(row["jpg"], image_size, image_pixels) if row.get("jpg") else None
        return [] if pixels is None else [{"key": row["__key__"], "image": pixels}]

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "multimodal_data": {"image": [Image.fromarray(row["image"])]},
            "sampling_params": _sampling(row["key"], temperature, top_p, max_tokens, ignore_eos),
        }

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "key": row["key"],
            "caption": row["generated_text"],
            "n_prompt_tokens": row["num_input_tokens"],
            "n_output_tokens": row["num_generated_tokens"],
            **_timing(row),
        }

    ds = ray.data.read_webdataset(tars, decoder=None).flat_map(decode)
    processor = _processor(
        model,
        engine_kwargs,
        batch_size,
        engines,
        cpus_per_engine,
        gpus_per_engine,
        engine_env or {},
        preprocess,
        postprocess,
    )
    processor(ds).write_parquet(out)


def fuse_job(
    images: str,
    captions: str,
    out: str,
    *,
    model: str,
    engine_kwargs: dict[str, Any],
    system: str | None,
    examples: list[dict[str, str]],
    template: str,
    clean_alt_text: Callable[[str], str],
    batch_size: int,
    engines: int,
    cpus_per_engine: float,
    gpus_per_engine: float,
    temperature: float,
    top_p: float,
    max_tokens: int | Mapping[str, int],
    ignore_eos: bool,
    ray_init: dict[str, Any],
    engine_env: dict[str, str] | None = None,
    shards: list[str] | None = None,
) -> None:
    """Fuse each image's caption (``captions/NNNNN.parquet``: key, status, vlm_caption) with its alt-text
    (img2dataset's ``NNNNN.parquet``: key, caption) with an LLM; one Parquet row per fused sample."""
    import pyarrow.parquet as pq
    import ray.data

    _start_ray(ray_init)
    names = sorted(p.stem for p in Path(captions).glob("*.parquet") if shards is None or p.stem in shards)

    def read_shard(item: dict[str, Any]) -> list[dict[str, Any]]:
        shard = item["shard"]
        alts = {
            r["key"]: r["caption"]
            for r in pq.read_table(f"{images}/{shard}.parquet", columns=["key", "caption"]).to_pylist()
        }
        rows = []
        for r in pq.read_table(f"{captions}/{shard}.parquet", columns=["key", "status", "vlm_caption"]).to_pylist():
            alt, vlm = clean_alt_text(alts.get(r["key"]) or ""), (r["vlm_caption"] or "").strip()
            if r["status"] == "ok" and alt and vlm:  # nothing to fuse otherwise
                rows.append({"key": r["key"], "alt_text": alt, "vlm_caption": vlm})
        return rows

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        for ex in examples:
            messages.append({"role": "user", "content": template.format(**ex)})
            messages.append({"role": "assistant", "content": ex["output"]})
        messages.append(
            {"role": "user", "content": template.format(alt_text=row["alt_text"], vlm_caption=row["vlm_caption"])}
        )
        prompt = _tokenizer(model).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return {
            "prompt": prompt,
            "sampling_params": _sampling(row["key"], temperature, top_p, max_tokens, ignore_eos),
        }

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "key": row["key"],
            "fused": row["generated_text"],
            "n_prompt_tokens": row["num_input_tokens"],
            "n_output_tokens": row["num_generated_tokens"],
            **_timing(row),
        }

    ds = ray.data.from_items([{"shard": s} for s in names]).flat_map(read_shard)
    processor = _processor(
        model,
        engine_kwargs,
        batch_size,
        engines,
        cpus_per_engine,
        gpus_per_engine,
        engine_env or {},
        preprocess,
        postprocess,
    )
    processor(ds).write_parquet(out)


@cache
def _tokenizer(model: str) -> Any:
    """The model's tokenizer, loaded once per worker process (its chat template renders the prompt)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


# =====================================================================================
# The benchmark: the recipe's settings as the script's arguments, both sides in fresh processes.
# =====================================================================================
UNITS = {"caption": "images/s", "fuse": "fusions/s"}


def script_args(cfg: Any, stage: str, shards: list[str]) -> dict[str, Any]:
    """The user's script's keyword arguments from a vecap recipe: the same model, engine options (what
    vecap's vLLM backend gives ``vllm.LLM``), prompt, pixels size, sampling, batch size, engines, Ray."""
    import pyarrow.parquet as pq

    from vecap.prompting import load_prompt
    from vecap.stages.base import engine_spec, seed_for

    caption = stage == "caption"
    m = cfg.caption if caption else cfg.fuse
    spec = engine_spec(m, multimodal=caption)
    # vecap.backends.vllm_engine.VLLMEngine's defaults, then the recipe's engine options.
    engine_kwargs: dict[str, Any] = {"dtype": m.dtype, "enable_prefix_caching": True, "seed": 0}
    if caption:
        engine_kwargs["limit_mm_per_prompt"] = {"image": 1}
    if m.trust_remote_code:
        engine_kwargs["trust_remote_code"] = True
    engine_kwargs.update(m.engine)
    keys = [
        str(k)
        for s in shards
        for k in pq.read_table(f"{cfg.root}/images/{s}.parquet", columns=["key"]).column("key").to_pylist()
    ]
    prompt = load_prompt(stage, m.prompt)
    args: dict[str, Any] = {
        "model": str(m.model),
        "engine_kwargs": engine_kwargs,
        "batch_size": m.batch_size,
        "engines": m.actors,
        "cpus_per_engine": m.cpus_per_actor,
        "gpus_per_engine": m.gpus_per_actor,
        "temperature": m.temperature,
        "top_p": m.top_p,
        "max_tokens": {k: spec.sampling.max_tokens_for(seed_for(cfg.seed, stage, k)) for k in keys},
        "ignore_eos": m.synthetic_lengths is not None,
        "ray_init": {
            "num_cpus": cfg.ray.num_cpus,
            "object_store_memory": cfg.ray.object_store_memory_mb * 2**20,
            "env": {k: str(v) for k, v in cfg.ray.env.items()},
        },
        "engine_env": dict(m.env),
        "shards": list(shards),
        "system": prompt.system.strip() if prompt.system else None,
    }
    if caption:
        if prompt.examples or prompt.placeholders:
            raise ValueError(f"the peers' caption script takes a plain instruction; prompt {prompt.id} has more")
        args |= {"instruction": prompt.render_text(), "image_size": cfg.caption.image_size}
        args["image_pixels"] = cfg.caption.image_pixels
    else:
        args |= {
            "template": prompt.template,
            "examples": [
                {k: str(v).strip() if k == "output" else str(v) for k, v in ex.items()} for ex in prompt.examples
            ],
            "max_alt_text_words": cfg.fuse.max_alt_text_words,
        }
    return args


def _fuse_cleaner(max_words: int) -> Callable[[str], str]:
    from functools import partial

    from vecap.validation import clean_alt_text

    return partial(clean_alt_text, max_words=max_words)


# --------------------------------------------------------------------------- child processes
def _child(argv: list[str]) -> int:
    """``python -m bench.peers script|vecap ARGS.json RESULT.json``: one side of one job."""
    side, args_path, result_path = argv
    t_start = time.time()
    spec = json.loads(Path(args_path).read_text())
    if side == "script":
        logging.basicConfig(level=logging.WARNING)
        a = spec["args"]
        if spec["job"] == "caption":
            caption_job(spec["images"], spec["out"], **a)
        else:
            a["clean_alt_text"] = _fuse_cleaner(a.pop("max_alt_text_words"))
            fuse_job(spec["images"], spec["captions"], spec["out"], **a)
        rc = 0
    else:  # vecap: the CLI, as a user runs it
        from vecap.cli import main as vecap_main

        rc = vecap_main(spec["argv"])
    Path(result_path).write_text(json.dumps({"rc": rc, "t_start": t_start, "t_end": time.time()}))
    return rc


def run_child(side: str, spec: dict[str, Any], work: Path, timeout_s: float, attempts: int = 2) -> dict[str, Any]:
    """One side in a fresh process; its wall time (start to exit), CPU seconds of its process tree.

    A side whose local Ray timed out during its start-up (a loaded machine; vecap retries that
    itself, a plain script does not) is run again, up to ``attempts`` times: the figures are the last
    attempt's."""
    for attempt in range(1, attempts + 1):
        try:
            return _run_child_once(side, spec, work, timeout_s)
        except RuntimeError as err:
            if attempt == attempts or "timed out during startup" not in str(err):
                raise
            log.warning("peers: the %s side's Ray did not start (a loaded machine?); running it again", side)
    raise AssertionError("not reached")


def _run_child_once(side: str, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    from bench.harness import TreeSampler

    work.mkdir(parents=True, exist_ok=True)
    args_path, result_path, log_path = work / "args.json", work / "result.json", work / "child.log"
    args_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.peers", side, str(args_path), str(result_path)]
    repo = Path(__file__).resolve().parent.parent
    with open(log_path, "w") as logf:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=repo, stdout=logf, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid, interval_s=0.5, tree_every_s=1.0, pss=False) as sampler:
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = -9
        wall = time.time() - t0
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"{side} side exited with {rc} after {wall:.0f}s; log {log_path}:\n{tail}")
    res = json.loads(result_path.read_text())
    return {"wall_s": wall, "t0": t0, "cpu_s": sampler.result()["tree_cpu_s"], **res}


# --------------------------------------------------------------------------- the two sides
def vecap_side(cfg_name: str, overrides: list[str], stage: str, shards: list[str], root: Path, timeout_s: float):
    """``vecap <stage> -c <recipe> --set ...`` on ``root`` in a fresh process; figures from its markers."""
    import pyarrow.parquet as pq

    from bench.context import read_markers, summed_timings
    from vecap.layout import Layout

    argv = [stage, "-c", cfg_name, *[a for o in overrides for a in ("--set", o)], "--set", f"root={root}"]
    argv += ["--shards", *shards, "--no-progress", "--overwrite"]
    r = run_child("vecap", {"argv": argv}, root.parent / f"{root.name}.side", timeout_s)
    layout = Layout(str(root))
    markers = read_markers(layout, stage)
    t = summed_timings(markers)
    text_col = "vlm_caption" if stage == "caption" else "vec_caption"
    cols = ["key", text_col, "finish_reason"] if stage == "caption" else ["key", text_col, "vec_source"]
    table = pq.read_table(layout.stage(stage), columns=cols).to_pydict()
    if stage == "caption":
        texts = {k: v for k, v, f in zip(table["key"], table[text_col], table["finish_reason"], strict=True) if f}
    else:
        texts = {
            k: v for k, v, s in zip(table["key"], table[text_col], table["vec_source"], strict=True) if s == "fused"
        }
    from vecap.stats import ShardStats

    total = ShardStats.total(markers.values())
    requests = int(t.get(f"{stage}_requests", len(texts)))
    span = t.get(f"{stage}_span_s")
    phases = _driver_phases(root)
    return {
        "wall_s": r["wall_s"],
        "job_s": r["t_end"] - r["t_start"],
        "cpu_s": r["cpu_s"],
        "rows_out": len(table["key"]),
        "requests": requests,
        "span_s": span,
        "steady_per_s": requests / span if span else None,
        "e2e_per_s": requests / r["wall_s"],
        "engine_start_s": t.get(f"{stage}_engine_start_s"),
        "outside_span_s": r["wall_s"] - (span or 0.0),
        "busy_fraction": _busy(t, stage),
        "prompt_tokens": total.prompt_tokens,
        "output_tokens": total.output_tokens,
        # Seconds inside engine.step() over the run (Σ busy_s) and the engine's steps: the span less the
        # busy seconds is where the engine waited for work or for its feeder (the actor's other threads).
        "engine_busy_s": t.get(f"{stage}_busy_s"),
        "engine_steps": t.get(f"{stage}_steps"),
        "timings": {k: v for k, v in t.items() if k.startswith("t_")},
        "phases": phases,
        "_texts": texts,
    }


def _busy(t: dict[str, float], stage: str) -> float | None:
    from bench.context import busy_fraction

    return busy_fraction(t.get(f"{stage}_steps"), t.get(f"{stage}_underfull_steps"))


def _driver_phases(root: Path) -> dict[str, float]:
    """Seconds of vecap's driver phases, from its driver log: run start → Ray up → captions reused → end."""
    import datetime as dt
    import re

    logs = sorted((root / "logs").glob("*/driver.log"))
    if not logs:
        return {}
    stamps: dict[str, float] = {}
    first = last = None
    for line in logs[-1].read_text().splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if not m:
            continue
        t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        first = first if first is not None else t
        last = t
        if " Ray: " in line and "ray_up" not in stamps:
            stamps["ray_up"] = t - first
        if "captions reused" in line:
            stamps["reuse_done"] = t - first
            if r := re.search(r"resolved in ([\d.]+)s", line):
                stamps["reuse_s"] = float(r.group(1))
    if first is not None and last is not None:
        stamps["driver_log_s"] = last - first
    return stamps


def script_side(job: str, args: dict[str, Any], images: Path, captions: Path | None, out: Path, timeout_s: float):
    """The user's script in a fresh process; figures from its output rows (vLLM's per-request timestamps)."""
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    spec = {"job": job, "args": args, "images": str(images), "out": str(out)}
    if captions is not None:
        spec["captions"] = str(captions)
    r = run_child("script", spec, out.parent / f"{out.name}.side", timeout_s)
    text_col = "caption" if job == "caption" else "fused"
    table = pq.read_table(out).to_pydict()
    n = len(table["key"])
    start = min(table["t_arrival"]) if n else None
    end = max(table["t_done"]) if n else None
    span = end - start if start is not None and end is not None else None
    return {
        "wall_s": r["wall_s"],
        "job_s": r["t_end"] - r["t_start"],
        "cpu_s": r["cpu_s"],
        "rows_out": n,
        "requests": n,
        "span_s": span,
        "steady_per_s": n / span if span else None,
        "e2e_per_s": n / r["wall_s"],
        "engine_start_s": None,
        "outside_span_s": r["wall_s"] - (span or 0.0),
        "busy_fraction": None,
        "prompt_tokens": sum(table["n_prompt_tokens"]),
        "output_tokens": sum(table["n_output_tokens"]),
        "first_request_after_s": start - r["t_start"] if start is not None else None,  # → first request in vLLM
        "drain_s": r["t_end"] - end
        if end is not None
        else None,  # last token → the job's end (write, Ray's bookkeeping)
        "_texts": dict(zip(table["key"], table[text_col], strict=True)),
    }


# --------------------------------------------------------------------------- one job, both sides
def same_outputs(stage: str, vecap_texts: dict[str, str], script_texts: dict[str, str]) -> dict[str, Any]:
    """Key by key: vecap's committed text against the script's, as the script wrote it or tidied as vecap
    tidies an accepted one (captions: ``tidy_caption``; fusions: ``tidy_fused``); a caption that vecap's
    checks rejected keeps the model's raw text."""
    from vecap.validation import tidy_caption, tidy_fused

    tidy = tidy_caption if stage == "caption" else tidy_fused
    both = sorted(set(vecap_texts) & set(script_texts))
    same = [k for k in both if (vecap_texts[k] or "") in (script_texts[k], tidy(script_texts[k]))]
    differ = [k for k in both if k not in same]
    return {
        "compared": len(both),
        "identical": len(same),
        "differ": differ[:20],
        "examples": [{"key": k, "vecap": vecap_texts[k], "script": tidy(script_texts[k])} for k in differ[:5]],
        "only_vecap": sorted(set(vecap_texts) - set(script_texts))[:20],
        "only_script": sorted(set(script_texts) - set(vecap_texts))[:20],
    }


def same_pixels(images: Path, shards: list[str], cfg: Any) -> dict[str, bool]:
    """key → whether the script's decoder gives vecap's pixels (vecap.images.prepare_image) for the image."""
    import numpy as np

    from vecap.images import ImageRejected, prepare_image
    from vecap.reader import ShardReader

    c = cfg.caption
    out: dict[str, bool] = {}
    for shard in shards:
        for sample in ShardReader(str(images), shard, max_image_bytes=c.max_image_bytes):
            if not sample.image:
                continue
            mine = load_image(sample.image, c.image_size, c.image_pixels)
            try:
                theirs = prepare_image(
                    sample.image, c.image_size, c.max_image_pixels, c.max_image_bytes, c.image_pixels
                )
            except ImageRejected:
                continue
            ref = np.frombuffer(theirs.pixels, np.uint8).reshape(theirs.height, theirs.width, 3)
            out[sample.key] = mine is not None and mine.shape == ref.shape and bool((mine == ref).all())
    return out


def compare_job(
    harness: Any,
    section: str,
    stage: str,
    cfg_name: str,
    overrides: list[str],
    shards: list[str],
    make_root: Callable[[str], Path],
    images: Path,
    captions: Path | None = None,
    reps: int | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """``vecap <stage>`` against the user's script on the same shards, alternating, fresh processes each.

    ``make_root(name)`` gives an empty dataset root whose ``images/`` are the shards (for the fuse job
    the committed ``captions/`` are copied in from ``captions``'s root)."""
    from bench.engines import summarise
    from vecap.config import load_config

    probe = make_root(f"peers-{stage}-args")
    cfg = load_config(cfg_name, [*overrides, f"root={probe}"])
    args = script_args(cfg, stage, shards)
    shutil.rmtree(probe, ignore_errors=True)
    n = [0]

    def vecap() -> dict[str, Any]:
        n[0] += 1
        root = make_root(f"peers-{stage}-vecap-{n[0]}")
        if captions is not None:
            shutil.copytree(captions, root / "captions")
        r = vecap_side(cfg_name, overrides, stage, shards, root, timeout_s)
        log.info(
            "peers %s, vecap: %.1fs whole job, %.2f %s steady (span %.1fs, engine start %.1fs)",
            stage,
            r["wall_s"],
            r["steady_per_s"] or 0,
            UNITS[stage],
            r["span_s"] or 0,
            r["engine_start_s"] or 0,
        )
        shutil.rmtree(root, ignore_errors=True)
        return r

    def script() -> dict[str, Any]:
        n[0] += 1
        out = make_root(f"peers-{stage}-script-{n[0]}") / "out"
        r = script_side(stage, args, images, captions, out, timeout_s)
        log.info(
            "peers %s, script: %.1fs whole job, %.2f %s steady (span %.1fs)",
            stage,
            r["wall_s"],
            r["steady_per_s"] or 0,
            UNITS[stage],
            r["span_s"] or 0,
        )
        shutil.rmtree(out.parent, ignore_errors=True)
        return r

    reps_out = harness.compare(section, {"vecap": vecap, "script": script}, reps)
    same = same_outputs(stage, reps_out["vecap"][0]["_texts"], reps_out["script"][0]["_texts"])
    if stage == "caption":
        pixels = same_pixels(images, shards, cfg)
        same["same_pixels"] = sum(pixels.values())
        same["pixels_compared"] = len(pixels)
        same["differ_with_other_pixels"] = sum(not pixels.get(k, True) for k in same["differ"])
    v, s = summarise(reps_out["vecap"]), summarise(reps_out["script"])
    return {
        "stage": stage,
        "shards": shards,
        "batch_size": args["batch_size"],
        "engines": args["engines"],
        "engine_kwargs": args["engine_kwargs"],
        "model": args["model"],
        "output_lengths": list((cfg.caption if stage == "caption" else cfg.fuse).synthetic_lengths or ()),
        "vecap": v,
        "script": s,
        "outputs": same,
    }


def report(harness: Any, section: str, results: dict[str, dict[str, Any]], note: str = "") -> None:
    """The section's ratio rows and its table (the harness's helpers)."""
    from bench.harness import Target

    at_least = Target(">=", 1.0)
    rows = []
    for stage, r in results.items():
        v, s, o = r["vecap"], r["script"], r["outputs"]
        unit = UNITS[stage]
        harness.add(
            section,
            f"peers {stage}: vecap / user's Ray Data LLM script, steady state",
            f"{unit}: engine requests / engine span (first request in the engine to the last one done){note}",
            v["steady_per_s"],
            s["steady_per_s"],
            at_least,
        )
        harness.add(
            section,
            f"peers {stage}: vecap / user's script, whole job",
            "s of the script's whole process / vecap's (each from its start to its exit, fresh processes)",
            s["wall_s"],
            v["wall_s"],
            at_least,
        )
        pix = f", same pixels {o['same_pixels']}/{o['pixels_compared']}" if "same_pixels" in o else ""
        harness.add(
            section,
            f"peers {stage}: identical greedy outputs",
            f"keys whose text is the same on both sides / keys both answered{pix}",
            o["identical"],
            o["compared"],
        )
        for name, x in (("vecap", v), ("script", s)):
            rows.append(
                [
                    stage,
                    name,
                    x["wall_s"],
                    x["requests"],
                    x["span_s"],
                    x["steady_per_s"],
                    x["e2e_per_s"],
                    x["rows_out"],
                    x["cpu_s"],
                    x["outside_span_s"],
                    f"{o['identical']}/{o['compared']}",
                ]
            )
    harness.table(
        "peers: vecap against a user's own Ray Data LLM script (medians; fresh processes, alternating)",
        [
            "job",
            "side",
            "whole job s",
            "engine requests",
            "engine span s",
            "steady /s",
            "whole-job /s",
            "rows out",
            "CPU s (process tree)",
            "s outside the span",
            "identical outputs",
        ],
        rows,
    )


# --------------------------------------------------------------------------- the CPU section
PEERS_NOTES = """\
Peers: each side in a fresh process, alternating, on the same shards. Script = a user's own Ray Data LLM job \
(`bench/peers.py` `caption_job`/`fuse_job`: read_webdataset or the per-shard Parquet, decode and downscale on CPU \
tasks, the prompt rendered with the model's chat template, one `ray.data.llm` vLLM processor with the recipe's model, \
engine options, sampling, batch size and engines, write_parquet); vecap = `vecap caption|fuse -c demo --set ...`. \
Steady state: engine requests / engine span (vecap: the markers' span_s; script: vLLM's per-request arrival and \
last-token times). Whole job: process start to exit (Ray's start and shutdown, engine start-up included: \
ray.data.llm runs vLLM's AsyncLLM, whose engine core is a process of its own; vecap's demo recipe keeps it in the \
actor's process). Output lengths as the engine sections (EOS ignored, per-request max_tokens from each key's seed, \
the same on both sides); the fuse checks are skipped on the vecap side so that its committed text is the LLM's \
(tidied), and the script gets vecap's alt-text cleaner so that both send the same prompts. The script keeps \
ray.data.llm's defaults otherwise (max_concurrent_batches 8, its request semaphore at 1.1 x max_num_seqs)."""


def bench_peers(ctx: Any) -> dict[str, Any]:
    from bench.engines import engine_overrides
    from bench.workload import write_captions
    from vecap.validation.checks import FUSE_REASONS

    s, h = ctx.sizes, ctx.harness
    with_ray = sys.modules.get("ray")
    if with_ray is not None and with_ray.is_initialized():
        with_ray.shutdown()  # the engine sections' Ray: the sides start their own
    fuse_skip = f"fuse.validation.skip=[{','.join(FUSE_REASONS)}]"
    out: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for stage, n_shards in (("caption", s.caption_shards), ("fuse", s.fuse_shards)):
        shards = ctx.shards[:n_shards]
        overrides = [*ctx.overrides, *engine_overrides(ctx, stage)]
        captions = None
        if stage == "fuse":
            overrides.append(fuse_skip)
            base = ctx.fresh_root("peers-fuse-input")
            write_captions(base, shards, ctx.cfg(base, *overrides))
            captions = base / "captions"
        results[stage] = compare_job(
            h, "peers", stage, "demo", overrides, shards, ctx.fresh_root, ctx.images, captions, s.peers_reps
        )
        if captions is not None:
            shutil.rmtree(captions.parent, ignore_errors=True)
    report(h, "peers", results)
    h.note(PEERS_NOTES)
    out.update(results)
    return out


if __name__ == "__main__":
    # Through the module's own name, so that the Ray workers unpickle its functions from bench.peers
    # (the workers start in this folder) rather than from their own __main__.
    from bench.peers import _child as child

    sys.exit(child(sys.argv[1:]))
