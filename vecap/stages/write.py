"""Stage 3, write: CLIP-ready shards with alt-text, VLM caption and VeC caption.

Streams the input tar once, copies each usable sample's original image bytes (never
re-encoded) into ``clip/NNNNN.tar`` beside ``<key>.txt`` (the mixed choice, what
open_clip reads) and ``<key>.json`` (every caption and its provenance). Every key of
the input, usable or not, gets a row in ``vecap/NNNNN.parquet`` with its status.
It runs per shard inside the shard's finalize task, once the shard's fused rows are committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from vecap import schemas, vocab
from vecap.config import PipelineConfig
from vecap.images import ImageRejected, image_size, prepare_image, sniff_image_format
from vecap.layout import Layout
from vecap.mixing import choose_txt
from vecap.outputs import StageOutput
from vecap.reader import ShardReader
from vecap.stages.base import Stage
from vecap.storage import Storage
from vecap.validation import clean_alt_text

STAGE = "write"
_PROVENANCE = ("model", "prompt_id", "prompt_sha256", "params_sha256")


@dataclass(frozen=True)
class WriteStage(Stage):
    """The write stage of a recipe: how alt-text and VeC captions are mixed into the CLIP tars.

    Built by :meth:`from_config` from the recipe (no defaults of its own): the ``write`` section,
    and the limits and alt-text cap the caption and fuse stages used on the same samples.
    """

    mix: str
    p_vec: float
    seed: int
    image_exts: tuple[str, ...]
    max_image_bytes: int
    # Optional CLIPScore (vecap.clipscore); None: off, the clip_score_* columns stay null.
    clip_model: str | None
    clip_batch_size: int
    max_image_pixels: int  # the caption stage's decode limit, reused for CLIP's decode
    # The fusion's alt-text cap: the alt-text side is the same cleaned text the fusion saw.
    max_alt_text_words: int
    name: ClassVar[str] = STAGE
    schema: ClassVar[pa.Schema] = schemas.VECAP

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> WriteStage:
        w = cfg.write
        return cls(
            mix=w.mix,
            p_vec=w.p_vec,
            seed=cfg.seed,
            image_exts=tuple(w.image_exts),
            max_image_bytes=cfg.caption.max_image_bytes,
            clip_model=w.clip_model,
            clip_batch_size=w.clip_batch_size,
            max_image_pixels=cfg.caption.max_image_pixels,
            max_alt_text_words=cfg.fuse.max_alt_text_words,
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "mix": self.mix,
            "p_vec": self.p_vec,
            "seed": self.seed,
            "image_exts": sorted(self.image_exts),
            "max_image_bytes": self.max_image_bytes,
            "alt_text": {"clean": "vecap.validation", "max_words": self.max_alt_text_words},
            # only when set: the fingerprints of runs without CLIPScore stay what they were
            **({"clip_model": self.clip_model} if self.clip_model else {}),
        }

    def write_shard(self, storage: Storage, layout: Layout, shard: str) -> dict[str, Any]:
        return write_shard(storage, layout, shard, self)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so the same input gives the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "vecap"
    tar.addfile(info, io.BytesIO(data))


def write_shard(storage: Storage, layout: Layout, shard: str, stage: WriteStage) -> dict[str, Any]:
    """Build and commit ``clip/<shard>.tar`` and ``vecap/<shard>.parquet``, marker last; returns the stats."""
    t0, c0 = time.time(), time.process_time()
    mix, p_vec, seed, image_exts = stage.mix, stage.p_vec, stage.seed, stage.image_exts
    fused = {r["key"]: r for r in StageOutput(layout, "fuse", storage).read_table(shard).to_pylist()}
    captions = {r["key"]: r for r in StageOutput(layout, "caption", storage).read_table(shard).to_pylist()}
    rows: dict[str, dict[str, Any]] = {}
    n_samples = 0
    clip = _ClipBatch(stage) if stage.clip_model else None
    with storage.staged(layout.tar(shard)) as tmp_tar, tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in ShardReader(layout.images, shard, max_image_bytes=stage.max_image_bytes, storage=storage):
            f = fused.get(sample.key)
            if f is None or sample.key in rows:
                continue  # not in this stage's input (e.g. a dropped duplicate): nothing to write
            row = _row(shard, sample.key, f, captions.get(sample.key, {}), sample.url)
            rows[sample.key] = row
            if row["status"] != vocab.OK or sample.image is None:
                continue
            # img2dataset names every member .jpg; name ours by the real format (bytes unchanged)
            ext = sniff_image_format(sample.image) or sample.ext
            if ext not in image_exts:
                row.update(
                    status=vocab.UNSUPPORTED_FORMAT,
                    reason=vocab.UNSUPPORTED_FORMAT,
                    error=f"{ext} images are not read by CLIP loaders",
                )
                continue
            # the cleaned alt-text the fusion saw; "" when nothing usable is left (a camera file name …)
            alt = clean_alt_text(f["alt_text"], stage.max_alt_text_words)
            choice = choose_txt(mix, p_vec, seed, sample.key, alt, f["vec_caption"])
            if choice is not None and choice[1] == "vec" and not alt and f.get("vec_source") == "vlm":
                choice = (choice[0], "vlm")  # no usable alt-text: the text is the VLM caption
            if choice is None:
                row.update(
                    status=vocab.NO_TEXT, reason=vocab.NO_TEXT, error="neither alt-text nor VeC caption has text"
                )
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
            sample_json = {k: v for k, v in row.items() if k not in ("shard", "status", "reason", "error")}
            _add(tar, f"{sample.key}.json", json.dumps(sample_json, ensure_ascii=False, sort_keys=True).encode())
            n_samples += 1
            if clip is not None:
                clip.add(row, sample.image, alt)
    if clip is not None:
        clip.flush()
    # The reader yields every key of the input (failed downloads too); a fused key it did not
    # yield means the input changed since: keep the row, say the image is gone.
    for key, f in fused.items():
        if key not in rows:
            rows[key] = _row(shard, key, f, captions.get(key, {}), None)
            if rows[key]["status"] == vocab.OK:
                rows[key].update(
                    status=vocab.MISSING_FROM_TAR,
                    reason=vocab.MISSING_FROM_TAR,
                    error="image not found in the input tar",
                )
    ordered = [rows[k] for k in sorted(rows)]
    stats = {
        "stage": STAGE,
        "shard": shard,
        "n_rows": len(ordered),
        "n_samples": n_samples,
        "statuses": dict(Counter(r["status"] for r in ordered)),
        "txt_sources": dict(Counter(r["txt_source"] for r in ordered if r["txt_source"])),
        "fingerprint": stage.fingerprint(),
        "timings": {"t_write": round(time.time() - t0, 3), "cpu_write": round(time.process_time() - c0, 3)},
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    StageOutput(layout, STAGE, storage).commit(shard, schemas.table(ordered, schemas.VECAP), stats)
    return stats


class _ClipBatch:
    """Rows written to the tar, with their image decoded small, scored by CLIP a batch at a time.

    The image is decoded under the caption stage's byte and pixel limits (``prepare_image``),
    no larger than the CLIP processor's input; one that fails to decode gets null scores.
    Texts: the cleaned alt-text (what the tar's alt text is), the VLM caption, the VeC caption.
    """

    def __init__(self, stage: WriteStage) -> None:
        from vecap import clipscore

        self.stage = stage
        self.scorer = clipscore.get_scorer(stage.clip_model)  # type: ignore[arg-type]
        self.scorer.batch_size = stage.clip_batch_size
        self.pending: list[tuple[dict[str, Any], Any, str | None]] = []

    def add(self, row: dict[str, Any], data: bytes, alt: str | None) -> None:
        try:
            image = prepare_image(data, self.scorer.image_size, self.stage.max_image_pixels, self.stage.max_image_bytes)
        except ImageRejected:
            return  # the scores stay null
        self.pending.append((row, image.to_pil(), alt))
        if len(self.pending) >= self.stage.clip_batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = [r for r, _, _ in self.pending]
        texts = {
            "clip_score_alt": [a for _, _, a in self.pending],
            "clip_score_vlm": [r["vlm_caption"] for r in rows],
            "clip_score_vec": [r["vec_caption"] for r in rows],
        }
        scored = self.scorer.scores([im for _, im, _ in self.pending], texts)
        for column, values in scored.items():
            for row, value in zip(rows, values, strict=True):
                row[column] = value
        self.pending = []


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
        "reason": f.get("reason"),
        "error": f.get("error"),
    }
    for p in _PROVENANCE:
        row[f"caption_{p}"] = c.get(p)
        row[f"fuse_{p}"] = f.get(p)
    return row
