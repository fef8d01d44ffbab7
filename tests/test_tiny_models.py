"""The tiny random models: deterministic offline builds that vLLM and transformers both run alike.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per model class,
and greedy output is compared token for token with transformers' ``generate`` in float32.
"""

from __future__ import annotations

import gc
import hashlib
import tempfile
from pathlib import Path

import pytest

from vecap.tiny_models import MARKER, build_tiny_models

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 16
# What works for both tiny models on the CPU (float32 so vLLM matches transformers exactly:
# with dtype="auto" vLLM downcasts a float32 checkpoint to bfloat16 on CPUs that have it).
VLLM_KWARGS = dict(max_model_len=512, enforce_eager=True, dtype="float32", seed=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """Offline, in-process vLLM with its caches, sockets and temp files in the test's folder."""
    root = tmp_path_factory.mktemp("vllm_env")
    (root / "tmp").mkdir()
    values = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HOME": str(root / "hf"),
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TMPDIR": str(root / "tmp"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        # tempfile caches its folder on first use (pytest already used it).
        mp.setattr(tempfile, "tempdir", str(root / "tmp"))
        yield root


@pytest.fixture(scope="module")
def models(env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _until_eos(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to (not including) the first EOS: vLLM and transformers end sequences differently."""
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def _shutdown(llm) -> None:
    """Free an in-process engine before the next one starts."""
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def test_build_is_deterministic_and_idempotent(models: dict[str, Path], tmp_path: Path) -> None:
    assert set(models) == {"llava", "llama"}
    assert models["llava"].name == "tiny-llava" and models["llama"].name == "tiny-llama"

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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama", "tiny-llava"]


def test_llava_checkpoint_has_llava_hf_layout(models: dict[str, Path]) -> None:
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    with safe_open(str(models["llava"] / "model.safetensors"), "pt") as f:
        prefixes = {".".join(k.split(".")[:2]) for k in f.keys()}
    assert prefixes == {
        "vision_tower.vision_model", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
        "language_model.model", "language_model.lm_head",
    }
    _, info = LlavaForConditionalGeneration.from_pretrained(models["llava"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_chat_template(models: dict[str, Path]) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(models["llava"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>USER: <image>\nDescribe the image. ASSISTANT:"

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    conversation = [
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


class TestLlama:
    @pytest.fixture(scope="class")
    def llm(self, models: dict[str, Path]):
        from vllm import LLM

        llm = LLM(model=str(models["llama"]), **VLLM_KWARGS)
        yield llm
        _shutdown(llm)

    def test_vllm_matches_transformers(self, llm, models: dict[str, Path]) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM
        from vllm import SamplingParams

        tokenizer = AutoTokenizer.from_pretrained(models["llama"])
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            for text in ["Describe the image.", "Rewrite the caption: a red car parked on a city street near a river."]
        ]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS))

        model = LlamaForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            generated = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = generated[:, batch.input_ids.shape[1]:].tolist()

        eos = tokenizer.eos_token_id
        for out, prompt, hf_ids in zip(outputs, prompts, new_tokens):
            assert out.prompt_token_ids == tokenizer(prompt).input_ids
            vllm_ids = _until_eos(out.outputs[0].token_ids, eos)
            assert vllm_ids, "nothing generated"
            assert vllm_ids == _until_eos(hf_ids, eos)
            # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (random
            # byte-level tokens end in one now and then); a full decode shows it as U+FFFD.
            expected = tokenizer.decode(vllm_ids, skip_special_tokens=True).rstrip("\ufffd")
            assert out.outputs[0].text.rstrip("\ufffd") == expected


class TestLlava:
    @pytest.fixture(scope="class")
    def llm(self, models: dict[str, Path]):
        from vllm import LLM

        llm = LLM(model=str(models["llava"]), limit_mm_per_prompt={"image": 1}, **VLLM_KWARGS)
        yield llm
        _shutdown(llm)

    def test_vllm_matches_transformers(self, llm, models: dict[str, Path]) -> None:
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        from vllm import SamplingParams

        processor = AutoProcessor.from_pretrained(models["llava"])
        rng = np.random.default_rng(0)
        sizes = [(40, 48), (32, 32), (64, 50), (100, 30)]  # (height, width): resized and cropped
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        # Different lengths, so that the transformers batch is really left-padded.
        texts = ["Describe the image.", "Describe the image.", "Write a short caption for this photo.", "Caption?"]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True, tokenize=False,
            )
            for text in texts
        ]
        outputs = llm.generate(
            [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)],
            SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS),
        )

        model = LlavaForConditionalGeneration.from_pretrained(models["llava"], dtype=torch.float32).eval()
        batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        image_token = model.config.image_token_index
        assert (batch.input_ids == image_token).sum(1).tolist() == [model.config.image_seq_length] * len(prompts)
        with torch.inference_mode():
            generated = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = generated[:, batch.input_ids.shape[1]:].tolist()

        eos = processor.tokenizer.eos_token_id
        for out, hf_ids in zip(outputs, new_tokens):
            assert out.prompt_token_ids.count(image_token) == model.config.image_seq_length
            vllm_ids = _until_eos(out.outputs[0].token_ids, eos)
            assert vllm_ids, "nothing generated"
            assert vllm_ids == _until_eos(hf_ids, eos)
