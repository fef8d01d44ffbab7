"""The ``hf`` backend's engine on one GPU, transformers directly (no Ray, no vLLM): images/s and
fusions/s per GPU against the compute ceiling, in one command that the lent device machine runs.

``python -m bench.gpu`` measures vLLM under the stage's engine actor; it needs vLLM and Ray, which
the lent device machine lacks (and whose wheels are too large to carry there). This module needs
only torch, torchvision (transformers' image processors), transformers, tokenizers, Jinja2 (chat
templates), NumPy, Pillow and PyYAML, and vecap's own code from the working tree. Per model, in one
process:

- a model folder holding no weights is written to a temporary folder: the model's public
  ``config.json`` (written out below, no hub access), vecap's tiny offline byte-level BPE tokenizer
  (``vecap.demo.tiny_models``; the model keeps its own vocabulary size, ids past the tokenizer's
  decode to nothing: the point is the compute's shape, not the text) and, for the VLM, a LLaVA
  processor (CLIP image processor, 576 image tokens at 336 px);
- ``vecap.backends.hf_engine.HFEngine`` starts on it: its chat rendering (the model's chat
  template), its processor call and its batched ``generate``. Only its model loading is replaced
  (:class:`RandomHFEngine`): the model is built from the config straight on the device with random
  weights (no checkpoint, no disk), in bf16 on a GPU;
- every request generates exactly the fixed number of tokens (``min_new_tokens`` = the maximum:
  EOS ignored, as random weights would stop anywhere): captions 30 tokens (vecap.plan's caption
  figure), fusions 60 after a prompt of about 250 tokens;
- after one warm-up batch, batches of ``--batch-size`` requests run one after the other until the
  model's half of ``--seconds`` is spent (model building and warm-up count); the rate is the batch
  over the median batch time, and the total over all batches is beside it. The engine's own CPU
  step (chat rendering, image processor or tokenizer) is inside each batch's time; it is also timed
  alone once (``preprocess_share``).

Requests: the caption stage's messages (the ``concise`` prompt, one image part) with distinct
random 336 px images; the fuse stage's ``vecap`` prompt (system instruction, few-shot turns, the
sample's alt-text and VLM caption), shortened or lengthened in this tokenizer to ~250 tokens
(vecap.plan's fusion figure), alt-texts and captions distinct per request. The caption prompt is
kept whole: 96 tokens in this tokenizer + 576 image tokens.

The ceiling is vecap.plan's: peak dense BF16 FLOP/s of the GPU (``vecap.plan.GPUS`` by
``torch.cuda.get_device_name``: H100/H200 989 TFLOP/s, A100 312, L40S 362) / FLOPs per request
(``vecap.plan.flops_per_request`` of the model's config, the measured prompt and output tokens).
A square bf16 matrix product is timed as well (the reachable peak; ~790 TFLOP/s on the H200).

``--cpu-tiny`` runs the same code on the CPU with vecap's ``tiny`` model sizes
(``vecap.demo.tiny_models.SIZES``) in float32, against the CPU's own measured matrix-product
FLOP/s (a CPU has no datasheet figure here): the test suite runs it, and its figures show only that
the code path works. Output: one table on stdout and the JSON (``--json``).

    python -m bench.gpu_hf --seconds 240 --json $OUT/gpu_hf.json    # on a GPU: both models, ~4-5 minutes (estimate)
    python -m bench.gpu_hf --cpu-tiny --json /tmp/gpu_hf.json       # on a CPU, tiny models, ~30 s
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench and vecap when run as a file or from a bare checkout

from bench.harness import Harness, jsonable, markdown_table, timed  # noqa: E402
from vecap.backends.base import EngineSpec, Generation, Request, Sampling  # noqa: E402
from vecap.backends.hf_engine import HFEngine  # noqa: E402
from vecap.plan import (  # noqa: E402
    CAPTION_OUTPUT_TOKENS,
    FUSE_OUTPUT_TOKENS,
    FUSE_PROMPT_TOKENS,
    GPUS,
    card_of,
    flops_per_request,
)

log = logging.getLogger("bench.gpu_hf")

STAGES = ("caption", "fuse")
UNITS = {"caption": "images/s", "fuse": "fusions/s"}
DEFAULT_PEAK = GPUS["h100"]  # a GPU that is none of vecap.plan.GPUS: the H100/H200 figure, said so
BATCH = {"gpu": {"caption": 64, "fuse": 128}, "cpu-tiny": {"caption": 8, "fuse": 8}}
SECONDS = {"gpu": 240.0, "cpu-tiny": 20.0}

# llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14-336 vision tower, 2-layer MLP projector,
# Vicuna-7B (Llama-2-7B) text model. Token ids are the tokenizer's (set when the folder is written).
LLAVA_15_7B: dict[str, Any] = {
    "model_type": "llava",
    "ignore_index": -100,
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "image_seq_length": 576,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "vocab_size": 32064,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
}

# meta-llama/Llama-3.1-8B-Instruct's config.json (the gpu recipe's fusion model).
LLAMA_31_8B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "attention_bias": False,
    "mlp_bias": False,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
MODELS = {"caption": ("LLaVA-1.5-7B", LLAVA_15_7B), "fuse": ("Llama-3.1-8B", LLAMA_31_8B)}


def tiny(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at vecap.demo.tiny_models' ``tiny`` sizes (its vocabulary bound too)."""
    from vecap.demo.tiny_models import SIZES, VOCAB_SIZE

    sizes = SIZES["tiny"]
    out = json.loads(json.dumps(config))
    text = out.get("text_config", out)
    text.update(sizes["text"], vocab_size=VOCAB_SIZE)
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    if "vision_config" in out:
        v = out["vision_config"]
        v.update(sizes["vision"], projection_dim=sizes["vision"]["hidden_size"])
        out["image_seq_length"] = (v["image_size"] // v["patch_size"]) ** 2
    return out


# ------------------------------------------------------------------------------ the engine
class RandomHFEngine(HFEngine):
    """vecap's ``hf`` engine whose model is built from the folder's config.json with random weights,
    straight on ``engine_kwargs["device"]`` (no checkpoint); every request generates exactly
    ``sampling.max_new_tokens`` tokens (EOS masked until then)."""

    def _load_model(self, auto: Any, dtype: Any) -> Any:
        import torch
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(self.spec.model)
        torch.manual_seed(0)
        with torch.device(self.spec.engine_kwargs.get("device", "cpu")):
            model = auto.from_config(config, dtype=dtype)
        n = self.spec.sampling.max_new_tokens
        tok = self.tokenizer
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            min_new_tokens=n,
            max_new_tokens=n,
        )
        return model


