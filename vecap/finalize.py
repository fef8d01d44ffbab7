"""Workers write their own output: per-batch part files, then one finalize task per shard.

The last step of the stream (:func:`write_parts`) writes each shard's rows of a batch
as a part file of every stage in the stream, under a name derived from the batch's
keys (a retried batch overwrites its own part), and returns one small manifest row
per shard of the batch. The driver only sums those counts; once a shard's count is
complete it submits :func:`finalize_shard`, which merges the parts into the shard's
Parquet, writes its marker last, and builds its CLIP tar when the run writes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vecap import metrics, vocab
from vecap.layout import STAGES, Layout
from vecap.outputs import StageOutput
from vecap.stages.base import Stage, is_timing
from vecap.stages.write import WriteStage
from vecap.storage import Storage

MANIFEST = pa.schema(
    [("shard", pa.string()), ("n_rows", pa.int64()), ("report", pa.string()), ("timings", pa.string())]
)


def _part_name(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20] + ".parquet"


def write_parts(batch: pa.Table, storage: Storage, layout: Layout, stages: list[Stage]) -> pa.Table:
    """Ray Data UDF (CPU, last step): write this batch's rows as part files; return manifest rows."""
    out = []
    for shard in pc.unique(batch["shard"]).to_pylist():
        sub = batch.filter(pc.equal(batch["shard"], shard))
        is_marker = pc.fill_null(sub["is_marker"], False)
        rows = sub.filter(pc.invert(is_marker))
        reports = sub.filter(is_marker)["report"].to_pylist()
        timings = {c: pc.sum(sub[c]).as_py() or 0 for c in sub.column_names if is_timing(c)}  # each step's seconds
        for stats in sub["engine_stats"].drop_null().to_pylist():
            for k, v in json.loads(stats).items():
                timings[k] = timings.get(k, 0) + v
        if rows.num_rows:
            name = _part_name(rows["key"].to_pylist())
            from_captions = vocab.FROM_CAPTIONS in pc.unique(rows["source"]).to_pylist()
            # Duplicates read from the images wait for their caption: they are fused in a second pass.
            waiting = pc.fill_null(
                pc.and_(pc.equal(rows["source"], vocab.FROM_IMAGES), pc.equal(rows["caption_source"], vocab.DUPLICATE)),
                False,
            )
            for stage in stages:
                if stage.name == vocab.CAPTION and from_captions:
                    continue  # the captions of this shard are committed already
                mine = rows if stage.name == vocab.CAPTION else rows.filter(pc.invert(waiting))
                if mine.num_rows:
                    storage.write_table(f"{layout.parts(stage.name, shard)}/{name}", stage.output_table(mine))
        out.append(
            {
                "shard": shard,
                "n_rows": rows.num_rows,
                "report": reports[0] if reports else None,
                "timings": json.dumps(timings),
            }
        )
    return pa.Table.from_pylist(out, schema=MANIFEST)


@dataclass
class ShardJob:
    """What the finalize task of one shard needs; small, built by the driver."""

    shard: str
    stages: list[Stage]  # stream stages whose parts become this shard's Parquet
    write: WriteStage | None = None  # the write stage, run once the fused rows are committed
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    retry_keys: set[str] | None = None  # --retry-failed: only these keys were recomputed
    rest_in_parts: bool = False  # a second pass: the parts of the shard's other rows are there already
    run_id: str = ""  # the run committing it: a retried task knows what its first attempt committed


def merge_parts(storage: Storage, layout: Layout, step: str, shard: str) -> pa.Table | None:
    """Every part of a shard, one row per key (a retried batch may have left a copy), sorted by key."""
    folder = layout.parts(step, shard)
    names = [n for n in storage.names(folder) if n.endswith(".parquet")]
    if not names:
        return None
    table = pa.concat_tables([storage.read_table(f"{folder}/{n}") for n in names])
    indexed = table.append_column("_i", pa.array(range(table.num_rows), pa.int64()))
    keep = indexed.group_by("key", use_threads=False).aggregate([("_i", "max")])["_i_max"]
    return table.take(keep).sort_by("key")


def finalize_shard(storage: Storage, layout: Layout, job: ShardJob) -> dict[str, dict[str, Any]]:
    """Commit one shard: each stream stage's Parquet and marker, then its CLIP tar. Idempotent."""
    done: dict[str, dict[str, Any]] = {}
    for stage in job.stages:
        out = StageOutput(layout, stage.name, storage)
        table = merge_parts(storage, layout, stage.name, job.shard)
        if table is None and (earlier := _committed_by_earlier_attempt(out, job)) is not None:
            done[stage.name] = earlier
            continue
        table = table if table is not None else stage.schema.empty_table()
        expected = int(job.report.get("n_rows", table.num_rows))
        if job.rest_in_parts:  # every row of the shard, as its committed captions count them
            expected = int(StageOutput(layout, vocab.CAPTION, storage).read_stats(job.shard)["n_rows"])
        if job.retry_keys is not None:
            committed = out.read_table(job.shard)
            keep = committed.filter(pc.invert(pc.is_in(committed["key"], value_set=table["key"])))
            table = pa.concat_tables([keep, table.select(committed.column_names).cast(committed.schema)]).sort_by("key")
            expected = committed.num_rows
        table = stage.complete(table, job.shard, storage, layout)
        if table.num_rows != expected:
            raise RuntimeError(f"shard {job.shard}: {table.num_rows} {stage.name} rows assembled, {expected} expected")
        stats = stage.stats(table)
        stats.update(
            stage=stage.name,
            shard=job.shard,
            fingerprint=stage.fingerprint(),
            read_report={k: v for k, v in job.report.items() if k != "n_rows"},
            timings={k: round(float(v), 4) for k, v in job.timings.items() if v and is_timing(k)},
            engine={k: round(float(v), 4) for k, v in job.timings.items() if v and not is_timing(k)},
            committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            run_id=job.run_id,
        )
        if job.retry_keys is not None:
            stats["retried_keys"] = len(job.retry_keys)
        out.commit(job.shard, table, stats)
        storage.remove(layout.parts(stage.name, job.shard), recursive=True)
        done[stage.name] = stats
        if job.retry_keys is not None:  # what was built from the old rows is stale now
            for later in STAGES[STAGES.index(stage.name) + 1 :]:
                if later not in {s.name for s in job.stages} and (later != vocab.WRITE or job.write is None):
                    StageOutput(layout, later, storage).invalidate(job.shard)
    if job.write is not None:
        done[vocab.WRITE] = job.write.write_shard(storage, layout, job.shard)
    metrics.record_commit(done)  # counted once the shard is committed: the counters equal the Parquet rows
    return done


def _committed_by_earlier_attempt(out: StageOutput, job: ShardJob) -> dict[str, Any] | None:
    """Ray reruns a finalize task whose node died after it committed a stage and removed its
    parts: with no parts left, a marker of this run means the stage is done; its stats, else None."""
    if not job.run_id or not out.is_done(job.shard):
        return None
    stats = out.read_stats(job.shard)
    return stats if stats.get("run_id") == job.run_id else None


def sum_timings(into: Counter, timings_json: str) -> None:
    for k, v in json.loads(timings_json).items():
        into[k] += v
