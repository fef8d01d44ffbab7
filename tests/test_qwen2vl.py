"""A second VLM family end to end: the tiny random-weight Qwen2.5-VL (``vecap.demo.tiny_models``).

Qwen2-VL models read images at their own resolution (each side rounded to the patch grid, the
area within the processor's [min_pixels, max_pixels], the aspect ratio kept: no square crop) and
have their own chat template and image tokens. The caption stage bounds the area on the CPU
(``caption.image_pixels``, ``caption.image_size: null``) and leaves the rest to the model's
processor, in vLLM and in transformers alike; the LLaVA recipes keep their short-side bound and
their fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import BAD_SHARD, BAD_STATUSES, bad_images
from helpers import marker_path, stage_output
from test_backends import _texts

from vecap import schemas, vocab
from vecap.backends import Request
from vecap.config import ConfigError, load_config
from vecap.demo.tiny_models import QWEN2VL_PIXELS, QWEN2VL_VISION
from vecap.images import prepare_image
from vecap.pipeline import run
from vecap.prompting import load_prompt
from vecap.reader import ShardReader
from vecap.stages.caption import CaptionStage
from vecap.validation import check_caption

PIXELS = QWEN2VL_PIXELS["tiny"]
VISION = QWEN2VL_VISION["tiny"]
FACTOR = VISION["patch_size"] * VISION["spatial_merge_size"]  # each side a multiple of this
SHARDS = ["00000", BAD_SHARD]


def qwen_overrides(model: Path) -> list[str]:
    """The demo recipe with the tiny Qwen2.5-VL as its VLM, images bounded by the processor's max_pixels."""
    return [
        f"caption.model={model}",
        "caption.image_size=null",
        f"caption.image_pixels={PIXELS['max_pixels']}",
        "caption.max_new_tokens=12",  # what test_backends' _texts decodes
    ]