def write_folder(folder: Path, config: dict[str, Any]) -> Path:
    """config.json (the tokenizer's special ids), tokenizer, and for LLaVA its processor; no weights."""
    from transformers import AutoConfig

    from vecap.demo.tiny_models import CHAT_TEMPLATE, IMAGE, VOCAB_SIZE, build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(VOCAB_SIZE)
    config = json.loads(json.dumps(config))
    text = config.get("text_config", config)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text.update(ids)
    if len(tok) > text["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the model's {text['vocab_size']}")
    if "vision_config" in config:
        config.update(image_token_index=tok.convert_tokens_to_ids(IMAGE), pad_token_id=tok.pad_token_id)
    model_type = config.pop("model_type")
    AutoConfig.for_model(model_type, **config).save_pretrained(folder)
    tok.save_pretrained(folder)
    if model_type == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        size = config["vision_config"]["image_size"]
        LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
            ),
            tokenizer=tok,
            patch_size=config["vision_config"]["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, dropped again by "default"
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ requests
def caption_requests(n: int, image_size: int) -> list[Request]:
    """The caption stage's messages (concise prompt, one image part), distinct random images."""
    import numpy as np
    from PIL import Image

    from vecap.prompting import load_prompt

    messages = load_prompt("caption", "concise").messages(image=True)
    rng = np.random.default_rng(0)
    return [
        Request(
            messages=messages,
            seed=i,
            image=Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8), "RGB"),
            key=f"{i:09d}",
        )
        for i in range(n)
    ]


