"""GPU throughput of the caption and fuse engines against the compute ceiling, per GPU.

On a machine with a GPU and vLLM (the regular GPU build), this builds LLaVA-1.5-7B and a
Llama-3-8B-class text model from their public configurations (hard-coded below, no hub
access) with random weights (vLLM's ``load_format="dummy"``), drives each through vecap's
own vLLM backend (``vecap.backends.load_engine``: the chat rendering and batching the
stages use), and reports images/s and fusions/s beside the compute ceiling:

    ceiling = peak dense bf16 FLOP/s / FLOPs per request

with FLOPs per request counted from the configuration and the measured token counts
(2 x matmul parameters per token, the vision tower per image, attention's quadratic term).
For LLaVA-1.5-7B that is about 9 TFLOP per 336 px image; for an 8B model about 4.4 TFLOP
per fusion of 250 input + 60 output tokens; at the H200's ~790 TFLOP/s the ceilings are
about 88 images/s and 180 fusions/s per GPU.

The tokenizer is vecap's tiny offline BPE (``vecap.demo.tiny_models``), padded with dummy tokens
to each model's vocabulary size, so every sampled id decodes. Prompts are sized in its
tokens: the caption prompt plus 576 image tokens, and fuse prompts of ~250 tokens (a shared
instruction prefix, as vecap's fuse prompt has, then the per-sample text).

``--reduced`` runs the same code on a CPU with tiny configurations and a few requests, so
CI keeps the script working (its figures mean nothing). Each model runs in a child process
(so GPU memory is freed between them). Timing, medians over repetitions and the results
files come from the bench's one harness (:mod:`bench.harness`). Output: ``--out`` (JSON)
and the same name with ``.md``, and the JSON again as the last line of stdout.

    python -m bench.gpu                           # GPU: both models, ~4 minutes on an H200
    python -m bench.gpu --reduced --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench (and vecap, when not pip-installed) when run as a file

from bench.harness import Harness, Target, median, timed  # noqa: E402

PEAK_TFLOPS_H200 = 790.0  # dense bf16
NOMINAL = {"caption": 9.0, "fuse": 4.4}  # TFLOP per request, the round figures quoted above

# llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + 2-layer MLP projector + Vicuna-7B).
LLAVA_15_7B: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "ignore_index": -100,
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "image_seq_length": 576,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "text_config": {
        "architectures": ["LlamaForCausalLM"],
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
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32001,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
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

# meta-llama/Meta-Llama-3-8B-Instruct.
LLAMA_3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _reduced(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at vecap's tiny scale (CPU attention needs head_dim 32, 64, ...)."""
    small_text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048}
    out = json.loads(json.dumps(config))
    if out["model_type"] == "llava":
        out["text_config"].update(small_text)
        out["vision_config"].update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 32})
        out["image_seq_length"] = (32 // 8) ** 2
        out["torch_dtype"] = out["text_config"]["torch_dtype"] = "float32"
    else:
        out.update(small_text)
        out["torch_dtype"] = "float32"
    return out


# ------------------------------------------------------------------------------ FLOPs
def _text_dims(config: dict[str, Any]) -> dict[str, int]:
    t = config.get("text_config", config)
    h, heads = t["hidden_size"], t["num_attention_heads"]
    head_dim = t.get("head_dim") or h // heads
    kv = t.get("num_key_value_heads", heads) * head_dim
    per_layer = h * heads * head_dim + 2 * h * kv + heads * head_dim * h + 3 * h * t["intermediate_size"]
    return {"layers": t["num_hidden_layers"], "hidden": h, "attn_dim": heads * head_dim,
            "matmul_params": t["num_hidden_layers"] * per_layer, "lm_head": h * t["vocab_size"]}


def flops_per_request(config: dict[str, Any], prompt_tokens: float, output_tokens: float) -> float:
    """Forward FLOPs of one request: 2 x parameters per token (+ LM head per sampled token),
    attention scores and values over the context, and for LLaVA the vision tower and projector."""
    d = _text_dims(config)
    p, o = prompt_tokens, output_tokens
    flops = 2.0 * d["matmul_params"] * (p + o) + 2.0 * d["lm_head"] * (o + 1)
    # QK^T and AV: 2 x 2 x attn_dim FLOPs per (query, key) pair; causal: ~P^2/2 + P*O + O^2/2 pairs.
    flops += 4.0 * d["layers"] * d["attn_dim"] * (p * p / 2 + p * o + o * o / 2)
    if "vision_config" in config:
        v = config["vision_config"]
        n = (v["image_size"] // v["patch_size"]) ** 2 + 1
        layers = v["num_hidden_layers"] + config["vision_feature_layer"] + 1  # the layers whose output is used
        vh = v["hidden_size"]
        flops += 2.0 * layers * (4 * vh * vh + 2 * vh * v["intermediate_size"]) * n + 4.0 * layers * vh * n * n
        flops += 2.0 * 3 * v["patch_size"] ** 2 * vh * n  # patch embedding
        th = config["text_config"]["hidden_size"]
        flops += 2.0 * (vh * th + th * th) * (n - 1)  # projector
    return flops


# ------------------------------------------------------------------------------ model folders
def _padded_tokenizer(vocab_size: int):
    """vecap's tiny BPE, padded with dummy tokens to ``vocab_size`` so that any sampled id decodes."""
    from vecap.demo.tiny_models import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer(VOCAB_SIZE)
    n = vocab_size - len(tok)
    if n < 0:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the model's {vocab_size}")
    if n:
        tok.add_tokens([f"<pad_{i}>" for i in range(n)])
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def write_model(folder: Path, config: dict[str, Any]) -> Path:
    """config.json + tokenizer (+ image processor for LLaVA); the weights come from load_format=dummy."""
    from vecap.demo.tiny_models import CHAT_TEMPLATE, IMAGE

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config))
    text = config.get("text_config", config)
    tok = _padded_tokenizer(text["vocab_size"])
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text.update(ids)
    if config["model_type"] == "llava":
        config["image_token_index"] = tok.convert_tokens_to_ids(IMAGE)
        config["pad_token_id"] = tok.pad_token_id
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(ids, indent=2))
    tok.save_pretrained(folder)
    if config["model_type"] == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        v = config["vision_config"]
        image_processor = CLIPImageProcessor(size={"shortest_edge": v["image_size"]},
                                             crop_size={"height": v["image_size"], "width": v["image_size"]})
        LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=v["patch_size"],
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ requests
def caption_requests(n: int, image_size: int) -> list:
    import numpy as np
    from PIL import Image

    from vecap.backends import Request
    from vecap.prompts import load_prompt

    messages = load_prompt("caption", "concise").messages(image=True)
    rng = np.random.default_rng(0)
    return [Request(messages=messages, seed=i,
                    image=Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8), "RGB"))
            for i in range(n)]


