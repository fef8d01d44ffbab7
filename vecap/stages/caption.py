"""Stage 1, caption: a VLM describes each image from the image alone.

CPU side (Ray tasks): stream the input tar, decode and downscale each image
(:mod:`vecap.images`), record a status for every unusable one. Actor side: build the
chat request from the prompt and the pixels, caption, and put the text back.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from vecap import reuse, schemas, vocab
from vecap.backends import EngineSpec, Generation, Request
from vecap.config import CaptionChecks, CaptionConfig, stable_hash
from vecap.faults import FaultPolicy
from vecap.images import ImageRejected, prepare_image, sniff_image_format
from vecap.prompting import Prompt, load_prompt
from vecap.reader import ShardReader
from vecap.stages.base import (
    EngineWorker,
    Provenance,
    Stage,
    Step,
    engine_spec,
    params_hash,
    seed_for,
    select_output,
    with_json_fields,
    work_table,
)
from vecap.storage import Storage
from vecap.validation import check_caption
from vecap.validation import fingerprint as checks_fingerprint

STAGE = vocab.CAPTION

# The work columns of the caption stage (beyond vecap.stages.base.ROW): what the read of an image
# shard writes, then the VLM's answer and its check.
COLUMNS = pa.schema(
    [
        ("alt_text", pa.string()),
        ("url", pa.string()),
        ("pixels", pa.binary()),
        ("pixels_w", pa.int32()),
        ("pixels_h", pa.int32()),
        ("needs_caption", pa.bool_()),
        ("sha256", pa.string()),
        ("caption_source", pa.string()),  # computed | duplicate | cache (vecap.reuse)
        ("caption_from", pa.string()),
        ("caption_from_shard", pa.string()),
        ("vlm_caption", pa.string()),
        ("caption_finish_reason", pa.string()),
        ("caption_n_prompt_tokens", pa.int32()),
        ("caption_n_output_tokens", pa.int32()),
        ("caption_seed", pa.int64()),
        ("caption_quality", pa.string()),  # JSON: vecap.validation's quality columns of the VLM caption
    ]
)


@dataclass(frozen=True)
class ImageReadOptions:
    """How the CPU workers turn untrusted input images into pixels for the VLM (from the recipe's
    ``caption`` section: no defaults of its own)."""

    image_size: int | None
    max_pixels: int
    max_bytes: int
    run_seed: int
    # Formats the CLIP tar takes (the recipe's write.image_exts); others are settled here, before any GPU
    # time, as unsupported_format. None: every decodable format.
    image_exts: tuple[str, ...] | None = None
    image_pixels: int | None = None  # the VLM's input area bound (caption.image_pixels)


def read_image_rows(
    storage: Storage,
    images_dir: str,
    shard: str,
    opts: ImageReadOptions,
    schema: pa.Schema,
    only_keys: set[str] | None = None,
    reused: dict[str, dict[str, Any]] | None = None,
    rows_per_block: int = 32,
) -> Iterator[pa.Table]:
    """One input shard → work rows (of the run's work ``schema``) with decoded pixels (blocks of
    ``rows_per_block``), then its marker row.

    ``only_keys`` restricts the rows to those keys (retrying failed rows alone). Keys in
    ``reused`` (:mod:`vecap.reuse`) are not decoded and skip the VLM: cached captions are
    filled in here, duplicates when the shard commits.
    """
    reader = ShardReader(images_dir, shard, max_image_bytes=opts.max_bytes, storage=storage)
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
            "source": vocab.FROM_IMAGES,
            "is_marker": False,
            "status": sample.status,
            "error": sample.error,
            "alt_text": sample.alt_text,
            "url": sample.url,
            "caption_seed": seed_for(opts.run_seed, STAGE, sample.key),
            "needs_caption": False,
            "sha256": sample.sha256,
            "caption_source": reuse.COMPUTED,
        }
        again = (reused or {}).get(sample.key)
        if sample.status == vocab.OK and not _tar_format(sample.image, opts):
            fmt = sniff_image_format(sample.image or b"")  # never captioned: the CLIP tar would not take it
            row.update(status=vocab.UNSUPPORTED_FORMAT, error=f"{fmt} images are not read by CLIP loaders")
        elif sample.status == vocab.OK and again is not None:
            row.update(reused_row(again))
        elif sample.status == vocab.OK:
            try:
                img = prepare_image(sample.image, opts.image_size, opts.max_pixels, opts.max_bytes, opts.image_pixels)
                row.update(pixels=img.pixels, pixels_w=img.width, pixels_h=img.height, needs_caption=True)
            except ImageRejected as err:
                row.update(status=err.status, error=str(err))
        rows.append(row)
        if len(rows) >= rows_per_block:
            yield work_table(rows, schema)
            rows = []
    report = {
        "n_rows": len(seen) if only_keys is None else len(seen & only_keys),
        "truncated": reader.report.truncated,
        "read_error": reader.report.error,
        "missing_txt": reader.report.missing_txt,
        "parquet_error": reader.report.parquet_error,
        "io_retries": reader.report.io_retries,
        "dropped_duplicate_keys": dropped,
    }
    rows.append({"shard": shard, "is_marker": True, "report": json.dumps(report)})
    yield work_table(rows, schema)


def _tar_format(data: bytes | None, opts: ImageReadOptions) -> bool:
    """Whether the image's format (from its bytes) is one the CLIP tar takes; unknown formats are left to
    the decoder."""
    if opts.image_exts is None or not data:
        return True
    fmt = sniff_image_format(data)
    return fmt is None or fmt in opts.image_exts


def reused_row(again: dict[str, Any]) -> dict[str, Any]:
    """The work-row fields of a key whose caption is reused (a cache entry's caption, or a duplicate's source)."""
    row = {f: again[f] for f in ("caption_source", "caption_from", "caption_from_shard")}
    if again["caption_source"] == reuse.CACHE:
        entry = json.loads(again["entry"])
        row.update(
            status=entry["status"],
            **reuse.entry_reason(entry),
            vlm_caption=entry["vlm_caption"],
            caption_finish_reason=entry["finish_reason"],
            caption_seed=entry["seed"],
            caption_n_prompt_tokens=0,
            caption_n_output_tokens=0,
            caption_quality=json.dumps({n: entry.get(n) for n, _ in schemas.QUALITY_CAPTION}),
        )
    return row


class CaptionWorker(EngineWorker):
    """Holds the VLM; captions the rows that have pixels."""

    flag = "needs_caption"
    stage = STAGE

    def __init__(
        self,
        spec: EngineSpec,
        prompt: Prompt,
        faults: FaultPolicy | None = None,
        batches_in_flight: int = 1,
        step_name: str | None = None,
    ) -> None:
        super().__init__(spec, faults, batches_in_flight, step_name)
        self.messages = prompt.messages(image=True)

    def request(self, row: dict[str, Any]) -> Request:
        from PIL import Image

        image = Image.frombytes("RGB", (row["pixels_w"], row["pixels_h"]), row["pixels"])
        return Request(messages=self.messages, seed=row["caption_seed"], image=image, key=row["key"])

    def apply(self, row: dict[str, Any], gen: Generation) -> None:
        row["pixels"] = None  # pixels are not needed downstream: do not carry them
        row.update(
            vlm_caption=gen.text if gen.error is None else None,
            caption_finish_reason=gen.finish_reason,
            caption_n_prompt_tokens=gen.n_prompt_tokens,
            caption_n_output_tokens=gen.n_output_tokens,
        )
        if gen.error is not None:
            row.update(status=gen.reason or vocab.MODEL_ERROR, error=gen.error)


def check_captions(batch: pa.Table, checks: CaptionChecks, instructions: str) -> pa.Table:
    """Ray Data UDF (CPU): tidy and validate the VLM's captions (:mod:`vecap.validation`).

    A rejected caption keeps its text for inspection, but its status says it is not used:
    the fusion then falls back to the alt-text.
    """
    rows = batch.to_pylist()
    for r in rows:
        if r["is_marker"] or r["status"] != vocab.OK or r.get("caption_finish_reason") is None:
            continue
        if r.get("caption_source") not in (None, reuse.COMPUTED):
            continue  # checked when it was computed, with the same checks (they are in the fingerprint)
        verdict = check_caption(r.get("vlm_caption"), r["caption_finish_reason"], checks, instructions)
        r["caption_quality"] = json.dumps(verdict.quality)
        if verdict.reason is None:
            r["vlm_caption"] = verdict.text
        else:
            r.update(
                status=vocab.CAPTION_REJECTED,
                reason=verdict.reason,
                error=(verdict.detail or None) and verdict.detail[:500],
            )
    return work_table(rows, batch.schema)


class CaptionStage(Stage):
    """The caption stage of a recipe: reads images, runs the VLM actors, writes ``captions/``."""

    name: ClassVar[str] = STAGE
    schema: ClassVar[pa.Schema] = schemas.CAPTIONS
    columns: ClassVar[pa.Schema] = COLUMNS
    # an image shard's read writes every caption column (a cached caption's too: vecap.reuse)
    read_columns: ClassVar[tuple[str, ...]] = ("status", "reason", "error", *COLUMNS.names)
    reads: ClassVar[tuple[str, ...]] = (
        "status",
        "reason",
        "error",
        "vlm_caption",
        "caption_finish_reason",
        "caption_n_prompt_tokens",
        "caption_n_output_tokens",
        "caption_seed",
        "caption_quality",
        "sha256",
        "caption_source",
        "caption_from",
        "caption_from_shard",
    )

    def __init__(
        self,
        cfg: CaptionConfig,
        run_seed: int,
        faults: FaultPolicy | None = None,
        cache_storage_options: dict | None = None,
        image_exts: tuple[str, ...] | None = None,
    ) -> None:
        self.cfg = cfg
        self.faults = faults or FaultPolicy.of(cfg)
        self.spec = engine_spec(cfg, multimodal=True)
        self.prompt = load_prompt(STAGE, cfg.prompt)
        self.read_options = ImageReadOptions(
            cfg.image_size, cfg.max_image_pixels, cfg.max_image_bytes, run_seed, image_exts, cfg.image_pixels
        )
        self.provenance = Provenance(self.spec.model, self.prompt.id, self.prompt.sha256, params_hash(self.spec))
        self.cache = (
            reuse.CaptionCache(cfg.cache, self.fingerprint(), cfg.cache_storage_options or cache_storage_options or {})
            if cfg.cache
            else None
        )

    def fingerprint(self) -> dict[str, Any]:
        # Everything that changes the rows must match: the model provenance, the pixels the VLM
        # sees, the validation thresholds, and the per-sample seeds when decoding samples.
        o = self.read_options
        return {
            **self.provenance.columns(),
            # the recipe's thresholds, and the checks and text libraries (with versions) that apply them
            "checks_sha256": stable_hash(
                {**self.cfg.validation.model_dump(mode="json"), "validator": checks_fingerprint()}
            ),
            "image": {
                "size": o.image_size,
                "max_pixels": o.max_pixels,
                "max_bytes": o.max_bytes,
                **({"formats": sorted(o.image_exts)} if o.image_exts is not None else {}),
                **({"pixels": o.image_pixels} if o.image_pixels is not None else {}),
            },
            "seed": o.run_seed if self.cfg.temperature > 0 else None,
        }

    def steps(self) -> list[Step]:
        c = self.cfg
        return [
            Step(
                "caption",
                CaptionWorker,
                {"spec": self.spec, "prompt": self.prompt, "faults": self.faults},
                inputs=("needs_caption", "pixels", "pixels_w", "pixels_h", "caption_seed"),
                outputs=(
                    "pixels",
                    "vlm_caption",
                    "caption_finish_reason",
                    "caption_n_prompt_tokens",
                    "caption_n_output_tokens",
                    "status",
                    "error",
                    "engine_stats",
                ),
                actors=c.actors,
                batch_size=c.batch_size,
                num_cpus=c.cpus_per_actor,
                num_gpus=c.gpus_per_actor,
                batches_in_flight=c.max_batches_in_flight,
                env=dict(c.env),
                max_restarts=self.faults.max_restarts,
                max_task_retries=self.faults.max_task_retries,
            ),
            Step(
                "caption-check",
                check_captions,
                {"checks": c.validation, "instructions": (self.prompt.system or "") + "\n" + self.prompt.template},
                inputs=("status", "vlm_caption", "caption_finish_reason", "caption_source"),
                outputs=("vlm_caption", "status", "reason", "error", "caption_quality"),
                num_cpus=0.25,
            ),
        ]

    def output_table(self, work: pa.Table) -> pa.Table:
        work = with_json_fields(work, "caption_quality", schemas.QUALITY_CAPTION)
        statuses, checks = work["status"].to_pylist(), work["reason"].to_pylist()
        reasons = [vocab.caption_reason(s, c) for s, c in zip(statuses, checks, strict=True)]
        work = work.append_column("caption_reason", pa.array(reasons, pa.string()))
        return select_output(
            work,
            self.schema,
            {
                "key": "key",
                "shard": "shard",
                "status": "status",
                "reason": "caption_reason",
                "error": "error",
                "vlm_caption": "vlm_caption",
                "finish_reason": "caption_finish_reason",
                "n_prompt_tokens": "caption_n_prompt_tokens",
                "n_output_tokens": "caption_n_output_tokens",
                "seed": "caption_seed",
                **{name: name for name, _ in schemas.QUALITY_CAPTION},
                **{name: name for name in ("sha256", "caption_source", "caption_from", "caption_from_shard")},
            },
            self.provenance.columns(),
        )

    def stats(self, table: pa.Table) -> dict[str, Any]:
        out = super().stats(table)
        out["caption_sources"] = {k: v for k, v in Counter(table["caption_source"].to_pylist()).items() if k}
        return out

    def complete(self, table: pa.Table, shard: str, storage: Storage, layout: Any) -> pa.Table:
        """Fill the duplicates' captions from their first copies; add the computed ones to the cache."""
        from vecap.outputs import StageOutput

        table = reuse.fill_duplicates(table, shard, StageOutput(layout, STAGE, storage).read_table)
        if self.cache is not None:
            self.cache.add(table, shard)
        return table
