"""bench/gpu.py keeps working without a GPU: its --reduced form (tiny configs on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

STAGE_KEYS = {
    "model", "reduced", "device", "dtype", "requests", "batch_size", "engine_startup_s", "warmup_s", "seconds",
    "per_s", "unit", "prompt_tokens_mean", "output_tokens_mean", "tflop_per_request", "achieved_tflops",
    "ceiling_per_s", "fraction_of_ceiling", "nominal_tflop_per_request", "nominal_ceiling_per_s",
}


def test_gpu_bench_reduced_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--reduced", "--out", str(out), "--work", str(tmp_path / "m")],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the last line of stdout is the same JSON
    assert result["mode"] == "reduced" and result["peak_tflops"] > 0
    assert (tmp_path / "gpu.md").read_text().startswith("# vecap GPU engines")  # the harness's markdown beside it
    for stage, unit in (("caption", "images/s"), ("fuse", "fusions/s")):
        r = result[stage]
        assert STAGE_KEYS <= set(r), STAGE_KEYS - set(r)
        assert r["reduced"] is True and r["unit"] == unit and r["requests"] > 0
        assert r["per_s"] > 0 and r["tflop_per_request"] > 0 and r["ceiling_per_s"] > 0
        assert r["prompt_tokens_mean"] > 0 and r["output_tokens_mean"] > 0


def test_flop_counts_match_the_published_figures():
    """~9 TFLOP per LLaVA-1.5-7B image and ~4.4 TFLOP per 8B fusion: ceilings ~88 and ~180/s at 790 TFLOP/s."""
    sys.path.insert(0, str(REPO))
    from bench import gpu

    caption = gpu.flops_per_request(gpu.LLAVA_15_7B, prompt_tokens=576 + 40, output_tokens=30) / 1e12
    fuse = gpu.flops_per_request(gpu.LLAMA_3_8B, prompt_tokens=250, output_tokens=60) / 1e12
    assert 8.5 < caption < 9.5 and 4.2 < fuse < 4.6
    assert 80 < 790 / caption < 95 and 170 < 790 / fuse < 190
