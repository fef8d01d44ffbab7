"""``vecap inspect``: what a shard, a stage folder or a whole root holds, at a glance.

Counts come from the same readers as the report (:mod:`vecap.report.data`): done shards
are the markers in ``<stage>/_done/``, statuses and fallbacks are summed from them, and a
root is summarised from its :class:`~vecap.report.data.ReportData`. Paths may be local
or URIs (``s3://bucket/run1/fused``).
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from vecap import vocab
from vecap.layout import CLIP_DIR, DONE_DIR, IMAGES_DIR, LEGACY_STATS_SUFFIX, SIZES_FILE, STAGE_DIRS, STAGES, Layout
from vecap.outputs import check_layout
from vecap.report.data import (
    QualityColumn,
    ReportData,
    count_values,
    done_shards,
    load_report_data,
    quality_columns,
    read_markers,
    read_stage_quality,
    sum_markers,
)
from vecap.storage import Storage

log = logging.getLogger(__name__)

_COUNTED = ("status", "vec_source", "txt_source")
_SHOWN = ("key", "status", "reason", "alt_text", "vlm_caption", "vec_caption", "txt", "error")
_STEP_OF_DIR = {folder: step for step, folder in STAGE_DIRS.items()}
_MAX_VALUES = 10  # values listed per categorical q_* column (the most frequent)


def inspect_path(path: str | Path, n_rows: int = 5, storage_options: dict[str, Any] | None = None) -> str:
    """Summarise a ``.parquet``, a ``.tar``, a marker ``.json``, a stage folder or a dataset root
    (``storage_options``: fsspec's, for an object store's endpoint and credentials)."""
    target = str(path).rstrip("/") or "/"
    storage = Storage.for_path(target, storage_options)
    if not storage.exists(target):
        raise FileNotFoundError(f"no such file or folder: {target}")
    if target.endswith(".parquet"):
        return _parquet_summary(storage, target, n_rows)
    if target.endswith(".tar"):
        return _tar_summary(storage, target)
    if target.endswith(".json"):
        return json.dumps(storage.read_json(target), indent=2, sort_keys=True)
    if not storage.fs.isdir(target):
        raise ValueError(f"don't know how to inspect {target} (expected .parquet, .tar, .json or a folder)")
    parent, name = _split(target)
    if name == DONE_DIR:  # <stage>/_done: the stage it marks
        target = parent
        parent, name = _split(parent)
    if name in _STEP_OF_DIR:
        return _stage_summary(storage, Layout(parent), _STEP_OF_DIR[name], n_rows)
    if name == CLIP_DIR:
        return _clip_summary(storage, Layout(parent))
    if name == IMAGES_DIR:
        return _images_summary(storage, target)
    names = set(storage.names(target))
    if IMAGES_DIR in names or names & set(STAGE_DIRS.values()):
        return root_summary(load_report_data(target, n_samples=0, thumbnails=False, storage=storage))
    counts = Counter(n.rsplit(".", 1)[-1] for n in names if "." in n)
    return f"{target}: not a stage folder or dataset root; files by extension: " + _kv(counts)


def _split(path: str) -> tuple[str, str]:
    """(parent, name) of a path or URI; the parent of a bare name is ``.``."""
    return (path.rsplit("/", 1)[0] or "/", path.rsplit("/", 1)[1]) if "/" in path else (".", path)


def _kv(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "none"


def _quality_lines(columns: list[QualityColumn]) -> list[str]:
    lines = []
    for q in columns:
        if q.kind == "numeric":
            quantiles = "".join(f", {k} {v:.3g}" for k, v in q.quantiles.items() if k != "p50")
            lines.append(f"  {q.name}: mean {q.mean:.3g}, median {q.median:.3g}, min {q.min:.3g}, max {q.max:.3g}"
                         f"{quantiles} ({q.n_null} null of {q.n})")  # fmt: skip
        else:
            top = dict(q.values.most_common(_MAX_VALUES))
            more = f", … {len(q.values) - len(top)} more value(s)" if len(q.values) > len(top) else ""
            lines.append(f"  {q.name}: {_kv(top)}{more}" + (f", null={q.n_null}" if q.n_null else ""))
    return lines


def _parquet_summary(storage: Storage, path: str, n_rows: int) -> str:
    table = storage.read_table(path)
    rows = table.to_pylist()
    lines = [f"{path}: {len(rows)} rows, columns: {', '.join(table.column_names)}"]
    for column in _COUNTED:
        if column in table.column_names:
            lines.append(f"  {column}: {_kv(count_values(rows, column))}")
    lines += _quality_lines(quality_columns(rows))
    show = [c for c in _SHOWN if c in table.column_names]
    if n_rows and rows and show:
        import pandas as pd

        with pd.option_context("display.max_colwidth", 48, "display.width", 200):
            lines.append(table.select(show).slice(0, n_rows).to_pandas().to_string(index=False))
    return "\n".join(lines)


def _tar_summary(storage: Storage, path: str) -> str:
    """Keys and members by extension; member names are only split, never used as paths."""
    exts: Counter = Counter()
    keys = set()
    with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isfile() and "." in m.name:
                key, ext = m.name.split(".", 1)
                keys.add(key)
                exts[ext] += 1
    return f"{path}: {len(keys)} keys; members by extension: " + ", ".join(f"{k}={v}" for k, v in sorted(exts.items()))


def _stage_summary(storage: Storage, layout: Layout, step: str, n_rows: int) -> str:
    check_layout(layout, storage)
    folder = layout.stage(step)
    shards = done_shards(storage, layout, step)
    parquets = sorted(n[:-8] for n in storage.names(folder) if n.endswith(".parquet"))
    markers = read_markers(storage, layout, step, shards)
    lines = [f"{folder}: {len(shards)} done shard(s) (markers in {STAGE_DIRS[step]}/{DONE_DIR}/), "
             f"{len(parquets)} Parquet file(s)"]  # fmt: skip
    pending = sorted(set(parquets) - set(shards))
    if pending:
        lines.append(f"  not done (no marker): {', '.join(pending[:12])}{' …' if len(pending) > 12 else ''}")
    n = sum(int(m.get("n_rows", 0)) for m in markers.values() if isinstance(m.get("n_rows", 0), int))
    if n:
        lines.append(f"  rows (markers): {n}")
    for name in ("statuses", "fallbacks", "caption_sources"):
        if any(name in m for m in markers.values()):
            lines.append(f"  {name} (markers): {_kv(sum_markers(markers, name))}")
    if shards and step in (vocab.CAPTION, vocab.FUSE):
        rejected = read_stage_quality(storage, layout, step, shards).rejection_counts()
        lines.append(f"  rejected by reason (rows): {_kv(rejected)}")
    if shards:
        lines.append(_parquet_summary(storage, layout.parquet(step, shards[0]), n_rows))
    return "\n".join(lines)


def _clip_summary(storage: Storage, layout: Layout) -> str:
    """The CLIP tars and ``sizes.json``, and whether they agree (open_clip trusts sizes.json)."""
    tars = sorted(n for n in storage.names(layout.clip) if n.endswith(".tar") and not n.startswith("."))
    lines = [f"{layout.clip}: {len(tars)} tar(s)"]
    if storage.exists(layout.sizes):
        sizes = storage.read_json(layout.sizes)
        lines.append(f"  {SIZES_FILE}: {sum(int(v) for v in sizes.values())} samples in {len(sizes)} tar(s)")
        listed, present = set(sizes), set(tars)
        if listed - present:
            lines.append(f"  listed in {SIZES_FILE} but missing: {', '.join(sorted(listed - present))}")
        if present - listed:
            lines.append(f"  not in {SIZES_FILE}: {', '.join(sorted(present - listed))}")
    else:
        lines.append(f"  no {SIZES_FILE}")
    return "\n".join(lines)


def _images_summary(storage: Storage, folder: str) -> str:
    """img2dataset's output: its per-shard ``NNNNN_stats.json`` summed."""
    names = storage.names(folder)
    stats = [n for n in names if n.endswith(LEGACY_STATS_SUFFIX)]
    total: Counter = Counter()
    for name in stats:
        data = storage.read_json(f"{folder}/{name}")
        total.update({"success": int(data.get("successes", 0)), "failed": int(data.get("failed_to_download", 0)),
                      "failed_to_resize": int(data.get("failed_to_resize", 0))})  # fmt: skip
    n_tars = sum(1 for n in names if n.endswith(".tar"))
    n_parquet = sum(1 for n in names if n.endswith(".parquet"))
    line = f"{folder}: {n_tars} tar(s), {n_parquet} Parquet file(s), {len(stats)} img2dataset stats file(s)"
    return line + (f"\n  downloads: {_kv(+total)}" if +total else "")


