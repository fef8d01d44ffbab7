"""The caption and fuse engines on a GPU: stage against single-call engine, busy fraction,
images/s and fusions/s per GPU, against the compute ceiling.

On a machine with a GPU and vLLM (the regular GPU build), this builds LLaVA-1.5-7B and a
Llama-3-8B-class text model from their public configurations (hard-coded below, no hub
access) with random weights (vLLM's ``load_format="dummy"``) and, per model, in its own
process (GPU memory is freed between models):

- starts the stage's own engine actor class (``CaptionWorker`` / ``FuseWorker``, the engine
  through ``vecap.backends.load_engine``: the chat rendering and continuous feeding the
  stages use) with the ``gpu`` recipe's ``max_num_seqs`` and realistic output lengths
  (``synthetic_lengths``: EOS ignored, captions 8–40 tokens, fusions 20–80, drawn from each
  request's seed, the same draw on every side);
- **stage**: drives that actor as Ray Data does when the upstream keeps up — an asyncio loop
  keeping ``max_batches_in_flight`` batches of ``batch_size`` rows submitted — requests /
  (first call to last return);
- **single call**: the same engine given every request in one call (a user's own script);
- **batches**: the same engine fed batch by batch (the old baseline), for reference;
- each side's busy fraction (1 − steps running fewer than ``max_num_seqs`` sequences / steps,
  from the engine's counters), and images/s or fusions/s per GPU beside the compute ceiling:

    ceiling = peak dense BF16 FLOP/s / FLOPs per request (``vecap.plan.flops_per_request``)

  about 9 TFLOP per 336 px LLaVA-1.5-7B image and 4.4 TFLOP per fusion of 250 + 60 tokens.

Ray Data itself is not in the GPU run (the CPU benchmark, ``python -m bench``, runs the whole
pipeline); what a GPU adds is how full the engine stays, which the actor shows. The results
(``--out``, default ``bench/results/gpu.json``) are what ``vecap plan --measured`` reads.

The tokenizer is vecap's tiny offline BPE (``vecap.demo.tiny_models``), padded with dummy tokens
to each model's vocabulary size, so every sampled id decodes. Prompts are sized in its
tokens: the caption prompt plus 576 image tokens, and fuse prompts of ~250 tokens (a shared
instruction prefix, as vecap's fuse prompt has, then the per-sample text).

``--reduced`` runs the same code on a CPU with tiny configurations and a few requests, so
CI keeps the script working (its figures mean nothing). Timing, medians over repetitions and
the results files come from the bench's one harness (:mod:`bench.harness`). Output: ``--out``
(JSON) and the same name with ``.md``, and the JSON again as the last line of stdout.

    python -m bench.gpu                           # GPU: both models, ~5-6 minutes on an H100/H200 (estimate)
    python -m bench.gpu --reduced --out x.json
    python -m bench.gpu --peers                   # GPU: vecap against a user's Ray Data LLM script (below)

``--peers`` runs the CPU benchmark's peers section (:mod:`bench.peers`) on the GPU machine instead:
``vecap caption`` / ``vecap fuse`` (the ``gpu`` recipe, one engine on one GPU, the full model
configurations with dummy weights) against the same jobs written as a user's own ``ray.data.llm``
script, each side in a fresh process, alternating, on the same img2dataset shards
(``--peers-data``, or ``--peers-images`` generated ones), with realistic output lengths. It
needs vLLM (GPU build), Ray (``ray[data]``) and img2dataset where the shards are generated; results
to ``bench/results/gpu-peers.{json,md}`` by default. With ``--reduced`` the same runs on a CPU
with the tiny configurations (a few minutes: each side starts Ray and its engine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench (and vecap, when not pip-installed) when run as a file

from bench.context import CAPTION_LENGTHS, FUSE_LENGTHS  # noqa: E402
from bench.harness import Harness, Target, timed  # noqa: E402
from vecap.plan import GPUS, card_of, flops_per_request  # noqa: E402

DEFAULT_PEAK_TFLOPS = GPUS["h100"].bf16_tflops  # when the device is none of vecap.plan.GPUS (H100 and H200: 989 dense)
NOMINAL = {"caption": 9.0, "fuse": 4.4}  # TFLOP per request, the published round figures
STAGE_VS_SINGLE = Target(">=", 0.95)
BUSY_WITHIN_5_POINTS = Target(">=", -0.05, "difference")

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
    small_text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 2048,
    }
    out = json.loads(json.dumps(config))
    if out["model_type"] == "llava":
        out["text_config"].update(small_text)
        out["vision_config"].update(
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": 32,
            }
        )
        out["image_seq_length"] = (32 // 8) ** 2
        out["torch_dtype"] = out["text_config"]["torch_dtype"] = "float32"
    else:
        out.update(small_text)
        out["torch_dtype"] = "float32"
    return out


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
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": v["image_size"]}, crop_size={"height": v["image_size"], "width": v["image_size"]}
        )
        LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=v["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ rows
def caption_rows(n: int, image_size: int) -> list[dict[str, Any]]:
    """The caption actor's rows: distinct random images (no cache hits), the stage's per-key seeds."""
    import numpy as np

    from vecap.stages.base import seed_for

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        key = f"{i:09d}"
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8).tobytes()
        rows.append(
            {
                "key": key,
                "shard": "00000",
                "source": "images",
                "is_marker": False,
                "status": "ok",
                "pixels": pixels,
                "pixels_w": image_size,
                "pixels_h": image_size,
                "needs_caption": True,
                "caption_seed": seed_for(0, "caption", key),
            }
        )
    return rows


def fuse_rows(n: int, tokenizer, target_tokens: int = 250, prefix_tokens: int = 150) -> list[dict[str, Any]]:
    """The fuse actor's rows: chat messages of ~target_tokens tokens, a shared instruction prefix, then
    per-sample text (distinct), and the stage's per-key seeds."""
    from vecap.demo.tiny_models import training_sentences
    from vecap.stages.base import seed_for

    sentences = training_sentences(4000, seed=1)
    lengths: dict[int, int] = {}  # sentence → its tokens (+1 for the space), counted when first used

    def count(messages: list[dict[str, Any]]) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    system, i = "", 0
    while count([{"role": "system", "content": system}]) < prefix_tokens:
        system += sentences[i] + " "
        i += 1
    base = count([{"role": "system", "content": system.strip()}, {"role": "user", "content": "Caption: "}])
    rows = []
    for k in range(n):
        words, size = [], base
        while size < target_tokens:  # sentence token counts, summed: no template rendering per sentence
            j = i % len(sentences)
            words.append(sentences[j])
            if j not in lengths:
                lengths[j] = len(tokenizer(sentences[j], add_special_tokens=False)["input_ids"]) + 1
            size += lengths[j]
            i += 1
        label = "Alt-text: " if k % 2 else "Caption: "
        messages = [{"role": "system", "content": system.strip()}, {"role": "user", "content": label + " ".join(words)}]
        key = f"{k:09d}"
        rows.append(
            {
                "key": key,
                "shard": "00000",
                "source": "captions",
                "is_marker": False,
                "status": "ok",
                "needs_fuse": True,
                "fuse_messages": json.dumps(messages),
                "fuse_seed": seed_for(0, "fuse", key),
            }
        )
    return rows


