"""The tiny random models: deterministic offline builds in the llava-hf layout.

That vLLM and transformers run them alike (greedy, float32) is checked through vecap's
own backends in test_backends.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from vecap.demo.tiny_models import MARKER, build_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic_and_idempotent(models: dict[str, Path], tmp_path: Path) -> None:
    assert set(models) == {"llava", "llama", "qwen2vl"}
    assert [models[k].name for k in ("llava", "llama", "qwen2vl")] == ["tiny-llava", "tiny-llama", "tiny-qwen2vl"]

    again = build_tiny_models(tmp_path)
    for kind in models:
        assert _hashes(again[kind]) == _hashes(models[kind]), f"{kind} differs between two builds"

    # A complete folder is reused as is ...
    stamp = (again["llama"] / "model.safetensors").stat().st_mtime_ns
    build_tiny_models(tmp_path)
    assert (again["llama"] / "model.safetensors").stat().st_mtime_ns == stamp
    # ... one without its marker (an interrupted build) is rebuilt, and no temp folder is left.
    (again["llama"] / MARKER).unlink()
    build_tiny_models(tmp_path)
    assert (again["llama"] / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama", "tiny-llava", "tiny-qwen2vl"]


def test_llava_checkpoint_has_llava_hf_layout(models: dict[str, Path]) -> None:
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    with safe_open(str(models["llava"] / "model.safetensors"), "pt") as f:
        prefixes = {".".join(k.split(".")[:2]) for k in f.keys()}
    assert prefixes == {
        "vision_tower.vision_model",
        "multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2",
        "language_model.model",
        "language_model.lm_head",
    }
    # (a tuple with output_loading_info; transformers types the return as the model alone)
    loaded: Any = LlavaForConditionalGeneration.from_pretrained(models["llava"], output_loading_info=True)
    _, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_chat_template(models: dict[str, Path]) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(models["llava"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>USER: <image>\nDescribe the image. ASSISTANT:"

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    conversation: Any = [  # (transformers types message contents as strings only)
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "A caption?"}]},
    ]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == "<s>Be brief.\nUSER: Hi ASSISTANT: Hello.</s>USER: A caption? ASSISTANT:"
    # One BOS, from the template, whether or not the tokenizer is asked to add special tokens.
    for add_special_tokens in (True, False):
        ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.padding_side == "left"
