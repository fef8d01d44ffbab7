"""The three backends on the same tiny models: vLLM and transformers check each other (greedy),
and the OpenAI client runs against a real vLLM OpenAI-compatible server on loopback."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import bad_images
from helpers import free_port

from vecap.backends import EngineSpec, Request, Sampling, load_engine
from vecap.images import prepare_image
from vecap.prompting import load_prompt

pytestmark = pytest.mark.slow
VLLM_ENGINE = {"max_model_len": 2048, "enforce_eager": True}


def _images():
    from PIL import Image

    imgs = [
        prepare_image(data, 32, 10**8, 1 << 24).to_pil()
        for key, data in sorted(bad_images().items())
        if key >= "9900004"
    ]
    imgs.append(Image.new("RGB", (50, 40), (0, 90, 200)))
    return imgs


def _caption_requests():
    messages = load_prompt("caption", "concise").messages(image=True)
    return [Request(messages=messages, seed=i, image=im) for i, im in enumerate(_images())]


def _fuse_requests():
    prompt = load_prompt("fuse", "vecap")
    pairs = [
        ("Nike Air Max 90 in Paris", "white shoes on a street"),
        ("Kyoto temple, 2019", "a red wooden gate"),
        ("Le Creuset pot", "an orange pot on a stove"),
    ]
    return [Request(messages=prompt.messages(alt_text=a, vlm_caption=v), seed=i) for i, (a, v) in enumerate(pairs)]


def _texts(backend: str, model, multimodal: bool, requests, **extra):
    spec = EngineSpec(
        backend=backend,
        model=str(model),
        multimodal=multimodal,
        dtype="float32",
        sampling=Sampling(max_new_tokens=12),
        **extra,
    )
    engine = load_engine(spec)
    try:
        out = engine.generate(requests)
    finally:
        engine.close()
        del engine
        gc.collect()
    assert all(g.error is None for g in out), [g.error for g in out]
    return [g.text for g in out], out


@pytest.mark.parametrize("kind", ["llava", "llama"])
def test_hf_and_vllm_give_the_same_greedy_outputs(tiny_models, kind):
    multimodal = kind == "llava"
    requests = _caption_requests() if multimodal else _fuse_requests()
    vllm_texts, vllm_out = _texts("vllm", tiny_models[kind], multimodal, requests, engine_kwargs=VLLM_ENGINE)
    hf_texts, hf_out = _texts("hf", tiny_models[kind], multimodal, requests)
    # vLLM holds back a trailing incomplete UTF-8 byte that a full decode shows as U+FFFD
    assert [t.rstrip("\ufffd") for t in vllm_texts] == [t.rstrip("\ufffd") for t in hf_texts]
    assert [g.n_prompt_tokens for g in vllm_out] == [g.n_prompt_tokens for g in hf_out]
    assert [g.n_output_tokens for g in vllm_out] == [g.n_output_tokens for g in hf_out]
    assert len(vllm_texts) == len(requests) and all(t for t in vllm_texts)


def test_a_failing_request_is_one_error_not_a_lost_batch(tiny_models):
    requests = _fuse_requests()
    too_long = Request(messages=[{"role": "user", "content": "word " * 3000}], seed=9)
    spec = EngineSpec(
        backend="vllm",
        model=str(tiny_models["llama"]),
        dtype="float32",
        sampling=Sampling(max_new_tokens=8),
        engine_kwargs=VLLM_ENGINE,
    )
    engine = load_engine(spec)
    try:
        out = engine.generate([requests[0], too_long, requests[1]])
    finally:
        engine.close()
        gc.collect()
    assert [g.error is None for g in out] == [True, False, True]
    assert out[1].text is None and "Error" in out[1].error


def test_missing_backend_gives_an_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    with pytest.raises(ImportError, match="pip install openai"):
        load_engine(EngineSpec(backend="openai", model="m", base_url="http://127.0.0.1:1/v1"))
    with pytest.raises(ValueError, match="unknown backend"):
        load_engine(EngineSpec(backend="nope", model="m"))


def test_openai_backend_against_a_real_vllm_server(tiny_models, tmp_path):
    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_models["llava"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--served-model-name",
        "tiny-llava",
    ]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        requests = _caption_requests()
        texts, out = _texts("openai", "", True, requests, base_url=f"http://127.0.0.1:{port}/v1", request_concurrency=4)
        assert len(texts) == len(requests) and all(t for t in texts)
        assert all(g.finish_reason in ("stop", "length") and g.n_output_tokens > 0 for g in out)
        # the same model, prompt and images through the offline engine: the same greedy captions
        offline, _ = _texts("vllm", tiny_models["llava"], True, requests, engine_kwargs=VLLM_ENGINE)
        assert [t.rstrip("\ufffd") for t in texts] == [t.rstrip("\ufffd") for t in offline]
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        log.close()