# ------------------------------------------------------------------------------ one stage
def peak_tflops(device: str, given: float | None) -> tuple[float, str]:
    """Dense BF16 TFLOP/s of the device: given, or vecap.plan's table by name, else the H100/H200 figure."""
    if given:
        return given, "given (--peak-tflops)"
    card = card_of(device)
    if card is not None:
        return card.bf16_tflops, f"{card.name}, vecap.plan.GPUS (vendor datasheet, dense BF16)"
    return DEFAULT_PEAK_TFLOPS, f"{device} not in vecap.plan.GPUS: the H100/H200 figure assumed"


def run_stage(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.engines import actor_rep, batches_rep, single_rep, summarise
    from vecap.backends import EngineSpec, Sampling

    caption = stage == "caption"
    config = LLAVA_15_7B if caption else LLAMA_3_8B
    if args.reduced:
        config = _reduced(config)
    folder = write_model(Path(args.work) / stage, config)
    gpu = torch.cuda.is_available() and not args.reduced
    lo, hi = CAPTION_LENGTHS if caption else FUSE_LENGTHS
    n = args.caption_requests if caption else args.fuse_requests
    batch = args.caption_batch if caption else args.fuse_batch
    max_num_seqs = args.caption_max_num_seqs if caption else args.fuse_max_num_seqs
    in_flight, reps = args.in_flight, args.reps
    if args.reduced:
        n, batch, max_num_seqs, in_flight, reps = min(n, 16), min(batch, 4), min(max_num_seqs, 4), 2, 1
    engine_kwargs: dict[str, Any] = {
        "load_format": "dummy",
        "max_model_len": 2048 if caption else 1024,
        "max_num_seqs": max_num_seqs,
    }
    if gpu:
        engine_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        engine_kwargs["enforce_eager"] = True
    spec = EngineSpec(
        backend="vllm",
        model=str(folder),
        multimodal=caption,
        sampling=Sampling(max_new_tokens=hi, temperature=0.0, top_p=1.0, synthetic_lengths=(lo, hi)),
        dtype="bfloat16" if gpu else "float32",
        engine_kwargs=engine_kwargs,
    )
    worker: Any  # a CaptionWorker or a FuseWorker
    if caption:
        from vecap.prompting import load_prompt
        from vecap.stages.caption import CaptionWorker

        startup, worker = timed(
            lambda: CaptionWorker(spec, load_prompt("caption", "concise"), batches_in_flight=in_flight)
        )
        rows = caption_rows(n + batch, config["vision_config"]["image_size"])
    else:
        from transformers import AutoTokenizer

        from vecap.stages.fuse import FuseWorker

        startup, worker = timed(lambda: FuseWorker(spec, batches_in_flight=in_flight))
        rows = fuse_rows(n + batch, AutoTokenizer.from_pretrained(folder))
    engine, flag = worker.engine, "needs_caption" if caption else "needs_fuse"
    warm, rows = rows[:batch], rows[batch:]  # warm-up on other inputs (no cache hits)
    warm_s, _ = timed(lambda: engine.generate([worker.request(r) for r in warm]))
    requests = [worker.request(r) for r in rows]  # the same requests (seeds, so output lengths) as the actor builds
    harness = Harness({stage: args.budget_s}, reps=reps)
    sides = harness.compare(
        stage,
        {
            "stage": lambda: actor_rep(worker, rows, batch, in_flight, flag),
            "single": lambda: single_rep(engine, requests),
            "batches": lambda: batches_rep(engine, requests, batch),
        },
    )
    outs = sides["single"][0]["_out"]
    summary = {name: summarise(r) for name, r in sides.items()}
    one, st, bb = summary["single"], summary["stage"], summary["batches"]
    prompt = sum(g.n_prompt_tokens or 0 for g in outs) / len(outs)
    output = sum(g.n_output_tokens or 0 for g in outs) / len(outs)
    tflop = flops_per_request(config, prompt, output) / 1e12
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    per_s = one["per_s"]
    ceiling = peak / tflop
    return {
        "model": ("LLaVA-1.5-7B" if caption else "Llama-3-8B") + (" (reduced config)" if args.reduced else ""),
        "reduced": args.reduced,
        "device": device,
        "dtype": spec.dtype,
        "requests": len(requests),
        "batch_size": batch,
        "in_flight": in_flight,
        "max_num_seqs": max_num_seqs,
        "output_lengths": [lo, hi],
        "reps": len(sides["single"]),
        "engine_startup_s": startup,
        "warmup_s": warm_s,
        "seconds": one["seconds"],
        "per_s": per_s,  # the single-call engine
        "stage_per_s": st["per_s"],  # the stage's engine actor, batches in flight
        "batches_per_s": bb["per_s"],
        "stage_vs_single": st["per_s"] / per_s if per_s else None,
        "batches_vs_single": bb["per_s"] / per_s if per_s else None,
        "busy_fraction_stage": st["busy_fraction"],
        "busy_fraction_single": one["busy_fraction"],
        "busy_fraction_batches": bb["busy_fraction"],
        # share of each side's wall spent inside engine.step(): below 1 when the engine waits (e.g. for
        # requests being added: image preprocessing runs in the feeder thread)
        "step_share_stage": st["step_share"],
        "step_share_single": one["step_share"],
        "sides": summary,
        "unit": "images/s" if caption else "fusions/s",
        "prompt_tokens_mean": prompt,
        "output_tokens_mean": output,
        "tflop_per_request": tflop,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "achieved_tflops": per_s * tflop,
        "ceiling_per_s": ceiling,
        "fraction_of_ceiling": per_s / ceiling,
        "stage_fraction_of_ceiling": (st["per_s"] or 0) / ceiling,
        "nominal_tflop_per_request": NOMINAL[stage],
        "nominal_ceiling_per_s": peak / NOMINAL[stage],
    }


# ------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reduced", action="store_true", help="tiny configs on the CPU, a few requests (CI)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON results (and the same name with .md) (default: bench/results/gpu.json, with --peers gpu-peers.json)",
    )
    p.add_argument("--stages", default="caption,fuse")
    # requests > batch x in-flight > max_num_seqs: the actor refills a full engine as batches finish
    p.add_argument("--caption-requests", type=int, default=1024)
    p.add_argument("--fuse-requests", type=int, default=2048)
    p.add_argument("--caption-batch", type=int, default=128, help="rows per actor call (the stage's batch_size)")
    p.add_argument("--fuse-batch", type=int, default=256)
    p.add_argument("--caption-max-num-seqs", type=int, default=256, help="as the gpu recipe")
    p.add_argument("--fuse-max-num-seqs", type=int, default=512, help="as the gpu recipe")
    p.add_argument("--in-flight", type=int, default=4, help="batches in flight per actor (max_batches_in_flight)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense BF16 TFLOP/s of one GPU (default: vecap.plan.GPUS by device name)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--reps", type=int, default=1, help="passes over the requests per side (median; 1 with --reduced)")
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds per model after which no new pass starts")
    p.add_argument("--work", default=None, help="folder for the model folders (default: a temporary one)")
    p.add_argument(
        "--peers",
        action="store_true",
        help="vecap caption/fuse against a user's own Ray Data LLM script, fresh processes (bench.peers)",
    )
    p.add_argument("--peers-images", type=int, default=2048, help="--peers: images to generate (default: %(default)s)")
    p.add_argument("--peers-shard-size", type=int, default=512, help="--peers: samples per generated shard")
    p.add_argument("--peers-data", default=None, help="--peers: an img2dataset images/ folder to use instead")
    p.add_argument("--peers-reps", type=int, default=2, help="--peers: repetitions of each side (alternating)")
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
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / ("gpu-peers.json" if args.peers else "gpu.json"))
    _env(args.reduced)
    if args.peers:
        return run_peers(args)
    if args.stage:  # child
        result = run_stage(args.stage, args)
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    stages = [s for s in args.stages.split(",") if s]
    harness = Harness({s: args.budget_s for s in stages}, reps=1 if args.reduced else args.reps, quick=args.reduced)
    with tempfile.TemporaryDirectory(prefix="vecap-gpu-bench-") as tmp:
        work = args.work or tmp
        harness.results.update({"mode": "reduced" if args.reduced else "full"})
        for stage in stages:
            harness.section(stage, partial(_run_child, stage, args, work, Path(tmp)))
            r = harness.results[stage]
            if "error" in r:
                continue
            harness.results.setdefault("peak_tflops", r["peak_tflops"])
            targets = not args.reduced
            how = (
                f"{r['requests']} requests, outputs of {r['output_lengths'][0]}–{r['output_lengths'][1]} tokens, "
                f"max_num_seqs {r['max_num_seqs']}, {r['model']} on {r['device']}"
            )
            harness.add(
                "gpu",
                f"{stage}: stage / single-call engine",
                f"{r['unit']}: the stage's engine actor ({r['in_flight']} "
                f"batches of {r['batch_size']} in flight) / one call of all requests ({how})",
                r["stage_per_s"],
                r["per_s"],
                STAGE_VS_SINGLE if targets else None,
            )
            harness.add(
                "gpu",
                f"{stage}: busy fraction, stage − single call",
                "1 − underfull_steps/steps",
                r["busy_fraction_stage"],
                r["busy_fraction_single"],
                BUSY_WITHIN_5_POINTS if targets else None,
            )
            harness.add(
                "gpu",
                f"{stage}: batch by batch / single call (the old baseline)",
                f"{r['unit']}",
                r["batches_per_s"],
                r["per_s"],
            )
            harness.add(
                "gpu",
                f"{stage}: share of the wall inside engine.step(), stage / single call",
                "Σ busy_s / seconds (below 1: the engine waited, e.g. for requests being added)",
                r["step_share_stage"],
                r["step_share_single"],
            )
            harness.add(
                "gpu",
                f"{stage}: stage per GPU / compute ceiling",
                f"{r['unit']}: the stage's actor / peak "
                f"{r['peak_tflops']:.0f} TFLOP/s ÷ {r['tflop_per_request']:.3g} TFLOP per request",
                r["stage_per_s"],
                r["ceiling_per_s"],
            )
            print(
                f"{stage}: stage {r['stage_per_s']:.2f} {r['unit']} per GPU, single call {r['per_s']:.2f} "
                f"(stage/single {r['stage_vs_single']:.3f}), busy fraction stage {r['busy_fraction_stage']} vs single "
                f"{r['busy_fraction_single']}; ceiling {r['ceiling_per_s']:.1f} "
                f"({r['tflop_per_request']:.2f} TFLOP/request "
                f"at {r['peak_tflops']:.0f} TFLOP/s); {r['prompt_tokens_mean']:.0f} "
                f"prompt + {r['output_tokens_mean']:.0f} "
                f"output tokens, engine start {r['engine_startup_s']:.0f}s",
                file=sys.stderr,
            )
        harness.results["seconds"] = time.time() - harness.t_start
    if args.reduced:
        harness.note("Reduced configs on the CPU: these figures only show that the script runs.")
    harness.note(
        "Sides: stage = the stage's engine actor class driven in-process with batches in flight (Ray Data "
        "not included); single = the same engine given every request in one call; batches = one batch after "
        "the other. Output lengths drawn from each request's seed (EOS ignored), the same on every side."
    )
    out = Path(args.out)
    harness.write(out.parent, out.stem, "vecap GPU engines: stage against single-call engine and the compute ceiling")
    print(json.dumps(json.loads(out.read_text())))  # the last line of stdout: the same JSON
    return 1 if harness.failed() else 0


