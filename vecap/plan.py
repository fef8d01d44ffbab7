"""Plan a GPU run before paying for it: GPU-hours, nodes for a deadline, the caption:fuse split,
CPU cores, cost (``vecap plan``).

Per-GPU engine throughput comes from a GPU benchmark's results when one is given
(``python -m bench.gpu`` → ``bench/results/gpu.json``), else from the compute ceiling,

    ceiling = dense BF16 FLOP/s of the GPU / FLOPs per request,

times an *assumed* utilisation (said as such in the output). FLOPs per request are counted
from the model's architecture: 2 x matmul parameters per token, the LM head per sampled
token, attention's quadratic term, and for a VLM its vision tower and projector. For
LLaVA-1.5-7B that is about 9 TFLOP per 336 px image (576 image tokens + the prompt), and for
an 8B model about 4.4 TFLOP per fusion of 250 input and 60 output tokens, the published
figures (``tests/test_plan.py`` holds them to ±15 %). A LLaVA's image tokens are fixed by its
square input; a native-resolution VLM's (Qwen2-VL, Qwen2.5-VL: one token per 2x2 patches of
the image as its processor resizes it) follow the recipe's image bound (``caption.image_pixels``):
Qwen2.5-VL-7B at 448x448 px is 256 image tokens, about 5.6 TFLOP per image.

The CPU side per sample (read, decode, resize, prompt building, validation, writing) comes
from a dry run's markers (``--dry-run-root``: ``vecap run --dry-run`` on your own data) or
from the default below, measured by the bench's data-path section.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- GPUs
GPU_SOURCE = "vendor datasheets: dense BF16 tensor-core TFLOP/s (without sparsity)"


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense, from the vendor's datasheet
    memory_gb: int


GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 SXM", 989.0, 80),
    "h200": GPU("NVIDIA H200 SXM", 989.0, 141),
    "a100": GPU("NVIDIA A100 SXM", 312.0, 80),
    "l40s": GPU("NVIDIA L40S", 362.0, 48),
}

# ----------------------------------------------------------------------------- models
# The architecture fields the FLOP count needs, from the models' public config.json.
LLAVA_15_7B: dict[str, Any] = {
    "model_type": "llava",
    "vision_feature_layer": -2,
    "text_config": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "image_size": 336,
        "patch_size": 14,
    },
}
LLAMA_3_8B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
QWEN25_VL_7B: dict[str, Any] = {
    "model_type": "qwen2_5_vl",
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "out_hidden_size": 3584,
    },
}
# A native-resolution VLM's image area when the recipe bounds it by neither image_pixels nor image_size:
# transformers' Qwen2VLImageProcessor's default max_pixels (1280 image tokens of 28 px).
NATIVE_DEFAULT_PIXELS = 28 * 28 * 1280
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": LLAVA_15_7B,
    "Qwen/Qwen2.5-VL-7B-Instruct": QWEN25_VL_7B,
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA_3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA_3_8B,
    "meta-llama/Llama-3.1-8B": LLAMA_3_8B,
}

# Tokens per request when no GPU benchmark says otherwise: the concise caption prompt's text
# (~40 tokens with the chat template) and a 20-word caption; a fusion as the published figure.
CAPTION_TEXT_TOKENS, CAPTION_OUTPUT_TOKENS = 40, 30
FUSE_PROMPT_TOKENS, FUSE_OUTPUT_TOKENS = 250, 60

# CPU seconds per sample outside the engines, measured by `python -m bench --quick --sections driver`:
# a dry run of the `gpu` recipe (336 px), 500 samples in one shard, one node, 2 shared cores (AMD
# EPYC, 2026-11-29). Per step (process CPU; the write stage's wall seconds), and the whole Ray
# process tree's CPU per sample (driver, raylet, workers, object transfers: Ray's own costs too).
DEFAULT_CPU_STEPS = {
    "cpu_read": 0.0049,
    "cpu_caption_check": 0.0003,
    "cpu_fuse_prepare": 0.0001,
    "cpu_fuse_check": 0.0010,
    "t_write": 0.0010,
}
DEFAULT_CPU_TREE_S_PER_SAMPLE = 0.026
DEFAULT_CPU_S_PER_SAMPLE = DEFAULT_CPU_TREE_S_PER_SAMPLE  # the plan's default: the conservative, whole-tree figure
DEFAULT_CPU_SOURCE = (
    f"default: the bench's dry run of the gpu recipe, whole Ray process tree; its steps alone: "
    f"{1000 * sum(DEFAULT_CPU_STEPS.values()):.1f} ms"
)
DEFAULT_UTILISATION = 0.35  # share of the dense BF16 peak an engine sustains: an assumption, not a measurement
DEFAULT_PIPELINE_EFFICIENCY = 0.95  # stage / bare engine (the benchmark's target)


def _text(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def matmul_params(config: dict[str, Any]) -> int:
    """Parameters of the decoder's matrix multiplications (attention and MLP; no embeddings, no LM head)."""
    t = _text(config)
    h, heads = t["hidden_size"], t["num_attention_heads"]
    head_dim = t.get("head_dim") or h // heads
    kv = t.get("num_key_value_heads", heads) * head_dim
    per_layer = h * heads * head_dim + 2 * h * kv + heads * head_dim * h + 3 * h * t["intermediate_size"]
    return t["num_hidden_layers"] * per_layer


