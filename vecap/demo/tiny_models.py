"""Tiny random-weight LLaVA, Qwen2.5-VL and Llama checkpoints, built offline, for tests, the demo and benchmarks.

Nothing can be downloaded on the machines that run the tests, so the models the pipeline
drives (a VLM that captions images, an LLM that fuses captions) are built here from
scratch: a byte-level BPE tokenizer trained on generated English sentences, and models
with fixed-seed random weights. Their output is gibberish, but they exercise the same code
paths as ``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2.5-VL-7B-Instruct`` (a second VLM family:
its own processor, image tokens, chat template and resolution rules) and a Llama chat model,
in vLLM and in transformers.

Two scales share one code path: ``tiny`` (under 1 MB, for tests) and ``bench`` (tens of
millions of parameters, so that generation rather than overhead dominates on a CPU).

A folder counts as complete only once its marker file, written last, describes exactly
what this code would build; models are built in a temporary folder and renamed into
place, so an interrupted build never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "vecap_tiny.json"
# Bump when the build changes in a way the size table does not show (forces rebuilds).
BUILD_VERSION = 2
SEED = 0
# An upper bound: the generated corpus yields about 700 tokens, for both scales.
VOCAB_SIZE = 1024

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
# Trained first, so they get ids 0..4 in this order.
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        # vLLM's CPU attention supports head_dim 32, 64, 80, ... only (not 16).
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
    },
    "bench": {
        "text": {
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
        },
        "vision": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
    },
}
MAX_POSITIONS = 4096

# The llava-1.5 conversation format ("<s>USER: <image>\nDescribe the image. ASSISTANT:").
# Content may be a string or a list of parts; image parts render as <image>. Every
# literal newline is emitted from inside {{ }}, so trim_blocks (which transformers and
# vLLM use) cannot swallow it. The template writes the BOS and the tokenizer adds none,
# so every path gets exactly one: a rendered string tokenized with special tokens
# (vLLM's generate, transformers' processor), and vLLM's chat()/server, which tokenize the
# rendered chat without adding special tokens.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- ' ' -}}"
    "{%- else -%}{{- eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def model_dirs(out_dir: str | Path, scale: str = "tiny") -> dict[str, Path]:
    """Where ``build_tiny_models`` puts each model (``{scale}-llava``, ``{scale}-llama``, ``{scale}-qwen2vl``)."""
    _check_scale(scale)
    out = Path(out_dir)
    return {kind: out / f"{scale}-{kind}" for kind in ("llava", "llama", "qwen2vl")}


def build_tiny_models(out_dir: str | Path, scale: str = "tiny", overwrite: bool = False) -> dict[str, Path]:
    """Build (or reuse) the random LLaVA, Llama and Qwen2.5-VL of ``scale`` under ``out_dir``.

    Returns ``{"llava": out_dir/"{scale}-llava", "llama": out_dir/"{scale}-llama", "qwen2vl":
    out_dir/"{scale}-qwen2vl"}``. A folder whose marker matches what would be built is kept unless
    ``overwrite``; anything else there is replaced.
    The result depends only on ``scale`` and this code (fixed seeds), byte for byte.
    """
    dirs = model_dirs(out_dir, scale)
    for kind, path in dirs.items():
        spec = _spec(kind, scale)
        if not overwrite and is_complete(path, spec):
            log.info("reusing %s model at %s", kind, path)
            continue
        _build_atomically(path, spec, overwrite)
    return dirs


def is_complete(path: str | Path, spec: dict[str, Any]) -> bool:
    """True if ``path`` holds a finished build of exactly ``spec`` (its marker is written last)."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def _check_scale(scale: str) -> None:
    if scale not in SIZES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SIZES)}")