# ------------------------------------------------------------------------------ peers
def peers_overrides(args: argparse.Namespace, folders: dict[str, Path]) -> tuple[str, dict[str, list[str]]]:
    """The recipe and, per stage, the ``--set`` overrides of the peers runs: the ``gpu`` recipe with the
    model folders (dummy weights), one engine, realistic output lengths and the fuse checks off (so that
    both sides' texts can be compared); with ``--reduced`` the CPU ``demo`` recipe and the tiny configs."""
    from vecap.validation.checks import FUSE_REASONS

    recipe = "demo" if args.reduced else "gpu"
    common = [f"caption.model={folders['caption']}", f"fuse.model={folders['fuse']}", "caption.dedup=false"]
    if args.reduced:
        common += ["caption.image_size=32", "caption.batch_size=4", "fuse.batch_size=4"]
    else:
        common += [f"{s}.engine.gpu_memory_utilization={args.gpu_memory_utilization}" for s in ("caption", "fuse")]
        common += ["caption.batch_size=" + str(args.caption_batch), "fuse.batch_size=" + str(args.fuse_batch)]
    out: dict[str, list[str]] = {}
    for stage, (lo, hi), seqs in (
        ("caption", CAPTION_LENGTHS, 4 if args.reduced else args.caption_max_num_seqs),
        ("fuse", FUSE_LENGTHS, 4 if args.reduced else args.fuse_max_num_seqs),
    ):
        extra = [f"{stage}.synthetic_lengths=[{lo},{hi}]", f"{stage}.engine.max_num_seqs={seqs}", f"{stage}.actors=1"]
        extra.append(f"{stage}.engine.load_format=dummy")
        if not args.reduced:
            extra += [f"{stage}.gpus_per_actor=1", f"{stage}.max_batches_in_flight={args.in_flight}"]
        if stage == "fuse":
            extra.append(f"fuse.validation.skip=[{','.join(FUSE_REASONS)}]")
        out[stage] = common + extra
    return recipe, out


