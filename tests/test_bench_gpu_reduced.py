"""bench/gpu.py keeps working without a GPU: its --reduced form (tiny configs on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

STAGE_KEYS = {
    "model",
    "reduced",
    "device",
    "dtype",
    "requests",
    "batch_size",
    "engine_startup_s",
    "warmup_s",
    "seconds",
    "per_s",
    "unit",
    "prompt_tokens_mean",
    "output_tokens_mean",
    "tflop_per_request",
    "achieved_tflops",
    "ceiling_per_s",
    "fraction_of_ceiling",
    "nominal_tflop_per_request",
    "nominal_ceiling_per_s",
    "stage_per_s",
    "batches_per_s",
    "stage_vs_single",
    "busy_fraction_stage",
    "busy_fraction_single",
    "peak_tflops",
}


def test_gpu_bench_reduced_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--reduced", "--out", str(out), "--work", str(tmp_path / "m")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the last line of stdout is the same JSON
    assert result["mode"] == "reduced" and result["peak_tflops"] > 0
    assert (tmp_path / "gpu.md").read_text().startswith("# vecap GPU engines")  # the harness's markdown beside it
    assert {"caption: stage / single-call engine", "fuse: busy fraction, stage − single call"} <= {
        r["name"] for r in result["rows"]
    }
    for stage, unit in (("caption", "images/s"), ("fuse", "fusions/s")):
        r = result[stage]
        assert STAGE_KEYS <= set(r), STAGE_KEYS - set(r)
        assert r["reduced"] is True and r["unit"] == unit and r["requests"] > 0
        assert r["per_s"] > 0 and r["tflop_per_request"] > 0 and r["ceiling_per_s"] > 0
        assert r["prompt_tokens_mean"] > 0 and r["output_tokens_mean"] > 0
        assert r["stage_per_s"] > 0 and r["batches_per_s"] > 0
        lo, hi = r["output_lengths"]  # synthetic lengths: every side drew the same lengths in [lo, hi]
        assert lo <= r["output_tokens_mean"] <= hi
        assert 0 <= r["busy_fraction_stage"] <= 1 and 0 <= r["busy_fraction_single"] <= 1


def test_gpu_script_counts_flops_with_the_planner():
    """bench.gpu's full configurations give the planner's FLOPs (one formula: vecap.plan)."""
    sys.path.insert(0, str(REPO))
    from bench import gpu
    from vecap import plan

    for full, compact, prompt, output in (
        (gpu.LLAVA_15_7B, plan.LLAVA_15_7B, 616, 30),
        (gpu.LLAMA_3_8B, plan.LLAMA_3_8B, 250, 60),
    ):
        assert plan.flops_per_request(full, prompt, output) == plan.flops_per_request(compact, prompt, output)


def test_gpu_script_peers_arguments(tmp_path):
    """`python -m bench.gpu --peers` (full configs, the gpu recipe) and its --reduced form (the demo recipe):
    each side's overrides load as a valid recipe with the bench's output lengths and one engine."""
    sys.path.insert(0, str(REPO))
    from bench import gpu
    from vecap.config import load_config

    for argv, recipe in ((["--peers"], "gpu"), (["--peers", "--reduced"], "demo")):
        args = gpu._parser().parse_args(argv)
        got, overrides = gpu.peers_overrides(args, {"caption": tmp_path / "c", "fuse": tmp_path / "f"})
        assert got == recipe and args.out is None
        for stage in ("caption", "fuse"):
            cfg = load_config(recipe, [*overrides[stage], f"root={tmp_path}"])
            assert getattr(cfg, stage).synthetic_lengths is not None and getattr(cfg, stage).actors == 1