def _spec(kind: str, scale: str) -> dict[str, Any]:
    """The marker's content: what the folder holds, so a change in sizes forces a rebuild."""
    _check_scale(scale)
    sizes = SIZES[scale]
    spec: dict[str, Any] = {
        "kind": kind,
        "scale": scale,
        "build_version": BUILD_VERSION,
        "seed": SEED,
        "vocab_size_max": VOCAB_SIZE,
        "text": sizes["text"],
        "description": _DESCRIPTIONS[kind],
    }
    if kind == "llava":
        spec["vision"] = sizes["vision"]
    if kind == "qwen2vl":
        spec["vision"] = QWEN2VL_VISION[scale]
        spec["image_pixels"] = QWEN2VL_PIXELS[scale]
    return spec


_DESCRIPTIONS = {
    "llava": "random-weight LlavaForConditionalGeneration (CLIP vision + Llama text), llava-hf key layout",
    "llama": "random-weight LlamaForCausalLM chat model",
    "qwen2vl": "random-weight Qwen2_5_VLForConditionalGeneration (native-resolution ViT + Qwen2 text), hub key layout",
}


def _build_atomically(path: Path, spec: dict[str, Any], overwrite: bool) -> None:
    """Build into a temporary sibling folder, write the marker last, then rename into place."""
    from transformers.utils import logging as hf_logging

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar: a tiny model writes one file
    try:
        if spec["kind"] == "llava":
            _build_llava(tmp, spec["scale"])
        elif spec["kind"] == "qwen2vl":
            _build_qwen2vl(tmp, spec["scale"])
        elif spec["kind"] == "clip":
            _build_clip(tmp)
        else:
            _build_llama(tmp, spec["scale"])
        (tmp / MARKER).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        # mkdtemp and safetensors create owner-only files; models are shared read-only.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if path.exists():
            if not overwrite and is_complete(path, spec):
                # Another process finished the same build meanwhile: keep theirs.
                shutil.rmtree(tmp)
                return
            log.info("replacing %s", path)
            shutil.rmtree(path)
        os.rename(tmp, path)
        log.info("built %s model (%s) at %s", spec["kind"], spec["scale"], path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- tokenizer


def training_sentences(n: int = 600, seed: int = SEED) -> list[str]:
    """Varied English sentences about objects, colours, places and brands (the BPE corpus).

    Generated rather than downloaded; also includes the chat-template words so that the
    prompt the pipeline sends tokenizes into a few tokens.
    """
    rng = random.Random(seed)
    colors = [
        "red",
        "blue",
        "green",
        "yellow",
        "black",
        "white",
        "orange",
        "purple",
        "brown",
        "gray",
        "pink",
        "golden",
        "silver",
        "dark",
        "bright",
    ]
    objects = [
        "dog",
        "cat",
        "car",
        "bicycle",
        "bottle",
        "chair",
        "table",
        "laptop",
        "phone",
        "shoe",
        "house",
        "tree",
        "flower",
        "bird",
        "horse",
        "boat",
        "train",
        "bus",
        "cup",
        "book",
        "lamp",
        "guitar",
        "umbrella",
        "backpack",
        "clock",
        "sign",
        "pizza",
        "cake",
        "kite",
        "ball",
    ]
    places = [
        "on a beach",
        "in a park",
        "on a city street",
        "in a kitchen",
        "in a living room",
        "near a river",
        "in the mountains",
        "at a market",
        "in a garden",
        "at the airport",
        "in a forest",
        "on a wooden table",
        "in front of a store",
        "at night",
        "in the snow",
    ]
    brands = [
        "Nike",
        "Apple",
        "Toyota",
        "Coca-Cola",
        "Samsung",
        "Adidas",
        "IKEA",
        "Sony",
        "Lego",
        "Canon",
        "Ford",
        "Nikon",
        "Puma",
        "Honda",
        "Starbucks",
    ]
    verbs = ["sitting", "standing", "lying", "parked", "shown", "placed", "hanging", "floating"]
    counts = ["a", "one", "two", "three", "several", "many", "a few", "four"]
    templates = [
        "A photo of {c} {col} {o} {p}.",
        "{C} {col} {o}s {v} {p}.",
        "The {col} {o} is {v} {p}.",
        "A {brand} {o} {v} {p}, next to a {col2} {o2}.",
        "Close-up of a {col} {brand} {o} with a {col2} background.",
        "An image showing {c} {o}s and a {col} {o2} {p}.",
        "There is a {col} {o} {p} and the sky is {col2}.",
        "{brand} logo printed on a {col} {o}.",
        "A {col} {o} and a {col2} {o2} {v} {p}, photographed in {year}.",
        "Describe the image: a {col} {o} {p}.",
    ]
    fixed = [
        "USER: Describe the image. ASSISTANT: A dog on a beach.",
        "USER: Write a short caption. ASSISTANT: A red car parked on a city street.",
        "Describe the image in one sentence.",
        "Rewrite the caption using the details of the alt-text and the visual description.",
        "Numbers such as 0 1 2 3 4 5 6 7 8 9 10 100 2024 appear in captions.",
        "Punctuation: commas, periods. Questions? Exclamations! Quotes \"like this\" and 'this'; colons: yes.",
    ]
    out = list(fixed)
    while len(out) < n:
        obj, obj2 = rng.sample(objects, 2)
        col, col2 = rng.sample(colors, 2)
        count = rng.choice(counts)
        text = rng.choice(templates).format(
            c=count,
            C=count.capitalize(),
            col=col,
            col2=col2,
            o=obj,
            o2=obj2,
            p=rng.choice(places),
            v=rng.choice(verbs),
            brand=rng.choice(brands),
            year=rng.randint(1950, 2024),
        )
        out.append(text)
    return out


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with llava-hf's conventions, as a ``PreTrainedTokenizerFast``.

    ``<image>`` is a special token (never split); BOS comes from the chat template, not from
    the tokenizer (see ``CHAT_TEMPLATE``); padding is on the left, as batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_sentences(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE},
    )


