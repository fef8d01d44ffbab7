"""Shared fixtures: offline env, tiny models, img2dataset sample shards (+ a shard of bad images), one local Ray.

Everything is real and small: the models are built on the fly with random weights,
the shards come from the real img2dataset against a loopback server, and the engine
is the real vLLM (CPU build) inside real Ray actors.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
_WORK = REPO / ".cache" / "test"
(_WORK / "tmp").mkdir(parents=True, exist_ok=True)
from vecap.demo.cpu_env import offline_cpu_env  # noqa: E402

for _key, _value in offline_cpu_env(_WORK).items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from vecap.demo.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


def bad_images() -> dict[str, bytes]:
    """Every kind of bad or awkward image bytes the caption stage must survive, by key."""
    from PIL import Image

    def save(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    good_jpeg = save(Image.new("RGB", (64, 48), (10, 200, 10)), "JPEG")
    rotated = Image.new("RGB", (60, 30), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90

    # A PNG whose header claims 100k x 100k pixels: a decompression bomb (tiny file).
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )
    frames = [Image.new("P", (20, 20), i) for i in (1, 50, 100)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    import numpy as np

    sixteen = Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    return {
        "9900000": b"",  # zero bytes
        "9900001": good_jpeg[: len(good_jpeg) // 2],  # truncated
        "9900002": b"<html>403 hotlinking denied</html>",  # not an image
        "9900003": bomb,  # decompression bomb
        "9900004": gif.getvalue(),  # animated
        "9900005": save(sixteen, "PNG"),  # 16-bit grey
        "9900006": save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
        "9900007": save(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), "PNG"),
        "9900008": save(Image.new("P", (40, 40), 7), "PNG"),
        "9900009": save(rotated, "JPEG", exif=exif),
        "9900010": save(Image.new("RGB", (1200, 900), (1, 2, 3)), "PNG"),  # big: downscaled on CPU
    }


BAD_SHARD = "00099"
BAD_STATUSES = {
    "9900000": "image_empty",
    "9900001": "image_undecodable",
    "9900002": "image_undecodable",
    "9900003": "image_too_large",
}


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """A small img2dataset sample (real download from loopback) plus one shard of bad images."""
    from helpers import sample_members, write_img2dataset_parquet, write_tar

    from vecap.demo.sample_data import make_sample_data

    root = tmp_path_factory.mktemp("sample")
    images = make_sample_data(root, n_images=20, shard_size=8)
    members, rows = [], []
    for key, data in bad_images().items():
        members += sample_members(key, data, alt=f"Bad image {key} from Kyoto")
        rows.append({"key": key, "caption": f"Bad image {key} from Kyoto"})
    write_tar(images / f"{BAD_SHARD}.tar", members)
    write_img2dataset_parquet(images / f"{BAD_SHARD}.parquet", rows)
    return images


@pytest.fixture
def make_root(sample_images, tmp_path):
    """A fresh dataset root whose images/ is a copy of the sample shards."""

    def make(name: str = "root") -> Path:
        root = tmp_path / name
        shutil.copytree(sample_images, root / "images")
        return root

    return make


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, private temp dir, no dashboard."""
    import ray

    from vecap.ray_env import start_local_ray

    start_local_ray(
        num_cpus=8,
        object_store_memory=400 * 1024 * 1024,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def demo_config(tiny_models, ray_local):
    """The demo recipe pointed at a root and the session's tiny models."""
    from vecap.config import load_config

    def make(root: Path, *overrides: str):
        return load_config(
            "demo",
            [f"root={root}", f"caption.model={tiny_models['llava']}", f"fuse.model={tiny_models['llama']}", *overrides],
        )

    return make


@pytest.fixture(scope="session")
def pipeline_root(sample_images, tiny_models, ray_local, tmp_path_factory) -> Path:
    """One whole `vecap run` of the demo recipe on a copy of the sample shards, shared read-only
    by the tests that read a run's outputs (README snippets, report, inspect)."""
    from vecap.config import load_config
    from vecap.pipeline import run

    root = tmp_path_factory.mktemp("pipeline") / "root"
    shutil.copytree(sample_images, root / "images")
    cfg = load_config(
        "demo", [f"root={root}", f"caption.model={tiny_models['llava']}", f"fuse.model={tiny_models['llama']}"]
    )
    run(cfg, progress=False)
    return root