def fuse_requests(n: int, tokenizer: Any, target: int = FUSE_PROMPT_TOKENS) -> list[Request]:
    """The fuse stage's ``vecap`` prompt with distinct alt-texts and captions, about ``target`` tokens in
    ``tokenizer``: the few-shot turns and then the system text's tail are dropped while the fixed part
    alone exceeds ~80% of it, and each sample's alt-text grows by sentences to the target."""
    from vecap.demo.tiny_models import training_sentences
    from vecap.prompting import load_prompt

    prompt = load_prompt("fuse", "vecap")
    sentences = training_sentences(4000, seed=1)
    m = len(sentences)

    def count(p: Any, alt: str, vlm: str) -> int:  # as the engine tokenizes the rendered chat
        messages = p.messages(alt_text=alt, vlm_caption=vlm)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = int(target * 0.8)
    if count(prompt, "", "") > fixed:
        prompt = dataclasses.replace(prompt, examples=())
    words = (prompt.system or "").split()
    while words and count(prompt, "", "") > fixed:
        words = words[:-1]
        prompt = dataclasses.replace(prompt, system=" ".join(words))
    out, i = [], 6  # past the corpus's fixed chat-like lines
    for k in range(n):
        alt, vlm = sentences[i % m], sentences[(i + 1) % m]
        i += 2
        while count(prompt, alt, vlm) < target:
            alt += " " + sentences[i % m]
            i += 1
        while count(prompt, alt, vlm) > target and " " in alt:  # the last sentence's tail, word by word
            alt = alt.rsplit(" ", 1)[0]
        out.append(Request(messages=prompt.messages(alt_text=alt, vlm_caption=vlm), seed=k, key=f"{k:09d}"))
    return out


# ------------------------------------------------------------------------------ peaks
def matmul_tflops(device: str, dtype: Any, n: int, seconds: float = 0.5) -> float:
    """TFLOP/s of an n x n x n matrix product on ``device`` (random inputs; the mean after warm-ups)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10):
            a @ b
        reps += 10
        sync()
        if time.perf_counter() - t0 >= seconds:
            break
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_of(device_name: str, cpu: bool, given: float | None, matmul: float) -> tuple[float, str]:
    """The ceiling's FLOP/s: given; on a CPU the measured matrix product; else vecap.plan.GPUS by name."""
    if given:
        return given, "given (--peak-tflops)"
    if cpu:
        return matmul, "measured: float32 matrix product on this CPU (no datasheet figure)"
    card = card_of(device_name)
    if card is not None:
        return card.bf16_tflops, f"{card.name}, vecap.plan.GPUS (vendor datasheet, dense BF16)"
    return DEFAULT_PEAK.bf16_tflops, f"{device_name} is not in vecap.plan.GPUS: the H100/H200 figure assumed"


# ------------------------------------------------------------------------------ one model
def check(gens: list[Generation], n_out: int) -> None:
    bad = [g for g in gens if g.error is not None or g.n_output_tokens != n_out]
    if bad:
        g = bad[0]
        raise RuntimeError(
            f"{len(bad)} of {len(gens)} requests failed or stopped early: {g.error or g.n_output_tokens} "
            f"(want {n_out} output tokens)"
        )


def measure(
    engine: HFEngine, pool: list[Request], batch: int, n_out: int, stage: str, harness: Harness, max_batches: int
) -> tuple[float, list[float], list[Generation]]:
    """One warm-up batch, then batches (the pool's two halves in turn) while the next fits the stage's budget."""
    warm_s, gens = timed(partial(engine.generate, pool[:batch]))  # first call: kernels, cuBLAS plans
    check(gens, n_out)
    log.info("%s: warm-up batch of %d in %.1fs", stage, batch, warm_s)
    times: list[float] = []
    all_gens: list[Generation] = []
    while not times or (harness.fits(stage, max(times)) and len(times) < max_batches):
        part = pool[batch:] if len(times) % 2 == 0 else pool[:batch]
        seconds, gens = timed(partial(engine.generate, part))
        check(gens, n_out)
        times.append(seconds)
        all_gens += gens
    return warm_s, times, all_gens