def run_peers(args: argparse.Namespace) -> int:
    """``--peers``: the peers section (bench.peers) with the full model configurations on this machine."""
    import shutil

    from bench import peers
    from bench.workload import write_captions
    from vecap.config import load_config
    from vecap.reader import list_shards

    stages = [s for s in args.stages.split(",") if s]
    harness = Harness({"peers": args.budget_s * 4 * len(stages)}, reps=args.peers_reps, quick=args.reduced)
    with tempfile.TemporaryDirectory(prefix="vecap-gpu-peers-") as tmp:
        work = Path(args.work or tmp)
        folders = {
            "caption": write_model(work / "caption", _reduced(LLAVA_15_7B) if args.reduced else LLAVA_15_7B),
            "fuse": write_model(work / "fuse", _reduced(LLAMA_3_8B) if args.reduced else LLAMA_3_8B),
        }
        if args.peers_data:
            images = Path(args.peers_data).resolve()
        else:
            from vecap.demo.sample_data import make_sample_data

            n = min(args.peers_images, 16) if args.reduced else args.peers_images
            images = make_sample_data(work / "data", n_images=n, shard_size=min(args.peers_shard_size, n)).resolve()
        shards = list_shards(str(images))

        def make_root(name: str) -> Path:
            root = work / "runs" / name
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            (root / "images").symlink_to(images, target_is_directory=True)
            return root

        recipe, overrides = peers_overrides(args, folders)
        results: dict[str, Any] = {}
        for stage in stages:
            captions = None
            if stage == "fuse":
                base = make_root("peers-fuse-input")
                write_captions(base, shards, load_config(recipe, [*overrides["fuse"], f"root={base}"]))
                captions = base / "captions"
            harness.section(
                stage,
                partial(
                    peers.compare_job,
                    harness,
                    "peers",
                    stage,
                    recipe,
                    overrides[stage],
                    shards,
                    make_root,
                    images,
                    captions,
                    args.peers_reps,
                ),
            )
            if "error" not in harness.results[stage]:
                results[stage] = harness.results[stage]
        peers.report(harness, "peers", results, note=f" ({'reduced configs, CPU' if args.reduced else 'GPU'})")
        harness.results["mode"] = "reduced" if args.reduced else "full"
    harness.note(peers.PEERS_NOTES.replace("-c demo", f"-c {recipe}"))
    out = Path(args.out)
    harness.write(out.parent, out.stem, "vecap against a user's own Ray Data LLM script (bench.peers)")
    print(json.dumps(json.loads(out.read_text())))  # the last line of stdout: the same JSON
    return 1 if harness.failed() else 0


def _run_child(stage: str, args: argparse.Namespace, work: str, tmp: Path) -> dict[str, Any]:
    """One model in its own process (GPU memory is freed between models)."""
    child_out = tmp / f"{stage}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu",
        "--stage",
        stage,
        "--child-out",
        str(child_out),
        "--work",
        work,
        "--caption-requests",
        str(args.caption_requests),
        "--fuse-requests",
        str(args.fuse_requests),
        "--caption-batch",
        str(args.caption_batch),
        "--fuse-batch",
        str(args.fuse_batch),
        "--caption-max-num-seqs",
        str(args.caption_max_num_seqs),
        "--fuse-max-num-seqs",
        str(args.fuse_max_num_seqs),
        "--in-flight",
        str(args.in_flight),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--reps",
        str(args.reps),
        "--budget-s",
        str(args.budget_s),
    ]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.reduced:
        cmd.append("--reduced")
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0 or not child_out.exists():
        raise RuntimeError(f"child process exited with {rc}")
    return json.loads(child_out.read_text())


if __name__ == "__main__":
    sys.exit(main())
