"""Stage 1, caption: a VLM describes each image from the image alone.

CPU side (Ray Data tasks): stream the input tar, decode and downscale each image
(:mod:`vecap.images`), record a status for every unusable one. Actor side: build the
chat request from the prompt and the pixels, caption, and put the text back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from vecap import schemas
from vecap.backends import EngineSpec, Generation, Request
from vecap.images import ImageRejected, prepare_image
from vecap.prompts import Prompt
from vecap.reader import ShardReader
from vecap.stages.common import EngineWorker, Provenance, seed_for, work_table

STAGE = "caption"


def read_image_rows(
    shard: str,
    images_dir: str,
    image_size: int,
    max_pixels: int,
    max_bytes: int,
    run_seed: int,
    only_keys: set[str] | None = None,
    rows_per_block: int = 32,
) -> Iterator[pa.Table]:
    """One input shard → work rows with decoded pixels (blocks of ``rows_per_block``), then its marker row.

    ``only_keys`` restricts the rows to those keys (retrying failed rows alone).
    """
    reader = ShardReader(images_dir, shard, max_image_bytes=max_bytes)
    seen: set[str] = set()
    dropped: list[str] = []
    rows: list[dict[str, Any]] = []
    for sample in reader:
        if sample.key in seen:  # one row per key: later copies are counted, not written
            dropped.append(sample.key)
            continue
        seen.add(sample.key)
        if only_keys is not None and sample.key not in only_keys:
            continue
        row: dict[str, Any] = {
            "key": sample.key,
            "shard": shard,
            "is_marker": False,
            "status": sample.status,
            "error": sample.error,
            "alt_text": sample.alt_text,
            "url": sample.url,
            "caption_seed": seed_for(run_seed, STAGE, sample.key),
            "needs_caption": False,
        }
        if sample.status == schemas.OK:
            try:
                img = prepare_image(sample.image, image_size, max_pixels, max_bytes)
                row.update(pixels=img.pixels, pixels_w=img.width, pixels_h=img.height, needs_caption=True)
            except ImageRejected as err:
                row.update(status=err.status, error=str(err))
        rows.append(row)
        if len(rows) >= rows_per_block:
            yield work_table(rows)
            rows = []
    report = {
        "n_rows": len(seen) if only_keys is None else len(seen & only_keys),
        "truncated": reader.report.truncated,
        "read_error": reader.report.error,
        "missing_txt": reader.report.missing_txt,
        "dropped_duplicate_keys": dropped,
    }
    rows.append({"shard": shard, "is_marker": True, "report": json.dumps(report)})
    yield work_table(rows)


class CaptionWorker(EngineWorker):
    """Holds the VLM; captions the rows that have pixels."""

    flag = "needs_caption"

    def __init__(self, spec: EngineSpec, prompt: Prompt) -> None:
        super().__init__(spec)
        self.messages = prompt.messages(image=True)

    def request(self, row: dict[str, Any]) -> Request:
        from PIL import Image

        image = Image.frombytes("RGB", (row["pixels_w"], row["pixels_h"]), row["pixels"])
        return Request(messages=self.messages, seed=row["caption_seed"], image=image)

    def apply(self, row: dict[str, Any], gen: Generation) -> None:
        row["pixels"] = None  # pixels are not needed downstream: do not carry them
        text = (gen.text or "").strip()
        row.update(
            vlm_caption=text if gen.error is None else None,
            caption_finish_reason=gen.finish_reason,
            caption_n_prompt_tokens=gen.n_prompt_tokens,
            caption_n_output_tokens=gen.n_output_tokens,
        )
        if gen.error is not None:
            row.update(status=schemas.MODEL_ERROR, error=gen.error)
        elif not text:
            row.update(status=schemas.MODEL_ERROR, error="empty output")


def caption_rows(rows: list[dict[str, Any]], prov: Provenance) -> list[dict[str, Any]]:
    """Work rows of one shard → rows of ``captions/NNNNN.parquet``."""
    out = []
    for r in rows:
        out.append(
            {
                "key": r["key"],
                "shard": r["shard"],
                "status": r["status"],
                "error": r["error"],
                "vlm_caption": r.get("vlm_caption"),
                "finish_reason": r.get("caption_finish_reason"),
                "n_prompt_tokens": r.get("caption_n_prompt_tokens"),
                "n_output_tokens": r.get("caption_n_output_tokens"),
                **prov.columns(),
                "seed": r["caption_seed"],
            }
        )
    return out
