"""The stream of a run: planned shards → read → each stream stage's steps → the part writer.

One Ray Data dataset carries every streamed shard; its rows never reach the driver, which
gets one small manifest row per batch and shard (:func:`vecap.finalize.write_parts`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from vecap import vocab
from vecap.config import PipelineConfig
from vecap.finalize import write_parts
from vecap.layout import Layout
from vecap.planning import ShardPlan
from vecap.reuse import DUPLICATE, Reuse
from vecap.stages.base import READ_STEP, Stage, Step, check_steps, read_columns, work_schema
from vecap.storage import Storage


def read_planned_shards(batch, storage: Storage, layout: Layout, caption_stage: Stage | None, schema: pa.Schema):
    """Ray Data UDF: one planned shard → its work rows (of the run's work ``schema``), from the images
    or from committed captions."""
    from vecap.reuse import read_shard_reuse
    from vecap.stages.caption import CaptionStage, read_image_rows
    from vecap.stages.fuse import read_caption_rows

    columns = ("source", "shard", "keys", "reuse")
    for source, shard, keys, reused in zip(*(batch.column(c).to_pylist() for c in columns), strict=True):
        only = set(json.loads(keys)) if keys else None
        again = read_shard_reuse(storage, reused)
        if source == vocab.FROM_IMAGES:
            if not isinstance(caption_stage, CaptionStage):  # the plan reads images only for a run that captions
                raise TypeError(f"shard {shard}: images to read but no caption stage")
            yield from read_image_rows(storage, layout.images, shard, caption_stage.read_options, schema, only, again)
        elif again:  # the second pass: the shard's duplicates, whose captions are committed now
            only = {k for k, r in again.items() if r["caption_source"] == DUPLICATE}
            yield from read_caption_rows(storage, layout, shard, schema, only_keys=only)
        else:
            yield from read_caption_rows(storage, layout, shard, schema, only_keys=only)


def build_stream(
    cfg: PipelineConfig,
    stages: dict[str, Stage],
    plans: list[ShardPlan],
    storage: Storage,
    layout: Layout,
    again: Reuse,
):
    """from_items(planned shards) → read → each stream stage's steps → part writer (manifest rows)."""
    import ray.data

    items = [
        {
            "source": p.source,
            "shard": p.shard,
            "keys": json.dumps(sorted(p.retry_keys)) if p.retry_keys else "",
            "reuse": (again.file(p.shard) or "") if p.source == vocab.FROM_IMAGES or p.duplicates_only else "",
        }
        for p in plans
        if p.stream
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    in_stream = [stages[s] for s in vocab.STREAM_STAGES if any(s in p.stream for p in plans)]
    schema = work_schema(in_stream)
    ds = Step(
        READ_STEP,
        read_planned_shards,
        {"storage": storage, "layout": layout, "caption_stage": stages.get(vocab.CAPTION), "schema": schema},
        # At most max_inflight_shards shards are being read at once; Ray Data's back-pressure bounds the rest.
        inputs=("source", "shard", "keys", "reuse"),
        batch_size=1,
        concurrency=cfg.max_inflight_shards,
        memory_mb=1024,
    ).apply(ds)
    for step in work_steps(in_stream, schema, storage, layout):
        ds = step.apply(ds)
    return ds


def work_steps(in_stream: list[Stage], schema: pa.Schema, storage: Storage, layout: Layout) -> list[Step]:
    """The steps after the read: each stream stage's, then the part writer; their declared columns
    checked against what the read and the steps before them write, in the run's work ``schema``
    (:func:`vecap.stages.base.check_steps`)."""
    steps = [step for stage in in_stream for step in stage.steps()]
    reads = sorted({c for stage in in_stream for c in stage.reads} | {"caption_source", "engine_stats"})
    writer = Step(
        "write-parts",
        write_parts,
        {"storage": storage, "layout": layout, "stages": in_stream},
        inputs=tuple(reads),
        num_cpus=0.25,
        timed=False,  # it returns manifest rows, not work rows: it sums the others' timings
    )
    check_steps([*steps, writer], schema, read_columns(in_stream))
    return [*steps, writer]


def progress_bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="samples", disable=not enabled, smoothing=0.1, mininterval=1.0)


def expected_rows(storage: Storage, layout: Layout, plans: list[ShardPlan], sample: int = 64) -> int | None:
    """The progress bar's total: rows of the input Parquets (estimated from ``sample`` of them
    when there are more: thousands of reads before starting are not worth a progress bar)."""
    import pyarrow.parquet as pq

    streamed = [p for p in plans if p.stream]
    retried = sum(len(p.retry_keys) for p in streamed if p.retry_keys is not None)
    retried += sum(p.n_rows for p in streamed if p.n_rows is not None and p.retry_keys is None)
    whole = [p.shard for p in streamed if p.retry_keys is None and p.n_rows is None]
    if not whole:
        return retried

    def rows(shard: str) -> int | None:
        path = f"{layout.images}/{shard}.parquet"
        if not storage.exists(path):
            return None
        with storage.open_read(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    picked = whole[:: max(1, len(whole) // sample)][:sample]
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = [c for c in pool.map(rows, picked) if c is not None]
    if len(counts) < len(picked):
        return None
    return retried + round(sum(counts) * len(whole) / len(picked))
