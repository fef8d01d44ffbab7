"""bench.profile: one profiled call of a bare engine splits its time into model phases and stack categories."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

from vecap.backends import EngineSpec, Request, Sampling, load_engine
from vecap.prompting import load_prompt

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO))


def _requests():
    prompt = load_prompt("fuse", "vecap")
    pairs = [("Nike Air Max 90 in Paris", "white shoes on a street"), ("Kyoto temple, 2019", "a red wooden gate")]
    return [Request(messages=prompt.messages(alt_text=a, vlm_caption=v), seed=i) for i, (a, v) in enumerate(pairs)]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_profile_call_splits_prefill_and_decode(tiny_models, backend):
    from bench.profile import CATEGORIES, breakdown_rows, profile_call

    kwargs = {"engine_kwargs": {"max_model_len": 2048, "enforce_eager": True}} if backend == "vllm" else {}
    engine = load_engine(
        EngineSpec(
            backend=backend,
            model=str(tiny_models["llama"]),
            dtype="float32",
            sampling=Sampling(max_new_tokens=8),
            **kwargs,
        )
    )
    try:
        p = profile_call(engine, _requests(), interval_s=0.001)
    finally:
        engine.close()
    assert p["wall_s"] > 0 and p["requests"] == 2 and p["output_tokens"] > 0
    assert p["phase_calls"]["prefill"] >= 1 and p["phase_calls"]["decode"] >= 1, p["phase_calls"]
    if backend == "hf":  # every prompt token (and the padding) goes through the prefill forward
        assert p["phase_tokens"]["prefill"] >= p["prompt_tokens"]
    else:  # prefix caching: the shared instructions are computed once for both requests
        assert 0 < p["phase_tokens"]["prefill"] < p["prompt_tokens"]
    assert 0 < p["model_forward_s"] <= p["wall_s"] and p["phases_s"]["vision"] == 0
    assert set(p["categories_s"]) <= {name for name, _ in CATEGORIES} | {"other"}
    head, rows = breakdown_rows({backend: p})
    assert head == ["where the time goes (s)", backend] and rows[0][0] == "wall (one call)"
