"""Bench inputs: the generated img2dataset sample, and larger sets repacked from it.

Generating images through the real img2dataset costs ~0.3 s per image on 2 cores (a
10,000-sample set would take most of an hour), so the data-path section builds its
sets by *repacking* the generated sample: the same tar members (image bytes, alt-text,
json) and Parquet rows under new keys, in shards of any size. The result is what
img2dataset writes (``NNNNN.tar`` + ``NNNNN.parquet``), with each source image repeated
``n_samples / len(sample)`` times; decoding cost per sample is the sample's.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

DONE = "_bench_repacked.json"  # written last: a folder without it is rebuilt


def sample_images(folder: Path, n_images: int, shard_size: int) -> Path:
    """The generated sample set (``vecap.demo.sample_data``), built once and reused; returns its images/."""
    from vecap.demo.sample_data import make_sample_data

    return make_sample_data(folder, n_images=n_images, shard_size=shard_size)


@dataclass
class _Source:
    """One key of the source set: its Parquet row and its tar members (extension → bytes)."""

    row: dict
    members: dict[str, bytes]


def _read_sources(images: Path) -> list[_Source]:
    sources: list[_Source] = []
    for parquet in sorted(images.glob("*.parquet")):
        rows = {r["key"]: r for r in pq.read_table(parquet).to_pylist()}
        members: dict[str, dict[str, bytes]] = {}
        tar_path = parquet.with_suffix(".tar")
        if tar_path.exists():
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    f = tar.extractfile(m) if m.isfile() and "." in m.name else None
                    if f is not None:
                        key, ext = m.name.split(".", 1)
                        members.setdefault(key, {})[ext] = f.read()
        sources += [_Source(row, members.get(key, {})) for key, row in sorted(rows.items())]
    return sources


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def repack(source: Path, out: Path, n_samples: int, shard_size: int, failed_only: bool = False) -> Path:
    """``out``/images/ with ``n_samples`` samples in shards of ``shard_size``, cycled from ``source``; reused when
    built.

    ``failed_only``: only the source's failed downloads (a Parquet row, no image), which the
    data path settles without decoding: rows at the highest rate a small machine can stream.
    """
    images = out / "images"
    spec = {
        "source": str(source.resolve()),
        "n_samples": n_samples,
        "shard_size": shard_size,
        "failed_only": failed_only,
    }
    done = images / DONE
    if done.exists() and json.loads(done.read_text()) == spec:
        return images
    t0 = time.perf_counter()
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    sources = _read_sources(source)
    if failed_only:
        sources = [s for s in sources if s.row.get("status") != "success" and not s.members]
    if not sources:
        raise RuntimeError(f"no {'failed ' if failed_only else ''}samples in {source}")
    for s in range(math.ceil(n_samples / shard_size)):
        shard = f"{s:05d}"
        rows = []
        with tarfile.open(images / f"{shard}.tar", "w") as tar:
            for i in range(s * shard_size, min(n_samples, (s + 1) * shard_size)):
                src = sources[i % len(sources)]
                key = f"{s:05d}{i - s * shard_size:05d}"
                rows.append(src.row | {"key": key})
                for ext, data in src.members.items():
                    if ext == "json":
                        meta = json.loads(data)
                        data = json.dumps(meta | {"key": key}).encode() if isinstance(meta, dict) else data
                    _add(tar, f"{key}.{ext}", data)
        schema = pq.read_schema(next(source.glob("*.parquet")))
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), images / f"{shard}.parquet")
    done.write_text(json.dumps(spec))
    log.info(
        "repacked %d samples into shards of %d at %s (%.1fs)", n_samples, shard_size, images, time.perf_counter() - t0
    )
    return images
