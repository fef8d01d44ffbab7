"""Caption each image once, measured: a corpus with duplicate images, with and without dedup, and a cached rerun.

``python -m bench.reuse [--images 40] [--shard-size 10] [--duplicates 0.3] [--reps 2]`` builds a
corpus with ``vecap sample-data --duplicates`` (a real img2dataset download from loopback), then
runs the whole pipeline (``vecap.pipeline.run``: caption → fuse → write, the demo recipe with the
bench-scale random models and realistic output lengths) on fresh copies of it:

- ``dedup``: the default (identical images captioned once);
- ``no dedup``: ``caption.dedup=false``, what every pipeline without it does (every copy captioned);
- ``cached``: a second run over the same corpus with the caption cache the first run filled.

The two first sides alternate in each repetition. Engine calls and seconds inside engine steps are the
engine actors' own counters (``<stage>_requests``, ``<stage>_busy_s`` in the shards' markers); wall
time is ``run``'s, Ray started beforehand. On a small corpus the fixed costs of dedup (the resolution
job, the second pass's fuse actor start-up) outweigh the captions saved; the saving grows with the corpus.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from bench.context import WORK, set_env

SYNTHETIC = ["caption.synthetic_lengths=[8, 40]", "fuse.synthetic_lengths=[20, 80]"]


def _engine(root: Path, stage: str) -> tuple[int, float]:
    """The stage's engine requests and seconds inside engine steps, from its markers' engine counters."""
    from vecap.layout import Layout
    from vecap.outputs import StageOutput

    markers = StageOutput(Layout(str(root)), stage).markers().values()
    counted = [m.get("engine", {}) for m in markers]
    return int(sum(e.get(f"{stage}_requests", 0) for e in counted)), sum(e.get(f"{stage}_busy_s", 0.0) for e in counted)


def _run(images: Path, root: Path, base: list[str], *overrides: str) -> dict[str, float]:
    from vecap.config import load_config
    from vecap.pipeline import run

    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(images, root / "images")
    cfg = load_config("demo", [f"root={root}", *base, *overrides])
    t0 = time.perf_counter()
    run(cfg, progress=False)
    wall = time.perf_counter() - t0
    (caption_calls, caption_busy), (fuse_calls, fuse_busy) = _engine(root, "caption"), _engine(root, "fuse")
    return {
        "wall_s": wall,
        "caption_calls": caption_calls,
        "fuse_calls": fuse_calls,
        "caption_step_s": caption_busy,
        "fuse_step_s": fuse_busy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reuse", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--duplicates", type=float, default=0.3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--scale", default="bench", help="random model scale (vecap.demo.tiny_models)")
    args = parser.parse_args(argv)
    set_env()
    from vecap.demo.sample_data import make_sample_data
    from vecap.demo.tiny_models import build_tiny_models
    from vecap.ray_env import start_local_ray

    models = build_tiny_models(WORK / "models", scale=args.scale)
    images = make_sample_data(
        WORK / "data" / f"reuse-{args.images}-{args.shard_size}-{args.duplicates}",
        n_images=args.images,
        shard_size=args.shard_size,
        duplicates=args.duplicates,
    )
    base = [f"caption.model={models['llava']}", f"fuse.model={models['llama']}", *SYNTHETIC]
    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False)
    out = WORK / "reuse"
    sides = {"dedup": (), "no dedup": ("caption.dedup=false",)}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    _run(images, out / "warmup", base, "caption.dedup=false")  # Ray workers and engine imports warm for both sides
    for rep in range(args.reps):
        for name in list(sides) if rep % 2 == 0 else list(sides)[::-1]:
            results[name].append(_run(images, out / name.replace(" ", "-"), base, *sides[name]))
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    _run(images, out / "fill-cache", base, f"caption.cache={cache}")
    results["cached"] = [_run(images, out / "cached", base, f"caption.cache={cache}")]

    print(
        f"corpus: {args.images} images, {args.duplicates:.0%} duplicates, shards of {args.shard_size}; "
        f"models: {args.scale}; {args.reps} repetition(s), medians"
    )
    print(
        f"{'side':<10} {'wall s':>8} {'caption calls':>14} "
        f"{'fuse calls':>11} {'caption step s':>15} {'fuse step s':>12}"
    )
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    for name, m in med.items():
        print(
            f"{name:<10} {m['wall_s']:>8.1f} {m['caption_calls']:>14.0f} {m['fuse_calls']:>11.0f} "
            f"{m['caption_step_s']:>15.1f} {m['fuse_step_s']:>12.1f}"
        )
    d, n = med["dedup"], med["no dedup"]
    print(
        f"dedup vs no dedup: caption calls x{d['caption_calls'] / n['caption_calls']:.2f}, "
        f"wall x{d['wall_s'] / n['wall_s']:.2f}"
    )
    print(
        f"cached rerun vs no dedup: caption calls {med['cached']['caption_calls']:.0f}, "
        f"wall x{med['cached']['wall_s'] / n['wall_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