def root_summary(data: ReportData) -> str:
    """A dataset root in a few lines: what each stage holds and the rows of the newest one."""
    lines = [
        f"{data.root}: rows of {data.folder}/ ({len(data.shards)} shard(s)): {len(data.rows)}, {len(data.ok_rows)} ok"
    ]
    for step in STAGES:
        lines.append(f"  {STAGE_DIRS[step]}/: {len(data.done.get(step, []))} done shard(s)")
    if data.sizes is not None or data.tars:
        lines.append(f"  {CLIP_DIR}/: {len(data.tars)} tar(s), {data.n_in_tars if data.n_in_tars is not None else '?'} "
                     f"samples in {SIZES_FILE}")  # fmt: skip
    for column in _COUNTED:
        counts = data.counts(column)
        if set(counts) != {"null"}:
            lines.append(f"  {column}: {_kv(counts)}")
    if data.fallback_reasons():
        lines.append(f"  fallback reasons (rows): {_kv(data.fallback_reasons())}")
    fallbacks = data.marker_totals(vocab.FUSE, "fallbacks")
    if fallbacks:
        lines.append(f"  fallbacks (fused markers): {_kv(fallbacks)}")
    for m in data.models:
        lines.append(f"  {m.step} model: {m.model} (prompt {m.prompt_id or '?'}){' — ' + m.note if m.note else ''}")
    for sq in data.stage_quality:
        lines.append(f"  {sq.folder}/ q_* columns ({sq.n_rows} rows):" if sq.columns else f"  {sq.folder}/:")
        lines += ["  " + line for line in _quality_lines(sq.columns)]
        if sq.step in (vocab.CAPTION, vocab.FUSE):
            lines.append(f"    rejected by reason: {_kv(sq.rejection_counts())}")
    return "\n".join(lines)