def fuse_requests(n: int, tokenizer, target_tokens: int = 250, prefix_tokens: int = 150) -> list:
    """Chat requests of ~target_tokens tokens: a shared instruction prefix, then per-sample text."""
    from vecap.backends import Request
    from vecap.demo.tiny_models import training_sentences

    sentences = training_sentences(4000, seed=1)

    def count(messages: list[dict[str, Any]]) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    system, i = "", 0
    while count([{"role": "system", "content": system}]) < prefix_tokens:
        system += sentences[i] + " "
        i += 1
    requests = []
    for k in range(n):
        user = ""
        messages = [{"role": "system", "content": system.strip()}, {"role": "user", "content": ""}]
        while count(messages) < target_tokens:
            user += sentences[i % len(sentences)] + " "
            i += 1
            messages[1]["content"] = "Alt-text: " + user.strip() if k % 2 else "Caption: " + user.strip()
        requests.append(Request(messages=messages, seed=k))
    return requests


# ------------------------------------------------------------------------------ one stage
def run_stage(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vecap.backends import EngineSpec, Sampling, load_engine

    config = LLAVA_15_7B if stage == "caption" else LLAMA_3_8B
    if args.reduced:
        config = _reduced(config)
    folder = write_model(Path(args.work) / stage, config)
    gpu = torch.cuda.is_available() and not args.reduced
    engine_kwargs: dict[str, Any] = {"load_format": "dummy", "max_model_len": 2048 if stage == "caption" else 1024}
    if gpu:
        engine_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        engine_kwargs["enforce_eager"] = True
    max_new = 30 if stage == "caption" else 60
    spec = EngineSpec(backend="vllm", model=str(folder), multimodal=stage == "caption",
                      sampling=Sampling(max_new_tokens=max_new, temperature=0.0, top_p=1.0),
                      dtype="bfloat16" if gpu else "float32", engine_kwargs=engine_kwargs)
    n = args.caption_requests if stage == "caption" else args.fuse_requests
    batch = args.caption_batch if stage == "caption" else args.fuse_batch
    reps = args.reps
    if args.reduced:
        n, batch, reps = min(n, 8), min(batch, 4), 1
    startup, engine = timed(lambda: load_engine(spec))
    if stage == "caption":
        requests = caption_requests(n + batch, config["vision_config"]["image_size"])
    else:
        from transformers import AutoTokenizer

        requests = fuse_requests(n + batch, AutoTokenizer.from_pretrained(folder))
    from bench.engines import run_batches

    warm, requests = requests[:batch], requests[batch:]  # warm-up on other inputs (no cache hits)
    warm_s, _ = timed(lambda: engine.generate(warm))
    # Repetitions of the same requests, caches emptied before each (run_batches), median time.
    harness = Harness({stage: args.budget_s}, reps=reps)
    passes = [run_batches(engine, requests, batch) for _ in harness.repetitions(stage)]
    seconds = median(t for t, _ in passes)
    outs = passes[0][1]
    prompt = sum(g.n_prompt_tokens or 0 for g in outs) / len(outs)
    output = sum(g.n_output_tokens or 0 for g in outs) / len(outs)
    tflop = flops_per_request(config, prompt, output) / 1e12
    per_s = len(outs) / seconds
    ceiling = args.peak_tflops / tflop
    return {
        "model": ("LLaVA-1.5-7B" if stage == "caption" else "Llama-3-8B") + (" (reduced config)" if args.reduced else ""),
        "reduced": args.reduced,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "dtype": spec.dtype,
        "requests": len(outs),
        "batch_size": batch,
        "reps": len(passes),
        "seconds_per_rep": [t for t, _ in passes],
        "engine_startup_s": startup,
        "warmup_s": warm_s,
        "seconds": seconds,
        "per_s": per_s,
        "unit": "images/s" if stage == "caption" else "fusions/s",
        "prompt_tokens_mean": prompt,
        "output_tokens_mean": output,
        "tflop_per_request": tflop,
        "achieved_tflops": per_s * tflop,
        "ceiling_per_s": ceiling,
        "fraction_of_ceiling": per_s / ceiling,
        "nominal_tflop_per_request": NOMINAL[stage],
        "nominal_ceiling_per_s": args.peak_tflops / NOMINAL[stage],
    }


# ------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reduced", action="store_true", help="tiny configs on the CPU, a few requests (CI)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"),
                   help="JSON results (and the same name with .md) (default: %(default)s)")
    p.add_argument("--stages", default="caption,fuse")
    p.add_argument("--caption-requests", type=int, default=1024)
    p.add_argument("--fuse-requests", type=int, default=2048)
    p.add_argument("--caption-batch", type=int, default=256, help="requests per engine call (the stage's batch_size)")
    p.add_argument("--fuse-batch", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H200, help="dense bf16 TFLOP/s of one GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--reps", type=int, default=3, help="passes over the requests per model (median; 1 with --reduced)")
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds per model after which no new pass starts")
    p.add_argument("--work", default=None, help="folder for the model folders (default: a temporary one)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child process: run this one stage
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p


def _env(reduced: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if reduced:  # what vLLM on a CPU needs (as the packaged demo recipe sets)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _env(args.reduced)
    if args.stage:  # child
        result = run_stage(args.stage, args)
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    stages = [s for s in args.stages.split(",") if s]
    harness = Harness({s: args.budget_s for s in stages}, reps=1 if args.reduced else args.reps, quick=args.reduced)
    with tempfile.TemporaryDirectory(prefix="vecap-gpu-bench-") as tmp:
        work = args.work or tmp
        harness.results.update({"mode": "reduced" if args.reduced else "full", "peak_tflops": args.peak_tflops})
        for stage in stages:
            harness.section(stage, lambda st=stage: _run_child(st, args, work, Path(tmp)))
            r = harness.results[stage]
            if "error" in r:
                continue
            harness.add("gpu", f"{stage}: per GPU / compute ceiling", f"{r['unit']}: measured ({r['model']}, {r['device']}, "
                        f"batch {r['batch_size']}, median of {r['reps']}) / peak {args.peak_tflops:.0f} TFLOP/s ÷ "
                        f"{r['tflop_per_request']:.3g} TFLOP per request", r["per_s"], r["ceiling_per_s"],
                        None if args.reduced else Target(">=", 0.5))
            print(f"{stage}: {r['per_s']:.2f} {r['unit']} per GPU, ceiling {r['ceiling_per_s']:.1f} "
                  f"({r['tflop_per_request']:.2f} TFLOP/request at {args.peak_tflops:.0f} TFLOP/s): "
                  f"{100 * r['fraction_of_ceiling']:.1f}% of the ceiling; {r['prompt_tokens_mean']:.0f} prompt + "
                  f"{r['output_tokens_mean']:.0f} output tokens, engine start {r['engine_startup_s']:.0f}s", file=sys.stderr)
        harness.results["seconds"] = time.time() - harness.t_start
    if args.reduced:
        harness.note("Reduced configs on the CPU: these figures only show that the script runs.")
    out = Path(args.out)
    harness.write(out.parent, out.stem, "vecap GPU engines against the compute ceiling")
    print(json.dumps(json.loads(out.read_text())))  # the last line of stdout: the same JSON
    return 1 if harness.failed() else 0


def _run_child(stage: str, args: argparse.Namespace, work: str, tmp: Path) -> dict[str, Any]:
    """One model in its own process (GPU memory is freed between models)."""
    child_out = tmp / f"{stage}.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--stage", stage, "--child-out", str(child_out), "--work", work,
           "--peak-tflops", str(args.peak_tflops), "--caption-requests", str(args.caption_requests),
           "--fuse-requests", str(args.fuse_requests), "--caption-batch", str(args.caption_batch),
           "--fuse-batch", str(args.fuse_batch), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--reps", str(args.reps), "--budget-s", str(args.budget_s)]
    if args.reduced:
        cmd.append("--reduced")
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0 or not child_out.exists():
        raise RuntimeError(f"child process exited with {rc}")
    return json.loads(child_out.read_text())


if __name__ == "__main__":
    sys.exit(main())
