"""vecap plan: FLOP counts against the published figures, the caption:fuse split, nodes, cost, the CLI."""

from __future__ import annotations

import json

import pytest

from vecap import plan
from vecap.config import load_config


def within(x: float, ref: float, tol: float = 0.15) -> bool:
    return abs(x - ref) <= tol * ref


def test_flops_match_the_published_figures():
    """~9 TFLOP per 336 px LLaVA-1.5-7B image (576 image tokens + prompt, 2·params·tokens) and ~4.4 TFLOP
    per fusion of 250 input + 60 output tokens on an 8B model, within ±15 %."""
    assert plan.image_tokens(plan.LLAVA_15_7B) == 576
    caption = (
        plan.flops_per_request(plan.LLAVA_15_7B, 576 + plan.CAPTION_TEXT_TOKENS, plan.CAPTION_OUTPUT_TOKENS) / 1e12
    )
    fuse = plan.flops_per_request(plan.LLAMA_3_8B, 250, 60) / 1e12
    assert within(caption, 9.0) and within(fuse, 4.4), (caption, fuse)
    # the decoder's matmul parameters: ~6.5B for Vicuna-7B, ~7.0B for Llama-3-8B (embeddings and LM head apart)
    assert within(plan.matmul_params(plan.LLAVA_15_7B) / 1e9, 6.5, 0.05)
    assert within(plan.matmul_params(plan.LLAMA_3_8B) / 1e9, 7.0, 0.05)


def test_a_native_resolution_vlm_is_planned_at_the_recipes_image_bound(tiny_models):
    """Qwen2.5-VL (``qwen2vl-gpu``): image tokens follow the recipe's area bound (448x448 px: 256 tokens of
    28 px), not LLaVA's fixed 576; its FLOPs per image and the caption:fuse split follow."""
    qwen, llava = load_config("qwen2vl-gpu"), load_config("gpu")
    assert qwen.caption.model == "Qwen/Qwen2.5-VL-7B-Instruct" and qwen.caption.image_size is None
    bound = qwen.caption.engine["mm_processor_kwargs"]["size"]["longest_edge"]
    assert qwen.caption.image_pixels == bound == 448 * 448  # the CPU's bound is the processor's
    q = plan.make_plan(qwen, 10_000_000, "h100", cpu_s_per_sample=0.02)
    ll = plan.make_plan(llava, 10_000_000, "h100", cpu_s_per_sample=0.02)
    assert (q.caption.image_tokens, ll.caption.image_tokens) == (256, 576) and ll.fuse.image_tokens is None
    assert "256 image tokens per image" in q.caption.source and "576 image tokens" in ll.caption.source
    assert q.fuse.tflop_per_request == ll.fuse.tflop_per_request  # the same fusion LLM
    assert q.caption.tflop_per_request is not None and ll.caption.tflop_per_request is not None
    assert within(q.caption.tflop_per_request, 5.7, 0.05) and q.caption.tflop_per_request < ll.caption.tflop_per_request
    assert q.caption_share < ll.caption_share
    assert (q.caption_gpus, q.fuse_gpus) == (qwen.caption.actors, qwen.fuse.actors) == (4, 4)  # the recipe's split
    # the vision tower: ~0.63B matmul parameters over 1,024 patches, ~1.35 TFLOP per image; more pixels, more tokens
    assert within(plan.native_vision_flops(plan.QWEN25_VL_7B, 256) / 1e12, 1.35, 0.05)
    assert plan.image_tokens(plan.QWEN25_VL_7B, image_size=336) == 144
    assert plan.image_tokens(plan.QWEN25_VL_7B) == 1280  # unbounded: the processor's default max_pixels
    assert plan.image_tokens(plan.LLAVA_15_7B, image_size=672, image_pixels=10**6) == 576  # LLaVA crops its square
    # A local checkpoint's config.json (transformers' nested layout), as for the tiny model: the same formulas.
    tiny = plan.model_config(str(tiny_models["qwen2vl"]))
    assert plan.native_resolution(tiny) and plan.image_tokens(tiny, image_pixels=64 * 64) == 16
    assert plan.flops_per_request(tiny, 16 + 40, 30, 16) > plan.flops_per_request(tiny, 4 + 40, 30, 4)


def test_gpu_table_is_dense_bf16():
    assert plan.GPUS["h100"].bf16_tflops == plan.GPUS["h200"].bf16_tflops == 989.0
    assert plan.GPUS["a100"].bf16_tflops == 312.0 and plan.GPUS["l40s"].bf16_tflops == 362.0
    assert "dense BF16" in plan.GPU_SOURCE


def test_best_split_balances_the_stages():
    # caption 10/s per GPU, fuse 30/s: a GPU-second ratio of 3:1 → 6 caption + 2 fuse of 8
    assert plan.best_split(8, 10.0, 30.0, 1.0) == (6, 2, 60.0)
    assert plan.best_split(8, 10.0, 20.0, 1.0) == (5, 3, 50.0)
    assert plan.best_split(8, 10.0, 20.0, 0.5) == (6, 2, 60.0)  # half the images reach the LLM: fewer fuse engines
    with pytest.raises(ValueError):
        plan.best_split(1, 10.0, 30.0, 1.0)


