"""Stage 3, write: CLIP-ready shards with alt-text, VLM caption and VeC caption.

Streams the input tar once, copies each usable sample's original image bytes (never
re-encoded) into ``vecap/NNNNN.tar`` beside ``<key>.txt`` (the mixed choice, what
open_clip reads) and ``<key>.json`` (every caption and its provenance). Every key of
the input, usable or not, gets a row in ``vecap/NNNNN.parquet`` with its status.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from typing import Any

from vecap import schemas
from vecap.fusion import light_clean
from vecap.images import image_size, sniff_image_format
from vecap.mixing import choose_txt
from vecap.reader import ShardReader
from vecap.writer import StageDir

STAGE = "write"
_PROVENANCE = ("model", "prompt_id", "prompt_sha256", "params_sha256")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so the same input gives the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "vecap"
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    root: str,
    shard: str,
    mix: str,
    p_vec: float,
    seed: int,
    image_exts: tuple[str, ...] = ("jpg", "png", "webp"),
    max_image_bytes: int = 32 << 20,
) -> dict[str, Any]:
    """Build and commit ``<root>/vecap/<shard>.{tar,parquet}`` and its stats; returns the stats."""
    t0 = time.time()
    out = StageDir(f"{root}/vecap")
    fused = {r["key"]: r for r in StageDir(f"{root}/fused").read_table(shard).to_pylist()}
    captions = {r["key"]: r for r in StageDir(f"{root}/captions").read_table(shard).to_pylist()}
    rows: dict[str, dict[str, Any]] = {}
    tmp_tar = out.temp_path(f"{shard}.tar")
    n_samples = 0
    with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in ShardReader(f"{root}/images", shard, max_image_bytes=max_image_bytes):
            f = fused.get(sample.key)
            if f is None or sample.key in rows:
                continue  # not in this stage's input (e.g. a dropped duplicate): nothing to write
            row = _row(shard, sample.key, f, captions.get(sample.key, {}), sample.url)
            rows[sample.key] = row
            if row["status"] != schemas.OK or sample.image is None:
                continue
            # img2dataset names every member .jpg; name ours by the real format (bytes unchanged)
            ext = sniff_image_format(sample.image) or sample.ext
            if ext not in image_exts:
                row.update(status=schemas.UNSUPPORTED_FORMAT, error=f"{ext} images are not read by CLIP loaders")
                continue
            alt = light_clean(f["alt_text"])
            choice = choose_txt(mix, p_vec, seed, sample.key, alt, f["vec_caption"])
            if choice is None:
                row.update(status=schemas.NO_TEXT, error="neither alt-text nor VeC caption has text")
                continue
            row["txt"], row["txt_source"] = choice
            row["image_ext"] = ext
            row["sha256"] = hashlib.sha256(sample.image).hexdigest()
            row["width"], row["height"] = image_size(sample.image)
            _add(tar, f"{sample.key}.{ext}", sample.image)
            _add(tar, f"{sample.key}.txt", row["txt"].encode())
            if mix == "both":
                _add(tar, f"{sample.key}.alt.txt", (alt or row["txt"]).encode())
                _add(tar, f"{sample.key}.vec.txt", (f["vec_caption"] or row["txt"]).encode())
            sample_json = {k: v for k, v in row.items() if k not in ("shard", "status", "error")}
            _add(tar, f"{sample.key}.json", json.dumps(sample_json, ensure_ascii=False, sort_keys=True).encode())
            n_samples += 1
    # The reader yields every key of the input (failed downloads too); a fused key it did not
    # yield means the input changed since: keep the row, say the image is gone.
    for key, f in fused.items():
        if key not in rows:
            rows[key] = _row(shard, key, f, captions.get(key, {}), None)
            if rows[key]["status"] == schemas.OK:
                rows[key].update(status=schemas.MISSING_FROM_TAR, error="image not found in the input tar")
    ordered = [rows[k] for k in sorted(rows)]
    statuses: dict[str, int] = {}
    txt_sources: dict[str, int] = {}
    for r in ordered:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        if r["txt_source"]:
            txt_sources[r["txt_source"]] = txt_sources.get(r["txt_source"], 0) + 1
    stats = {
        "stage": STAGE,
        "shard": shard,
        "n_rows": len(ordered),
        "n_samples": n_samples,
        "statuses": statuses,
        "txt_sources": txt_sources,
        "fingerprint": {"mix": mix, "p_vec": p_vec, "seed": seed, "image_exts": sorted(image_exts)},
        "seconds": round(time.time() - t0, 3),
    }
    out.commit(
        shard,
        stats,
        parquet=schemas.table(ordered, schemas.VECAP),
        schema=schemas.VECAP,
        extra_files={f"{shard}.tar": tmp_tar},
    )
    return stats


def _row(shard: str, key: str, f: dict, c: dict, url: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": key,
        "shard": shard,
        "url": url,
        "alt_text": f.get("alt_text"),
        "vlm_caption": f.get("vlm_caption"),
        "vec_caption": f.get("vec_caption"),
        "vec_source": f.get("vec_source"),
        "txt": None,
        "txt_source": None,
        "image_ext": None,
        "width": None,
        "height": None,
        "sha256": None,
        "status": f.get("status"),
        "error": f.get("error"),
    }
    for p in _PROVENANCE:
        row[f"caption_{p}"] = c.get(p)
        row[f"fuse_{p}"] = f.get(p)
    return row


def write_sizes(root: str) -> dict[str, int]:
    """``vecap/sizes.json``: shard file name → sample count, as open_clip reads it."""
    out = StageDir(f"{root}/vecap")
    sizes = {f"{s}.tar": int(out.read_stats(s)["n_samples"]) for s in sorted(out.done())}
    out.write_json("sizes.json", sizes)
    return sizes
