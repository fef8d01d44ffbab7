"""bench/gpu_hf.py, the GPU check the lent device machine can run (transformers, no Ray, no vLLM),
keeps working without a GPU: its --cpu-tiny form, and an import chain free of ray and vllm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

STAGE_KEYS = {
    "model",
    "device",
    "dtype",
    "batch_size",
    "batches",
    "per_s",
    "unit",
    "prompt_tokens_mean",
    "output_tokens_mean",
    "tflop_per_request",
    "achieved_tflops",
    "peak_tflops",
    "ceiling_per_s",
    "fraction_of_ceiling",
    "matmul_tflops",
    "fraction_of_matmul",
}


def test_import_chain_has_no_ray_or_vllm():
    code = (
        "import bench.gpu_hf, sys; print(any(m.split('.')[0] in ('ray', 'vllm') for m in sys.modules)); "
        "print(any(m.split('.')[0] == 'pydantic' for m in sys.modules))"  # nor pydantic: the device lacks it too
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]


def test_cpu_tiny_reports_both_rates_against_the_ceiling(tmp_path):
    out = tmp_path / "gpu_hf.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_hf", "--cpu-tiny", "--seconds", "8", "--batch-size", "4", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-tiny" and doc["device"] == "cpu" and doc["ray_or_vllm_loaded"] == []
    assert doc["images_per_s"] > 0 and doc["fusions_per_s"] > 0
    for stage, unit, n_out in (("caption", "images/s", 30), ("fuse", "fusions/s", 60)):
        r = doc[stage]
        assert STAGE_KEYS <= r.keys(), STAGE_KEYS - r.keys()
        assert r["unit"] == unit and r["per_s"] > 0 and r["output_tokens_mean"] == n_out  # EOS ignored
        assert r["tflop_per_request"] > 0 and r["ceiling_per_s"] > 0
        assert 0 < r["fraction_of_ceiling"] == pytest.approx(r["per_s"] / r["ceiling_per_s"], rel=1e-3)
    assert 230 <= doc["fuse"]["prompt_tokens_mean"] <= 270  # ~250-token fusion prompts
    assert doc["caption"]["prompt_tokens_mean"] > (32 // 8) ** 2  # the image's tokens and the prompt's
    table = proc.stdout
    assert "| model |" in table and "images/s" in table and "fusions/s" in table and "of ceiling" in table