# --------------------------------------------------------------------------- models


def _text_config(scale: str, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **SIZES[scale]["text"],
    )


def _generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_llama(out: Path, scale: str) -> None:
    """A text-only Llama chat model: ``save_pretrained`` already writes the standard layout."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer(VOCAB_SIZE)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(_text_config(scale, tokenizer)).eval()
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_llava(out: Path, scale: str) -> None:
    """A LLaVA-1.5-shaped model (CLIP vision, 2-layer MLP projector, Llama text) plus its processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    sizes = SIZES[scale]
    vision = sizes["vision"]
    tokenizer = build_tokenizer(VOCAB_SIZE)
    # "default" drops CLIP's CLS feature: one image token per patch.
    image_seq_length = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(projection_dim=vision["hidden_size"], **vision),
        text_config=_text_config(scale, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,  # as llava-1.5; needs at least two vision layers
        vision_feature_select_strategy="default",
        image_seq_length=image_seq_length,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    _rewrite_llava_hf_layout(model, out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision["image_size"]},
        crop_size={"height": vision["image_size"], "width": vision["image_size"]},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by "default"
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


# transformers 5 keeps the vision tower as a bare CLIPVisionTransformer under model.vision_tower,
# and its save_pretrained writes `vision_tower.embeddings...`; vLLM (and real llava-hf
# checkpoints) use `vision_tower.vision_model.embeddings...`. Longest prefix first.
_LLAVA_HF_PREFIXES = [
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]


def llava_hf_key(name: str) -> str:
    """The llava-hf checkpoint key for a parameter of transformers' ``LlavaForConditionalGeneration``."""
    for old, new in _LLAVA_HF_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(f"unexpected LLaVA parameter name {name!r}")


def _rewrite_llava_hf_layout(model: Any, out: Path) -> None:
    """Replace the weights ``save_pretrained`` wrote with one file in the llava-hf key layout."""
    from safetensors.torch import save_file

    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    state = {llava_hf_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- Qwen2.5-VL

# Qwen's own special tokens (the order fixes their ids); the image is one <|image_pad|> between
# <|vision_start|> and <|vision_end|> in the prompt, which the processor (transformers) or vLLM
# repeats once per merged patch of the image at the size the image processor resizes it to.
QWEN_EOT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN_IMAGE, QWEN_VIDEO = "<|image_pad|>", "<|video_pad|>"
QWEN_SPECIAL_TOKENS = [QWEN_EOT, QWEN_IM_START, QWEN_IM_END, QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE, QWEN_VIDEO]

# The vision tower (a ViT over patch_size px patches, 2x2 patches merged into one image token)
# and the image processor's pixel bounds, per scale. Qwen2.5-VL-7B: 14 px patches, window 112 px,
# 3136..12845056 pixels; here 8 px patches keep a few hundred pixels a handful of tokens. The
# processor resizes every image so that both sides are multiples of patch_size x spatial_merge_size
# and its area lies within [min_pixels, max_pixels], keeping the aspect ratio: no square crop.
QWEN2VL_VISION: dict[str, dict[str, Any]] = {
    "tiny": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 32,
        "fullatt_block_indexes": [1],
    },
    "bench": {
        "depth": 4,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_heads": 4,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 64,
        "fullatt_block_indexes": [1, 3],
    },
}
QWEN2VL_PIXELS: dict[str, dict[str, int]] = {
    "tiny": {"min_pixels": 32 * 32, "max_pixels": 64 * 64},  # 4..16 image tokens
    "bench": {"min_pixels": 32 * 32, "max_pixels": 128 * 128},  # 4..64 image tokens
}

# Qwen2.5-VL's conversation format: a default system turn, then
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe...<|im_end|>\n<|im_start|>assistant\n".
# As in CHAT_TEMPLATE, every literal newline is emitted from inside {{ }} (trim_blocks).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_qwen_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE with Qwen2's conventions: no BOS, ``<|im_end|>`` ends a turn (EOS),
    ``<|endoftext|>`` pads (on the left), the vision tokens are special (never split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*training_sentences(), "system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=QWEN_IM_END,
        pad_token=QWEN_EOT,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        chat_template=QWEN_CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": QWEN_IMAGE,
            "video_token": QWEN_VIDEO,
            "vision_start_token": QWEN_VISION_START,
            "vision_end_token": QWEN_VISION_END,
        },
    )


