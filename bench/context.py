"""What every section shares: sizes of a full or quick run, models, data, configs, scratch roots.

Models, data and scratch roots live under ``.cache/bench/`` and are reused between runs
(models and data are deterministic); results go to ``bench/results/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Harness

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".cache" / "bench"
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Sizes:
    reps: int  # repetitions of each comparison (fewer if a section runs out of its budget)
    n_images: int  # generated sample images: the data set of the engine, I/O and memory sections
    shard_size: int
    caption_shards: int
    fuse_shards: int
    batch_size: int
    backend_caption_requests: int
    backend_fuse_requests: int
    io_shards: int
    memory_shards: int  # N = the samples of this many shards; 4N = four times as many shards
    memory_command: str  # the `vecap` subcommand of the memory runs: run (all stages) or caption
    driver_samples: int  # samples of each data-path run (the issue asks for 10,000)
    driver_shard_sizes: tuple[int, ...]  # the data-path runs' shard sizes (same samples in each)
    driver_reps: int
    # Seconds per section, in the order they run; a section starts another repetition only if it
    # should end before the sum of the budgets so far (time a section leaves unused passes on).
    budget_s: dict[str, float] = field(default_factory=dict)
    io_image_size: int = 336  # LLaVA-1.5's input: what a real run decodes to
    # Engine sections: the engines' max_num_seqs (below the requests, so that an engine can be
    # full and its busy fraction means something), and both prefix-caching modes of the fuse
    # engine or the default (on) only.
    max_num_seqs: int = 16
    fuse_prefix_modes: tuple[str, ...] = ("on", "off")
    # Peers section: repetitions of each job's two sides (vecap, a user's Ray Data LLM script), each a
    # fresh process of its own (Ray and the engine start in each); the shards are caption_shards/fuse_shards.
    peers_reps: int = 3


# Realistic output lengths with random weights (Sampling.synthetic_lengths): EOS ignored, each
# request stops after a length drawn from its seed, the same draw in the stage and the bare engine.
CAPTION_LENGTHS = (8, 40)  # VLM captions
FUSE_LENGTHS = (20, 80)  # fused captions


FULL = Sizes(
    reps=3,
    n_images=320,
    shard_size=32,
    caption_shards=3,
    fuse_shards=2,
    batch_size=16,
    backend_caption_requests=16,
    backend_fuse_requests=8,
    io_shards=10,
    memory_shards=2,
    memory_command="run",
    driver_samples=10_000,
    driver_shard_sizes=(100, 10_000),
    driver_reps=1,
    budget_s={
        "setup": 45,
        "io": 20,
        "driver": 900,
        "memory": 110,
        "caption": 200,
        "fuse": 360,
        "backends": 150,
        "peers": 720,
    },
)
QUICK = Sizes(
    reps=1,
    n_images=64,
    shard_size=8,
    caption_shards=8,
    fuse_shards=6,
    batch_size=4,
    backend_caption_requests=8,
    backend_fuse_requests=8,
    io_shards=8,
    memory_shards=1,
    memory_command="caption",
    driver_samples=500,
    driver_shard_sizes=(100, 500),
    driver_reps=1,
    budget_s={
        "setup": 40,
        "io": 10,
        "driver": 200,
        "memory": 50,
        "caption": 90,
        "fuse": 150,
        "backends": 60,
        "peers": 540,
    },
    max_num_seqs=8,
    fuse_prefix_modes=("on",),
    peers_reps=2,
)
SECTIONS = ("io", "driver", "memory", "caption", "fuse", "backends", "peers")


def offline_env() -> dict[str, str]:
    """The offline CPU environment of vLLM (``vecap.demo.cpu_env``), caches inside the workspace."""
    from vecap.demo.cpu_env import offline_cpu_env

    return offline_cpu_env(REPO / ".cache")


def set_env() -> None:
    for key, value in offline_env().items():
        os.environ.setdefault(key, value)


@dataclass
class Ctx:
    """One benchmark run's shared state; sections add their engines for the later ones to reuse."""

    sizes: Sizes
    harness: Harness
    images: Path  # the generated sample's images/
    shards: list[str]
    models: dict[str, Path]  # bench scale (the engine sections)
    tiny: dict[str, Path]  # tiny scale (the memory runs)
    overrides: list[str]
    engines: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, list] = field(default_factory=dict)

    def cfg(self, root: Path, *extra: str) -> Any:
        """The demo recipe on ``root`` with the bench models and sizes."""
        from vecap.config import load_config

        return load_config("demo", [f"root={root}", *self.overrides, *extra])

    def fresh_root(self, name: str) -> Path:
        """An empty dataset root whose images/ is the sample's (a symlink)."""
        root = WORK / "runs" / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / "images").symlink_to(self.images.resolve(), target_is_directory=True)
        return root


def prepare(sizes: Sizes, harness: Harness, need_models: bool = True) -> Ctx:
    """Build (or reuse) models and the sample; the demo recipe's overrides for the bench models."""
    from bench.data import sample_images
    from vecap.demo.tiny_models import build_tiny_models, model_dirs
    from vecap.reader import list_shards

    if need_models:
        models = build_tiny_models(WORK / "models", scale="bench")
        tiny = build_tiny_models(WORK / "models", scale="tiny")
    else:
        models, tiny = model_dirs(WORK / "models", "bench"), model_dirs(WORK / "models", "tiny")
    images = sample_images(WORK / "data" / f"n{sizes.n_images}-s{sizes.shard_size}", sizes.n_images, sizes.shard_size)
    overrides = [
        f"caption.model={models['llava']}",
        f"fuse.model={models['llama']}",
        f"caption.batch_size={sizes.batch_size}",
        f"fuse.batch_size={sizes.batch_size}",
    ]
    if need_models:
        vision = json.loads((models["llava"] / "config.json").read_text())["vision_config"]
        overrides.append(f"caption.image_size={vision['image_size']}")  # the bench LLaVA's input size
    return Ctx(
        sizes=sizes,
        harness=harness,
        images=images,
        shards=list_shards(str(images)),
        models=models,
        tiny=tiny,
        overrides=overrides,
    )


def read_markers(layout: Any, step: str) -> dict[str, dict[str, Any]]:
    """shard → the stage's done marker (its stats, with ``timings`` and ``engine``), via the library's layout."""
    from vecap.outputs import StageOutput

    return StageOutput(layout, step).markers()


def summed_timings(markers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The markers' ``timings`` (wall ``t_*`` and process-CPU ``cpu_*`` seconds per step) and
    ``engine`` counters (``<stage>_requests``, ``<stage>_engine_starts``, ``<stage>_engine_start_s``,
    ``<stage>_steps``, ``<stage>_underfull_steps``, ``<stage>_seq_steps``, ``<stage>_busy_s``), each
    summed over shards (the counters are attributed to the shard of the batch that reported
    them, so their sums over a run are exact). The two never share a name."""
    from vecap.stats import ShardStats

    total = ShardStats.total(markers.values())
    return {k: float(v) for part in (total.timings, total.engine) for k, v in part.items()}


def busy_fraction(steps: float | None, underfull_steps: float | None) -> float | None:
    """Share of engine steps that ran as many sequences as the engine can (``max_num_seqs``):
    1 − underfull / steps. On a GPU a decode step costs about the same for 1 or 256 sequences,
    so this is the share of the engine's time that did full work."""
    if not steps:
        return None
    return 1.0 - (underfull_steps or 0.0) / steps