def preprocess_seconds(engine: HFEngine, requests: list[Request]) -> float:
    """Seconds of the CPU part of one engine call, alone: rendering the chats and the processor (images) or
    tokenizer call, as ``HFEngine._run`` makes them (inside each timed batch, before the GPU starts)."""
    t0 = time.perf_counter()
    prompts = [engine._render(r.messages) for r in requests]
    if engine.spec.multimodal:
        engine.processor(
            text=prompts,
            images=[r.image for r in requests],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
    else:
        engine.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    return time.perf_counter() - t0


def run_stage(
    stage: str, args: argparse.Namespace, harness: Harness, work: Path, ctx: dict[str, Any]
) -> dict[str, Any]:
    import torch

    caption = stage == "caption"
    name, config = MODELS[stage]
    if args.cpu_tiny:
        name, config = name + " (tiny config)", tiny(config)
    n_out = CAPTION_OUTPUT_TOKENS if caption else FUSE_OUTPUT_TOKENS
    batch = args.batch[stage]
    folder = write_folder(work / stage, config)
    spec = EngineSpec(
        backend="hf",
        model=str(folder),
        multimodal=caption,
        sampling=Sampling(max_new_tokens=n_out, temperature=0.0, top_p=1.0),
        dtype=ctx["dtype"],
        engine_kwargs={"device": ctx["device"]},
    )
    gpu = ctx["device"] == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    build_s, engine = timed(lambda: RandomHFEngine(spec))
    log.info("%s: %s built on %s in %.1fs", stage, name, ctx["device_name"], build_s)
    try:
        params = sum(p.numel() for p in engine.hf_model.parameters())
        if caption:
            pool = caption_requests(2 * batch, config["vision_config"]["image_size"])
        else:
            pool = fuse_requests(2 * batch, engine.tokenizer)
        warm_s, times, all_gens = measure(engine, pool, batch, n_out, stage, harness, args.max_batches)
        preprocess_s = preprocess_seconds(engine, pool[:batch])
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    finally:
        engine.close()
        del engine
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    prompt = statistics.fmean(g.n_prompt_tokens or 0 for g in all_gens)
    output = statistics.fmean(g.n_output_tokens or 0 for g in all_gens)
    tflop = flops_per_request(config, prompt, output) / 1e12
    per_s = batch / statistics.median(times)
    peak, matmul = ctx["peak_tflops"], ctx["matmul_tflops"]
    ceiling = peak / tflop
    return {
        "model": name,
        "engine": "vecap.backends.hf_engine.HFEngine (transformers generate), random weights",
        "device": ctx["device_name"],
        "dtype": spec.dtype,
        "parameters": params,
        "batch_size": batch,
        "batches": len(times),
        "requests": len(all_gens),
        "engine_startup_s": build_s,
        "warmup_s": warm_s,
        "batch_seconds": times,
        "seconds": sum(times),
        "unit": UNITS[stage],
        "per_s": per_s,  # the batch / the median batch's seconds
        "per_s_total": len(all_gens) / sum(times),
        "prompt_tokens_mean": prompt,
        "prompt_tokens_max": max(g.n_prompt_tokens or 0 for g in all_gens),
        "output_tokens_mean": output,
        "tflop_per_request": tflop,
        "achieved_tflops": per_s * tflop,
        "peak_tflops": peak,
        "peak_source": ctx["peak_source"],
        "ceiling_per_s": ceiling,
        "fraction_of_ceiling": per_s / ceiling,
        "matmul_tflops": matmul,
        "fraction_of_matmul": per_s * tflop / matmul,
        "preprocess_s": preprocess_s,  # the engine's own CPU step of one batch: chat rendering, processor/tokenizer
        "preprocess_share": preprocess_s / statistics.median(times),
        "peak_memory_gib": peak_mem,
    }


# ------------------------------------------------------------------------------ main
def _batch_sizes(text: str | None, mode: str) -> dict[str, int]:
    if not text:
        return dict(BATCH[mode])
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError("--batch-size: N (both models) or CAPTION,FUSE")
    return {"caption": parts[0], "fuse": parts[-1]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-tiny", action="store_true", help="tiny configs on the CPU (float32): the code path only")
    p.add_argument("--batch-size", default=None, help="requests per generate call: N, or CAPTION,FUSE (default 64,128)")
    p.add_argument("--seconds", type=float, default=None, help="time budget of the whole run (default 240; 20 tiny)")
    p.add_argument("--json", default=None, help="results (default bench/results/gpu_hf.json, _cpu_tiny with it)")
    p.add_argument("--stages", default=",".join(STAGES), help="caption,fuse or one of them")
    p.add_argument("--max-batches", type=int, default=50, help="timed batches per model at most")
    p.add_argument("--peak-tflops", type=float, default=None, help="the ceiling's peak (default: by device name)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    mode = "cpu-tiny" if args.cpu_tiny else "gpu"
    try:
        args.batch = _batch_sizes(args.batch_size, mode)
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser.error(str(err))
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    seconds = args.seconds or SECONDS[mode]
    out = Path(args.json or REPO / "bench" / "results" / ("gpu_hf_cpu_tiny.json" if args.cpu_tiny else "gpu_hf.json"))

    import torch
    import transformers

    if not args.cpu_tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or --cpu-tiny for the code path on the CPU")
    if args.cpu_tiny:
        # tiny matrices: one thread; two spin-waiting threads on a shared 2-core machine run ~50x slower
        torch.set_num_threads(1)
    device = "cpu" if args.cpu_tiny else "cuda"
    device_name = "cpu" if args.cpu_tiny else torch.cuda.get_device_name(0)
    mm_dtype = torch.float32 if args.cpu_tiny else torch.bfloat16
    matmul = matmul_tflops(device, mm_dtype, 512 if args.cpu_tiny else 8192)
    peak, peak_source = peak_of(device_name, args.cpu_tiny, args.peak_tflops, matmul)
    ctx = {
        "device": device,
        "device_name": device_name,
        "dtype": "float32" if args.cpu_tiny else "bfloat16",
        "peak_tflops": peak,
        "peak_source": peak_source,
        "matmul_tflops": matmul,
    }
    harness = Harness({s: seconds / len(stages) for s in stages}, reps=1, quick=args.cpu_tiny)
    with tempfile.TemporaryDirectory(prefix="vecap-gpu-hf-") as tmp:
        for stage in stages:
            harness.section(stage, partial(run_stage, stage, args, harness, Path(tmp), ctx))
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "vllm"})
    results = harness.results
    for stage in stages:
        r = results[stage]
        if "error" not in r:
            harness.add(
                "gpu_hf",
                f"{stage}: per {'CPU' if args.cpu_tiny else 'GPU'} / compute ceiling",
                f"{r['unit']}: {r['model']}, batches of {r['batch_size']} / peak {r['peak_tflops']:.4g} TFLOP/s "
                f"÷ {r['tflop_per_request']:.3g} TFLOP per request",
                r["per_s"],
                r["ceiling_per_s"],
            )
    ok = {s: results[s] for s in stages if "error" not in results[s]}
    doc = {
        "meta": harness.meta(),
        "rows": [r.to_dict() for r in harness.rows],
        "mode": mode,
        "engine": "hf (transformers generate; no Ray, no vLLM)",
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "matmul_tflops": matmul,
        "images_per_s": ok["caption"]["per_s"] if "caption" in ok else None,
        "fusions_per_s": ok["fuse"]["per_s"] if "fuse" in ok else None,
        "ray_or_vllm_loaded": loaded,
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(doc), indent=2, default=str) + "\n")
    print(table(ok, device_name, mode))
    for stage in harness.failed():
        print(f"{stage}: FAILED: {results[stage]['error']}")
    print(f"ray/vllm imported: {loaded or 'none'}; JSON: {out}")
    return 1 if harness.failed() or loaded else 0