def mrope_section(head_dim: int) -> list[int]:
    """How multimodal RoPE splits a head's rotary frequencies between time, height and width
    (Qwen2.5-VL-7B, head_dim 128: [16, 24, 24]; the three sum to head_dim / 2)."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def _build_qwen2vl(out: Path, scale: str) -> None:
    """A Qwen2.5-VL-shaped model (window-attention ViT, patch merger, Qwen2 text with M-RoPE) plus
    its processor (``Qwen2VLImageProcessor`` with small pixel bounds), in the hub's key layout."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    text = SIZES[scale]["text"]
    vision = QWEN2VL_VISION[scale]
    pixels = QWEN2VL_PIXELS[scale]
    tokenizer = build_qwen_tokenizer(VOCAB_SIZE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": mrope_section(head_dim),
            },
            "bos_token_id": ids[QWEN_EOT],
            "eos_token_id": ids[QWEN_IM_END],
            "pad_token_id": ids[QWEN_EOT],
            "tie_word_embeddings": False,
        },
        vision_config={**vision, "out_hidden_size": text["hidden_size"], "in_channels": 3},
        image_token_id=ids[QWEN_IMAGE],
        video_token_id=ids[QWEN_VIDEO],
        vision_start_token_id=ids[QWEN_VISION_START],
        vision_end_token_id=ids[QWEN_VISION_END],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[QWEN_EOT], eos_token_id=[ids[QWEN_IM_END], ids[QWEN_EOT]], pad_token_id=ids[QWEN_EOT]
    )
    model.save_pretrained(out)
    _rewrite_keys(model, out, _QWEN_HUB_PREFIXES)

    merge = {
        "patch_size": vision["patch_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"],
    }
    size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **merge),
        video_processor=Qwen2VLVideoProcessor(size=size, **merge),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