def native_resolution(config: dict[str, Any]) -> bool:
    """A Qwen2-VL-style VLM: the image's own size sets its tokens (patches merged 2x2), no fixed input size."""
    return "spatial_merge_size" in (config.get("vision_config") or {})


def image_tokens(config: dict[str, Any], image_size: int | None = None, image_pixels: int | None = None) -> int:
    """Image tokens a VLM puts in the prompt. LLaVA-style: the patch grid of its square input (CLS dropped),
    whatever the recipe's image bounds (its processor crops that square). Native resolution (Qwen2-VL): one
    per merged patch of an image at the recipe's bound: ``image_pixels`` (caption.image_pixels), else a
    square of ``image_size``, else the processor's default maximum; a figure for images at least that large."""
    v = config.get("vision_config")
    if not v:
        return 0
    if native_resolution(config):
        unit = v["patch_size"] * v["spatial_merge_size"]
        pixels = image_pixels or (image_size * image_size if image_size else NATIVE_DEFAULT_PIXELS)
        return max(1, pixels // (unit * unit))
    return config.get("image_seq_length") or (v["image_size"] // v["patch_size"]) ** 2


def native_vision_flops(config: dict[str, Any], n_image_tokens: int) -> float:
    """Forward FLOPs of a Qwen2-VL / Qwen2.5-VL vision tower for one image of ``n_image_tokens``: the ViT
    over its patches (Qwen2.5-VL: gated MLP, window attention but in fullatt_block_indexes), the patch
    embedding and the merger's MLP."""
    v = config["vision_config"]
    merge = v["spatial_merge_size"] ** 2
    n = n_image_tokens * merge  # patches
    if "embed_dim" in v:  # Qwen2-VL: hidden_size is the merger's output, the ViT is embed_dim wide, GELU MLP
        width, out = v["embed_dim"], v["hidden_size"]
        mlp = 2 * width * int(width * v.get("mlp_ratio", 4))
    else:  # Qwen2.5-VL: a gated SiLU MLP
        width, out = v["hidden_size"], v.get("out_hidden_size") or _text(config)["hidden_size"]
        mlp = 3 * width * v["intermediate_size"]
    depth = v["depth"]
    window = (v["window_size"] // v["patch_size"]) ** 2 if "window_size" in v else n
    full = set(v.get("fullatt_block_indexes") or range(depth)) if "window_size" in v else set(range(depth))
    flops = 2.0 * depth * (4 * width * width + mlp) * n
    flops += sum(4.0 * width * n * (n if layer in full else min(n, window)) for layer in range(depth))
    flops += 2.0 * 3 * v.get("temporal_patch_size", 2) * v["patch_size"] ** 2 * width * n  # patch embedding
    merged = width * merge
    flops += 2.0 * (merged * merged + merged * out) * n_image_tokens  # the merger's two-layer MLP
    return flops


def flops_per_request(
    config: dict[str, Any], prompt_tokens: float, output_tokens: float, n_image_tokens: int | None = None
) -> float:
    """Forward FLOPs of one request: 2 x matmul parameters per token (+ the LM head per sampled
    token), attention scores and values over the context, and for a VLM the vision tower and
    projector. ``prompt_tokens`` includes the prompt's image tokens; ``n_image_tokens`` says how many
    for a native-resolution VLM (default: :func:`image_tokens` of the model alone)."""
    t = _text(config)
    layers, h = t["num_hidden_layers"], t["hidden_size"]
    attn_dim = t["num_attention_heads"] * (t.get("head_dim") or h // t["num_attention_heads"])
    p, o = prompt_tokens, output_tokens
    flops = 2.0 * matmul_params(config) * (p + o) + 2.0 * h * t["vocab_size"] * (o + 1)
    # QK^T and AV: 2 x 2 x attn_dim FLOPs per (query, key) pair; causal: ~P^2/2 + P*O + O^2/2 pairs.
    flops += 4.0 * layers * attn_dim * (p * p / 2 + p * o + o * o / 2)
    v = config.get("vision_config")
    if v and native_resolution(config):
        flops += native_vision_flops(config, image_tokens(config) if n_image_tokens is None else n_image_tokens)
    elif v:
        n = (v["image_size"] // v["patch_size"]) ** 2 + 1  # patches + CLS
        used = v["num_hidden_layers"] + config.get("vision_feature_layer", -1) + 1  # layers whose output is used
        vh = v["hidden_size"]
        flops += 2.0 * used * (4 * vh * vh + 2 * vh * v["intermediate_size"]) * n + 4.0 * used * vh * n * n
        flops += 2.0 * 3 * v["patch_size"] ** 2 * vh * n  # patch embedding
        flops += 2.0 * (vh * h + h * h) * (n - 1)  # the two-layer projector
    return flops


def model_config(model: str) -> dict[str, Any]:
    """The architecture of ``model``: a known hub id, a local folder's config.json, or the hub's config."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    local = Path(model) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as err:  # noqa: BLE001 - any failure means: we cannot count its FLOPs
        raise ValueError(
            f"cannot read the architecture of {model!r} ({type(err).__name__}); give measured throughput "
            f"(--measured bench/results/gpu.json) or use a known model: {', '.join(KNOWN_MODELS)}"
        ) from None


# ----------------------------------------------------------------------------- CPU side
CPU_STEPS = {  # marker timing → what it covers
    "cpu_read": "read + decode + resize",
    "cpu_caption_check": "caption validation",
    "cpu_fuse_prepare": "fuse prompt building",
    "cpu_fuse_check": "fuse validation",
    "t_write": "write (CLIP tar + Parquet; wall seconds)",
}


def cpu_per_sample(timings: dict[str, float], samples: int) -> dict[str, float]:
    """CPU seconds per sample of each CPU step, from markers' summed timings (``cpu_*`` process CPU;
    the write stage records wall seconds only, which on an idle core is its CPU)."""
    if samples <= 0:
        return {}
    return {step: float(timings.get(step, 0.0)) / samples for step in CPU_STEPS}


def cpu_cost_from_dry_run(root: str, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, float], int]:
    """Per-step CPU seconds per sample of the dry run under ``root`` (``<root>/_dry_run/``), and its samples."""
    from vecap import vocab
    from vecap.layout import DRY_RUN_DIR, Layout
    from vecap.outputs import StageOutput
    from vecap.stats import ShardStats
    from vecap.storage import Storage

    root = root.rstrip("/")
    layout = Layout(f"{root}/{DRY_RUN_DIR}", input_root=root)
    storage = Storage.for_path(layout.root, storage_options)
    stream = None
    for stage in (vocab.FUSE, vocab.CAPTION):  # the stream's timings ride on each of its stages' markers: read one
        out = StageOutput(layout, stage, storage)
        if out.done():
            stream = out
            break
    if stream is None:
        raise FileNotFoundError(f"no dry-run markers under {layout.root}: run `vecap run --dry-run` first")
    streamed = ShardStats.total(stream.markers().values())
    written = ShardStats.total(StageOutput(layout, vocab.WRITE, storage).markers().values())
    totals = {k: float(v) for k, v in (streamed.timings + written.timings).items()}
    return cpu_per_sample(totals, streamed.rows), streamed.rows


# ----------------------------------------------------------------------------- the plan
@dataclass
class Throughput:
    """One model's per-GPU rate and where it comes from."""

    stage: str
    model: str
    per_s: float  # requests per second per GPU, what the plan uses
    source: str
    tflop_per_request: float | None = None
    ceiling_per_s: float | None = None
    image_tokens: int | None = None  # the caption stage's image tokens per request, as the plan assumes them


@dataclass
class Plan:
    images: int
    gpu: GPU
    gpus_per_node: int
    deadline_days: float
    price_per_gpu_hour: float | None
    fuse_fraction: float
    caption: Throughput
    fuse: Throughput
    cpu_s_per_sample: float
    cpu_steps: dict[str, float]
    cpu_source: str
    nodes: int = 0
    caption_gpus: int = 0
    fuse_gpus: int = 0
    images_per_s: float = 0.0
    run_hours: float = 0.0
    gpu_hours_work: float = 0.0
    gpu_hours_billed: float = 0.0
    caption_share: float = 0.0
    cores_per_gpu: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours_billed * self.price_per_gpu_hour

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"cost": self.cost}


def best_split(gpus: int, caption_per_s: float, fuse_per_s: float, fuse_fraction: float) -> tuple[int, int, float]:
    """(caption GPUs, fuse GPUs, images/s) of ``gpus`` engines that maximise the slower stage's rate."""
    if gpus < 2:
        raise ValueError("a run needs at least 2 GPUs (one caption and one fuse engine)")
    best = (1, gpus - 1, 0.0)
    for c in range(1, gpus):
        f = gpus - c
        rate = min(c * caption_per_s, f * fuse_per_s / fuse_fraction if fuse_fraction > 0 else math.inf)
        if rate > best[2]:
            best = (c, f, rate)
    return best


def card_of(device: str) -> GPU | None:
    """The GPUS entry a device name (``torch.cuda.get_device_name``) names, if any."""
    for key, card in GPUS.items():
        if key in device.lower():
            return card
    return None


def measured_throughput(path: str, gpu: GPU) -> dict[str, Throughput]:
    """Per-GPU rates from ``python -m bench.gpu``'s results; measured on another GPU, scaled by dense BF16 peak."""
    doc = json.loads(Path(path).read_text())
    if doc.get("mode") in ("reduced", "cpu-tiny"):
        raise ValueError(
            f"{path} comes from a benchmark's CPU mode ({doc['mode']}: tiny models on a CPU): not a GPU measurement"
        )
    out: dict[str, Throughput] = {}
    for stage in ("caption", "fuse"):
        r = doc.get(stage)
        if not isinstance(r, dict) or "error" in r or not r.get("per_s"):
            raise ValueError(f"{path} has no {stage} result")
        # The stage's own engine actor (continuous feeding) if measured, else the single-call engine.
        per_s, what = (
            (r["stage_per_s"], "the stage's engine actor") if r.get("stage_per_s") else (r["per_s"], "bare engine")
        )
        device = str(r.get("device", "?"))
        source = f"measured: {path}, {what}, {r.get('model', '?')} on {device}"
        measured_on = card_of(device)
        if measured_on is None or measured_on.name != gpu.name:
            peak = (
                measured_on.bf16_tflops if measured_on else float(r.get("peak_tflops") or doc.get("peak_tflops") or 0)
            )
            if not peak:
                raise ValueError(f"{path}: {stage} was measured on {device!r}, whose peak TFLOP/s is unknown")
            per_s *= gpu.bf16_tflops / peak
            source += (
                f", scaled to the {gpu.name} by dense BF16 peak ({gpu.bf16_tflops:.0f} / {peak:.0f} TFLOP/s; "
                "memory bandwidth, which bounds decoding, is not scaled)"
            )
        out[stage] = Throughput(
            stage, str(r.get("model", "?")), per_s, source, r.get("tflop_per_request"), r.get("ceiling_per_s")
        )
    return out


def ceiling_throughput(
    stage: str,
    model: str,
    gpu: GPU,
    utilisation: float,
    pipeline_efficiency: float,
    image_size: int | None = None,
    image_pixels: int | None = None,
) -> Throughput:
    """The compute ceiling's rate; ``image_size`` and ``image_pixels`` are the caption recipe's image bounds."""
    config = model_config(model)
    tokens = image_tokens(config, image_size, image_pixels) if stage == "caption" else None
    if tokens is not None:
        prompt, output = tokens + CAPTION_TEXT_TOKENS, CAPTION_OUTPUT_TOKENS
    else:
        prompt, output = FUSE_PROMPT_TOKENS, FUSE_OUTPUT_TOKENS
    tflop = flops_per_request(config, prompt, output, tokens) / 1e12
    ceiling = gpu.bf16_tflops / tflop
    per_s = ceiling * utilisation * pipeline_efficiency
    source = (
        f"compute ceiling: {gpu.bf16_tflops:.0f} TFLOP/s / {tflop:.2f} TFLOP per request ({prompt:.0f} prompt + "
        f"{output:.0f} output tokens) = {ceiling:.1f}/s, x {utilisation:.2f} ASSUMED utilisation x "
        f"{pipeline_efficiency:.2f} stage/engine" + (f"; {tokens} image tokens per image" if tokens else "")
    )
    return Throughput(stage, model, per_s, source, tflop, ceiling, tokens or None)


def make_plan(
    cfg: Any,
    images: int,
    gpu: str = "h100",
    *,
    deadline_days: float = 7.0,
    gpus_per_node: int = 8,
    price_per_gpu_hour: float | None = None,
    measured: str | None = None,
    utilisation: float | None = None,
    pipeline_efficiency: float | None = None,
    fuse_fraction: float = 1.0,
    cpu_s_per_sample: float | None = None,
    dry_run_root: str | None = None,
) -> Plan:
    """The plan for ``images`` images with the recipe ``cfg`` (its caption and fuse models).

    Without ``measured``, per-GPU throughput is the compute ceiling x ``utilisation`` (default
    :data:`DEFAULT_UTILISATION`) x ``pipeline_efficiency`` (default :data:`DEFAULT_PIPELINE_EFFICIENCY`),
    both assumptions the output names as such."""
    if images <= 0 or deadline_days <= 0 or gpus_per_node < 1:
        raise ValueError("images, deadline and GPUs per node must be positive")
    try:
        card = GPUS[gpu.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}") from None
    if measured:
        rates = measured_throughput(measured, card)
    else:
        u = DEFAULT_UTILISATION if utilisation is None else utilisation
        e = DEFAULT_PIPELINE_EFFICIENCY if pipeline_efficiency is None else pipeline_efficiency
        c = cfg.caption
        rates = {
            "caption": ceiling_throughput("caption", c.model, card, u, e, c.image_size, c.image_pixels),
            "fuse": ceiling_throughput("fuse", cfg.fuse.model, card, u, e),
        }
    steps: dict[str, float] = {}
    if cpu_s_per_sample is not None:
        cpu, cpu_source = cpu_s_per_sample, "given (--cpu-s-per-sample)"
    elif dry_run_root:
        steps, n = cpu_cost_from_dry_run(dry_run_root, getattr(cfg, "storage_options", None))
        cpu, cpu_source = sum(steps.values()), f"dry run under {dry_run_root} ({n:,} samples)"
    else:
        cpu, cpu_source, steps = DEFAULT_CPU_S_PER_SAMPLE, DEFAULT_CPU_SOURCE, dict(DEFAULT_CPU_STEPS)
    plan = Plan(
        images=images,
        gpu=card,
        gpus_per_node=gpus_per_node,
        deadline_days=deadline_days,
        price_per_gpu_hour=price_per_gpu_hour,
        fuse_fraction=fuse_fraction,
        caption=rates["caption"],
        fuse=rates["fuse"],
        cpu_s_per_sample=cpu,
        cpu_steps=steps,
        cpu_source=cpu_source,
    )
    rc, rf = plan.caption.per_s, plan.fuse.per_s
    caption_s, fuse_s = 1.0 / rc, fuse_fraction / rf  # GPU-seconds per image in each stage
    plan.caption_share = caption_s / (caption_s + fuse_s)
    plan.gpu_hours_work = images * (caption_s + fuse_s) / 3600
    deadline_s = deadline_days * 86400
    nodes = max(1, math.ceil(images * (caption_s + fuse_s) / deadline_s / gpus_per_node))
    while True:  # integer actor counts lose a little against the ideal split: add nodes until it fits
        c, f, rate = best_split(nodes * gpus_per_node, rc, rf, fuse_fraction)
        if rate * deadline_s >= images:
            break
        nodes += 1
    plan.nodes, plan.caption_gpus, plan.fuse_gpus, plan.images_per_s = nodes, c, f, rate
    plan.run_hours = images / rate / 3600
    plan.gpu_hours_billed = nodes * gpus_per_node * plan.run_hours
    plan.cores_per_gpu = cpu * rate / (nodes * gpus_per_node)
    if plan.caption_gpus * rc > rate * 1.05 or plan.fuse_gpus * rf / max(fuse_fraction, 1e-9) > rate * 1.05:
        plan.notes.append("the integer split leaves one stage's engines partly idle (its rate exceeds the other's)")
    return plan


def render(plan: Plan, recipe: str = "") -> str:
    g = plan.gpu
    per_node = plan.gpus_per_node
    lines = [
        f"vecap plan: {plan.images:,} images, recipe {recipe or '?'}, {g.name} ({g.bf16_tflops:.0f} dense BF16 "
        f"TFLOP/s; {GPU_SOURCE}), {per_node} GPUs per node, deadline {plan.deadline_days:g} days",
        "",
        "Per-GPU engine throughput:",
    ]
    for t, unit in ((plan.caption, "images/s"), (plan.fuse, "fusions/s")):
        lines.append(f"  {t.stage:<8} {t.model}: {t.per_s:.1f} {unit} per GPU")
        lines.append(f"           ({t.source})")
    lines += [
        "",
        f"GPU work: {plan.gpu_hours_work:,.0f} GPU-hours (caption {plan.caption_share:.0%}, fuse "
        f"{1 - plan.caption_share:.0%}; {plan.fuse_fraction:.0%} of images reach the fusion LLM)",
        f"Actors: caption:fuse = {plan.caption_gpus}:{plan.fuse_gpus} over {plan.nodes} node(s) "
        f"(balanced share {plan.caption_share:.2f}:{1 - plan.caption_share:.2f}); recipe: --set caption.actors="
        f"{plan.caption_gpus} --set fuse.actors={plan.fuse_gpus}",
        f"Nodes for the deadline: {plan.nodes} x {per_node} GPUs → {plan.images_per_s:,.0f} images/s, the run takes "
        f"{plan.run_hours:,.1f} h ({plan.run_hours / 24:.1f} days)",
        f"GPU-hours billed: {plan.nodes * per_node} GPUs x {plan.run_hours:,.1f} h = {plan.gpu_hours_billed:,.0f}",
        f"CPU: {plan.cpu_s_per_sample * 1000:.1f} ms CPU per sample outside the engines ({plan.cpu_source}) → "
        f"{plan.cores_per_gpu:.2f} cores per GPU at {plan.images_per_s / (plan.nodes * per_node):.1f} images/s per GPU "
        f"of the cluster, {plan.cores_per_gpu * per_node:.1f} per {per_node}-GPU node, plus the engine actors' "
        "cpus_per_actor (vLLM's own CPU work: image preprocessing, scheduling, detokenising)",
    ]
    if plan.cpu_steps:
        lines.append(
            "    per step: " + ", ".join(f"{CPU_STEPS.get(k, k)} {v * 1000:.2f} ms" for k, v in plan.cpu_steps.items())
        )
    if plan.cost is not None and plan.price_per_gpu_hour is not None:
        lines.append(
            f"Cost: {plan.gpu_hours_billed:,.0f} GPU-hours x {plan.price_per_gpu_hour:g}/GPU-hour = "
            f"{plan.cost:,.0f} (the work alone: {plan.gpu_hours_work * plan.price_per_gpu_hour:,.0f})"
        )
    lines += [f"Note: {n}" for n in plan.notes]
    lines.append("Not counted: engine start-up (minutes per actor), downloads, storage and egress.")
    return "\n".join(lines)