def table(results: dict[str, dict[str, Any]], device_name: str, mode: str) -> str:
    """One row per model: the rate, the FLOPs, the ceiling and the fractions."""
    per = "CPU" if mode == "cpu-tiny" else "GPU"
    head = [
        "model",
        "device",
        "dtype",
        "batch",
        "batches",
        "prompt+output tok",
        f"per {per}",
        "TFLOP/req",
        "achieved TFLOP/s",
        "peak TFLOP/s",
        "ceiling",
        "of ceiling",
        "of matmul",
    ]
    rows = [
        [
            r["model"],
            device_name,
            r["dtype"],
            str(r["batch_size"]),
            str(r["batches"]),
            f"{r['prompt_tokens_mean']:.0f}+{r['output_tokens_mean']:.0f}",
            f"{r['per_s']:.3g} {r['unit']}",
            f"{r['tflop_per_request']:.3g}",
            f"{r['achieved_tflops']:.3g}",
            f"{r['peak_tflops']:.4g}",
            f"{r['ceiling_per_s']:.3g} {r['unit']}",
            f"{r['fraction_of_ceiling']:.3f}",
            f"{r['fraction_of_matmul']:.3f}",
        ]
        for r in results.values()
    ]
    return markdown_table(head, rows)


if __name__ == "__main__":
    sys.exit(main())