# transformers 5 writes `model.visual...` and `model.language_model...`; Qwen/Qwen2.5-VL-*-Instruct
# on the hub (what vLLM and transformers both read for the GPU recipe) use `visual...`, `model...`.
_QWEN_HUB_PREFIXES = [
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
]


def _rewrite_keys(model: Any, out: Path, prefixes: list[tuple[str, str]]) -> None:
    """Replace the weights ``save_pretrained`` wrote with one file whose keys are renamed by ``prefixes``."""
    from safetensors.torch import save_file

    def key(name: str) -> str:
        for old, new in prefixes:
            if name.startswith(old):
                return new + name[len(old) :]
        raise ValueError(f"unexpected parameter name {name!r}")

    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    state = {key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- CLIP (for CLIPScore)

CLIP_SIZES: dict[str, Any] = {
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
    },
    "projection_dim": 16,
}
# CLIP's own special tokens; EOS must not get id 2 (transformers' CLIP then pools at the
# highest token id, the pre-2023 behaviour), so the order puts it at 3.
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPECIAL_TOKENS = [UNK, PAD, CLIP_BOS, CLIP_EOS]


def clip_model_dir(out_dir: str | Path) -> Path:
    """Where ``build_tiny_clip`` puts the model."""
    return Path(out_dir) / "tiny-clip"


def build_tiny_clip(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Build (or reuse) a random-weight transformers ``CLIPModel`` with its ``CLIPProcessor``.

    For the optional CLIPScore of the write stage (``write.clip_model``). Built offline like the
    LLaVA and Llama above (a BPE trained on the same generated sentences, fixed seed); separate
    from ``build_tiny_models``, whose folders and markers it leaves untouched. Returns its folder.
    """
    path = clip_model_dir(out_dir)
    spec = {
        "kind": "clip",
        "scale": "tiny",
        "build_version": BUILD_VERSION,
        "seed": SEED,
        "vocab_size_max": VOCAB_SIZE,
        "sizes": CLIP_SIZES,
        "description": "random-weight CLIPModel (ViT + text transformer) with a CLIPProcessor",
    }
    if not overwrite and is_complete(path, spec):
        log.info("reusing clip model at %s", path)
        return path
    _build_atomically(path, spec, overwrite)
    return path


def build_clip_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE with CLIP's conventions: ``<|startoftext|> … <|endoftext|>``, right padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=CLIP_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_sentences(), trainer=trainer)
    bos, eos = tok.token_to_id(CLIP_BOS), tok.token_to_id(CLIP_EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, bos), (CLIP_EOS, eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        model_max_length=CLIP_SIZES["text"]["max_position_embeddings"],
    )


def _build_clip(out: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer(VOCAB_SIZE)
    vision = CLIP_SIZES["vision"]
    config = CLIPConfig(
        text_config={
            **CLIP_SIZES["text"],
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=dict(vision),
        projection_dim=CLIP_SIZES["projection_dim"],
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    # Random towers give cosines spread around 0, half of which CLIPScore clips to 0. Like a
    # trained CLIP, make both embeddings share a direction: one projection for both towers and
    # the same offset after both final layer norms, so cosines are mostly positive and still vary.
    with torch.no_grad():
        offset = torch.randn(vision["hidden_size"], generator=torch.Generator().manual_seed(SEED))
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.post_layernorm.bias.copy_(offset)
        model.text_model.final_layer_norm.bias.copy_(offset)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision["image_size"]},
        crop_size={"height": vision["image_size"], "width": vision["image_size"]},
        do_center_crop=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