def test_plan_from_the_ceiling_says_it_is_assumed():
    cfg = load_config("gpu")
    p = plan.make_plan(cfg, 300_000_000, "h100", deadline_days=7, price_per_gpu_hour=2.5, cpu_s_per_sample=0.02)
    assert p.caption_gpus + p.fuse_gpus == p.nodes * 8 and p.caption_gpus > p.fuse_gpus
    assert p.images_per_s * 7 * 86400 >= 300_000_000
    assert p.run_hours <= 7 * 24 and p.gpu_hours_billed >= p.gpu_hours_work
    assert p.cost == pytest.approx(p.gpu_hours_billed * 2.5)
    assert p.cores_per_gpu == pytest.approx(0.02 * p.images_per_s / (p.nodes * 8))
    # one node fewer could not have made it
    if p.nodes > 1:
        assert plan.best_split((p.nodes - 1) * 8, p.caption.per_s, p.fuse.per_s, 1.0)[2] * 7 * 86400 < 300_000_000
    text = plan.render(p, "gpu")
    assert "ASSUMED utilisation" in text and "vendor datasheets" in text and "--set caption.actors=" in text


def test_plan_from_a_gpu_benchmark(tmp_path, capsys, caplog):
    doc = {
        "mode": "full",
        "peak_tflops": 989.0,
        "caption": {"model": "LLaVA-1.5-7B", "device": "NVIDIA H200", "per_s": 40.0, "stage_per_s": 38.0},
        "fuse": {"model": "Llama-3-8B", "device": "NVIDIA H200", "per_s": 100.0, "stage_per_s": 96.0},
    }
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(doc))
    cfg = load_config("gpu")
    same = plan.make_plan(cfg, 10_000_000, "h200", measured=str(path), cpu_s_per_sample=0.01)
    assert same.caption.per_s == 38.0 and same.fuse.per_s == 96.0 and "measured" in same.caption.source
    a100 = plan.make_plan(cfg, 10_000_000, "a100", measured=str(path), cpu_s_per_sample=0.01)
    assert a100.caption.per_s == pytest.approx(38.0 * 312 / 989) and "scaled" in a100.caption.source
    # the README's `vecap plan ... --measured bench/results/gpu.json`, from the CLI
    from vecap.cli import main

    capsys.readouterr()
    argv = ["plan", "-c", "gpu", "--images", "10000000", "--gpu", "h200", "--measured", str(path)]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["caption"]["per_s"] == 38.0 and out["fuse"]["per_s"] == 96.0
    assert main(argv) == 0 and f"measured: {path}" in capsys.readouterr().out
    for mode in ("reduced", "cpu-tiny"):  # bench.gpu --reduced, bench.gpu_hf --cpu-tiny
        path.write_text(json.dumps(doc | {"mode": mode}))
        with pytest.raises(ValueError, match=mode):
            plan.make_plan(cfg, 10_000_000, "h200", measured=str(path))
    with caplog.at_level("ERROR"):
        assert main(argv) == 2  # a reduced (CPU) result is refused with the reason, no traceback
    assert "not a GPU measurement" in caplog.text


def test_cpu_cost_per_step():
    per = plan.cpu_per_sample({"cpu_read": 2.0, "cpu_fuse_check": 1.0, "t_write": 1.0, "t_read": 9.0}, 100)
    assert per["cpu_read"] == 0.02 and per["cpu_fuse_check"] == 0.01 and per["t_write"] == 0.01
    assert "t_read" not in per  # wall seconds of a CPU step are not its CPU


def test_cli_plan(capsys):
    from vecap.cli import main

    assert (
        main(["plan", "-c", "gpu", "--images", "300000000", "--gpu", "h100", "--deadline-days", "7", "--price", "2.5"])
        == 0
    )
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "Nodes for the deadline" in out and "Cost:" in out
    assert main(["plan", "-c", "gpu", "--images", "1000", "--gpu", "h100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nodes"] == 1 and doc["caption_gpus"] + doc["fuse_gpus"] == 8


def test_cpu_cost_from_a_dry_run_root(tmp_path):
    """The CPU cost per sample read from a dry run's markers (the fuse stage's carry the stream's timings)."""
    import pyarrow as pa

    from vecap.layout import DRY_RUN_DIR, Layout
    from vecap.outputs import StageOutput

    root = tmp_path / "root"
    layout = Layout(f"{root}/{DRY_RUN_DIR}", input_root=str(root))
    empty = pa.table({"key": pa.array([], pa.string())})
    for shard, rows in (("00000", 100), ("00001", 300)):
        StageOutput(layout, "fuse").commit(
            shard,
            empty,
            {
                "n_rows": rows,
                "timings": {"cpu_read": 0.004 * rows, "t_read": 1.0, "cpu_fuse_check": 0.001 * rows},
                "engine": {"fuse_steps": 3},
            },
        )
        StageOutput(layout, "write").commit(shard, empty, {"n_rows": rows, "timings": {"t_write": 0.002 * rows}})
    steps, samples = plan.cpu_cost_from_dry_run(str(root))
    assert samples == 400
    assert steps["cpu_read"] == pytest.approx(0.004) and steps["cpu_fuse_check"] == pytest.approx(0.001)
    assert steps["t_write"] == pytest.approx(0.002) and steps["cpu_caption_check"] == 0
    p = plan.make_plan(load_config("gpu"), 1_000_000, "a100", dry_run_root=str(root))
    assert p.cpu_s_per_sample == pytest.approx(0.007) and "dry run under" in p.cpu_source
    with pytest.raises(FileNotFoundError):
        plan.cpu_cost_from_dry_run(str(tmp_path / "nothing"))