def image_tokens(width: int, height: int) -> int:
    """Image tokens Qwen2-VL's processor gives an image (its smart_resize, then one token per merged patch)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, FACTOR, PIXELS["min_pixels"], PIXELS["max_pixels"])
    return (h // FACTOR) * (w // FACTOR)


def test_checkpoint_processor_and_chat_template(tiny_models: dict[str, Path]) -> None:
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor

    with safe_open(str(tiny_models["qwen2vl"] / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"visual", "model", "lm_head"}  # Qwen/Qwen2.5-VL-*-Instruct's layout
    assert json.loads((tiny_models["qwen2vl"] / "config.json").read_text())["model_type"] == "qwen2_5_vl"

    processor = AutoProcessor.from_pretrained(tiny_models["qwen2vl"])
    messages = load_prompt("caption", "concise").messages(image=True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<image>" not in prompt
    # One <|image_pad|> per merged patch of the image at the processor's size: it follows the aspect ratio.
    for size in [(64, 32), (32, 64), (176, 16), (20, 20)]:
        inputs = processor(text=[prompt], images=[Image.new("RGB", size)], return_tensors="pt")
        n = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert n == image_tokens(*size) == int(inputs["image_grid_thw"][0].prod()) // 4, size
    assert image_tokens(64, 32) != image_tokens(176, 16)


def test_the_area_bound_keeps_the_aspect_ratio_and_llava_keeps_its_fingerprint(tmp_path: Path) -> None:
    big = bad_images()["9900010"]  # a 1200x900 PNG
    area = PIXELS["max_pixels"]
    img = prepare_image(big, None, 64_000_000, 1 << 24, area)
    assert img.width * img.height <= area and abs(img.width / img.height - 4 / 3) < 0.05
    assert (img.width, img.height) == (73, 55)  # floor(sqrt(4096 / 1080000) * (1200, 900))
    small = prepare_image(big, None, 64_000_000, 1 << 24, 2 * 10**6)  # never upscaled, never cropped
    assert (small.width, small.height) == (1200, 900)
    both = prepare_image(big, 32, 64_000_000, 1 << 24, area)  # the tighter bound wins: LLaVA's short side
    assert (both.width, both.height) == (43, 32)
    assert both == prepare_image(big, 32, 64_000_000, 1 << 24)

    with pytest.raises(ConfigError, match="image_pixels"):
        load_config("demo", ["caption.image_size=null"])
    # The LLaVA recipes' fingerprints name what they always named (committed shards stay valid).
    assert CaptionStage(load_config("demo").caption, 0).fingerprint()["image"] == {
        "size": 32,
        "max_pixels": 64_000_000,
        "max_bytes": 32 * 1024 * 1024,
    }
    assert CaptionStage(load_config("gpu").caption, 0).fingerprint()["image"]["size"] == 336
    qwen = CaptionStage(load_config("demo", qwen_overrides(tmp_path)).caption, 0).fingerprint()["image"]
    assert qwen["size"] is None and qwen["pixels"] == area


@pytest.mark.slow
def test_qwen2vl_captions_through_the_pipeline_as_hf_does(make_root, demo_config, tiny_models) -> None:
    """One `vecap run` (vLLM in Ray actors) of two shards with the Qwen2.5-VL as the VLM; then the
    hf backend captions the same prepared images: the same greedy text, tokens and finish reasons."""
    root = make_root("qwen2vl")
    cfg = demo_config(root, *qwen_overrides(tiny_models["qwen2vl"]), "caption.dedup=false")  # no reuse job: cheaper
    result = run(cfg, shards=SHARDS, progress=False)
    assert not result.failed

    captions = stage_output(root, "caption")
    for step in ("caption", "fuse", "write"):
        assert stage_output(root, step).done() == set(SHARDS), step
    manifest = json.loads((root / "captions" / "_run.json").read_text())
    assert manifest["fingerprint"]["model"] == str(tiny_models["qwen2vl"])
    image_fp = manifest["fingerprint"]["image"]
    assert image_fp["size"] is None and image_fp["pixels"] == PIXELS["max_pixels"]

    images = str(root / "images")
    c = cfg.caption
    prepared: dict[str, Any] = {}  # key -> the PIL image the VLM was given
    for shard in SHARDS:
        table = captions.read_table(shard)
        assert table.schema.equals(schemas.CAPTIONS)
        rows = {r["key"]: r for r in table.to_pylist()}
        samples = {s.key: s for s in ShardReader(images, shard)}
        assert set(rows) == set(samples)  # every input key exactly once
        assert stage_output(root, "fuse").read_table(shard).schema.equals(schemas.FUSED)
        vecap_rows = stage_output(root, "write").read_table(shard)
        assert vecap_rows.schema.equals(schemas.VECAP) and set(vecap_rows["key"].to_pylist()) == set(rows)
        marker = json.loads(Path(marker_path(root, "caption", shard)).read_text())
        assert marker["n_rows"] == len(rows)
        for key, r in rows.items():
            assert r["model"] == c.model and r["prompt_id"] == "concise"
            if shard == BAD_SHARD and key in BAD_STATUSES:
                assert r["status"] == BAD_STATUSES[key]
            if r["n_output_tokens"] is None:
                continue
            assert r["status"] in (vocab.OK, vocab.CAPTION_REJECTED) and r["finish_reason"] in ("stop", "length")
            img = prepare_image(samples[key].image, c.image_size, c.max_image_pixels, c.max_image_bytes, c.image_pixels)
            assert img.width * img.height <= PIXELS["max_pixels"]
            prepared[key] = (r, img.to_pil())
    assert len(prepared) >= 12  # the decodable images of both shards reached the VLM
    ok = [r for r, _ in prepared.values() if r["status"] == vocab.OK]
    assert len(ok) >= len(prepared) // 2 and all(r["vlm_caption"] for r in ok)
    # Native resolution: prompts are as long as the image's own grid makes them (LLaVA's are all equal).
    text_tokens = {r["n_prompt_tokens"] - image_tokens(*im.size) for r, im in prepared.values()}
    assert len(text_tokens) == 1, text_tokens
    assert len({r["n_prompt_tokens"] for r, _ in prepared.values()}) > 2

    # transformers on the same images, prompt and decoding: what the vLLM actors wrote.
    prompt = load_prompt("caption", c.prompt)
    messages = prompt.messages(image=True)
    requests = [Request(messages=messages, seed=r["seed"], image=im) for r, im in prepared.values()]
    texts, out = _texts("hf", tiny_models["qwen2vl"], True, requests)
    instructions = (prompt.system or "") + "\n" + prompt.template
    for (r, _), text, gen in zip(prepared.values(), texts, out, strict=True):
        assert (r["n_prompt_tokens"], r["n_output_tokens"]) == (gen.n_prompt_tokens, gen.n_output_tokens)
        assert r["finish_reason"] == gen.finish_reason
        # vLLM holds back a trailing incomplete UTF-8 byte that a full decode shows as U+FFFD; the
        # stage stores an accepted caption tidied by its checks, a rejected one as the model wrote it.
        raw = text.rstrip("\ufffd")
        verdict = check_caption(raw, gen.finish_reason, c.validation, instructions)
        assert (r["vlm_caption"] or "").rstrip("\ufffd") == (verdict.text if r["status"] == vocab.OK else raw)
