"""The committed shards of one stage on one root: what is done, reading, committing, invalidating.

A shard of a stage is done when its marker (``<stage>/_done/NNNNN.json``, the shard's
stats) exists; the marker is written after every other file of the shard, through
:class:`vecap.storage.Storage`, so a reader or a rerun never mistakes a half-written
shard for output. Invalidation removes the marker first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import pyarrow as pa

from vecap import vocab
from vecap.layout import CLIP_DIR, LEGACY_STATS_SUFFIX, STAGE_DIRS, STAGES, Layout
from vecap.storage import Storage

log = logging.getLogger(__name__)


class LegacyLayoutError(RuntimeError):
    """A root written by an earlier vecap: vecap 0.1 (markers beside the Parquet, tars in
    ``vecap/``), or before the ``reason`` column (the reason at the head of ``error``)."""


class StageOutput:
    def __init__(self, layout: Layout, step: str, storage: Storage | None = None) -> None:
        self.layout = layout
        self.step = step
        self.storage = storage or Storage.for_path(layout.root)

    def __repr__(self) -> str:
        return f"StageOutput({self.layout.stage(self.step)!r})"

    # --- what is there ------------------------------------------------------------
    def done(self) -> set[str]:
        """Shards whose done marker exists."""
        return {n[: -len(".json")] for n in self.storage.names(self.layout.done_dir(self.step)) if n.endswith(".json")}

    def is_done(self, shard: str) -> bool:
        return self.storage.exists(self.layout.marker(self.step, shard))

    def read_stats(self, shard: str) -> dict[str, Any]:
        return self.storage.read_json(self.layout.marker(self.step, shard))

    def markers(self, shards: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """shard → its done marker (stats), for ``shards`` (default: every done shard).

        One small read per shard, in parallel (an object store answers each in tens of ms);
        a marker that vanished or cannot be parsed meanwhile is logged and left out.
        """
        from concurrent.futures import ThreadPoolExecutor

        names = sorted(self.done() if shards is None else shards)

        def read(shard: str) -> dict[str, Any] | None:
            try:
                stats = self.read_stats(shard)
            except (FileNotFoundError, ValueError) as err:
                log.warning("marker of %s shard %s unreadable: %s", self.step, shard, err)
                return None
            return stats if isinstance(stats, dict) else None

        with ThreadPoolExecutor(max_workers=16) as pool:
            return {s: m for s, m in zip(names, pool.map(read, names), strict=True) if m is not None}

    def read_table(self, shard: str) -> pa.Table:
        return self.storage.read_table(self.layout.parquet(self.step, shard))

    # --- writing ------------------------------------------------------------------
    def commit(self, shard: str, table: pa.Table, stats: dict[str, Any]) -> None:
        """Write the shard's Parquet, then its marker (last: the shard is done from then on)."""
        self.storage.write_table(self.layout.parquet(self.step, shard), table)
        self.storage.write_json(self.layout.marker(self.step, shard), stats)

    def invalidate(self, shard: str) -> None:
        """Remove a shard: marker first, then its files (``--overwrite``, ``--retry-failed``)."""
        self.storage.remove(self.layout.marker(self.step, shard))
        if self.step == vocab.WRITE:
            write_sizes(self.layout, self.storage)  # never list a tar that is about to go
            self.storage.remove(self.layout.tar(shard))
        self.storage.remove(self.layout.parquet(self.step, shard))
        self.storage.remove(self.layout.parts(self.step, shard), recursive=True)


def remove_dead_runs_files(layout: Layout, storage: Storage) -> None:
    """Temporary files, part files and reuse plans of runs that died: call only holding the lease
    (parts were made with settings that may have changed since; they are redone)."""
    remove_temp_files(layout, storage)
    for step in STAGES:
        storage.remove(layout.parts(step), recursive=True)
    storage.remove(layout.reuse(), recursive=True)


def remove_temp_files(layout: Layout, storage: Storage) -> None:
    """The hidden temporary files of unfinished writes in the stage folders and ``clip/``: call only
    holding the lease, when none of this run's writes is in flight. A run does so when it starts and
    again when it ends: a killed run's tasks can outlive their driver for a moment and leave one
    after the next run's start."""
    for step in STAGES:
        storage.remove_temps(layout.stage(step))
        storage.remove_temps(layout.done_dir(step))
    storage.remove_temps(layout.clip)


def write_sizes(layout: Layout, storage: Storage) -> dict[str, int]:
    """``clip/sizes.json``: tar name → sample count of every done write shard, as open_clip reads it."""
    sizes = {f"{s}.tar": int(m["n_samples"]) for s, m in StageOutput(layout, vocab.WRITE, storage).markers().items()}
    storage.write_json(layout.sizes, sizes)
    return sizes


def check_layout(layout: Layout, storage: Storage) -> None:
    """Refuse a root written in an old layout, saying how to convert it."""
    for step in STAGES:
        names = storage.names(layout.stage(step))
        if any(n.endswith(LEGACY_STATS_SUFFIX) for n in names) or (
            step == vocab.WRITE and any(n.endswith(".tar") for n in names)
        ):
            raise LegacyLayoutError(
                f"{layout.stage(step)} was written by vecap 0.1 (markers '*{LEGACY_STATS_SUFFIX}' beside the Parquet, "
                f"tars in vecap/). Convert it in place with: vecap migrate {layout.root}"
            )
        readable = (n for n in map(partial(_columns, storage), _stage_parquet(layout, step, storage)) if n is not None)
        columns = next(readable, None)
        if columns is not None and "reason" not in columns:
            raise LegacyLayoutError(
                f"{layout.stage(step)} was written before the 'reason' column (its rows keep the reason at the head "
                f"of 'error'). Convert it in place with: vecap migrate {layout.root}"
            )


def _stage_parquet(layout: Layout, step: str, storage: Storage) -> Iterator[str]:
    """A stage's Parquet files, listed as they are needed: committed shards, then work in progress (``_parts``)."""
    folder = layout.stage(step)
    yield from (f"{folder}/{n}" for n in storage.names(folder) if n.endswith(".parquet") and not n.startswith("."))
    for shard in storage.names(layout.parts(step)):
        parts = storage.names(layout.parts(step, shard))
        yield from (
            f"{layout.parts(step, shard)}/{n}" for n in parts if n.endswith(".parquet") and not n.startswith(".")
        )


def _columns(storage: Storage, path: str) -> list[str] | None:
    """The column names of a Parquet file; None (logged) for one that is not readable Parquet."""
    try:
        return storage.read_schema(path).names
    except (OSError, pa.ArrowException) as err:
        log.warning("%s is not readable Parquet (%s): left as it is", path, err)
        return None


def split_legacy_error(status: str | None, error: str | None, rejected: bool) -> tuple[str | None, str | None]:
    """(reason, error) of a row written before the ``reason`` column, from its ``error``.

    Those rows led ``error`` with the reason (``"truncated: stopped at the token limit"``) when
    the caption was rejected or the fusion fell back (``rejected``); other failures' reason is
    their status. The one place a reason is read back from text: old roots (``vecap migrate``)
    and old caption-cache entries.
    """
    from vecap.validation import REASONS

    head, _, rest = (error or "").partition(":")
    known = set(REASONS) | vocab.NOT_REJECTIONS | vocab.IMAGE_FAILURES | {vocab.NO_TEXT}
    if head.strip() in known and (rejected or head.strip() == status):
        return head.strip(), rest.strip() or None
    return (None if status in (vocab.OK, None) else status), error


def _with_reason(table: pa.Table, step: str) -> pa.Table:
    """A table of a stage written before the ``reason`` column, with it (after ``status``)."""
    rows = table.select([c for c in ("status", "error", "vec_source") if c in table.column_names]).to_pylist()
    reasons, errors = [], []
    for r in rows:
        if step == vocab.CAPTION:
            rejected = r["status"] == vocab.CAPTION_REJECTED
        else:
            rejected = r.get("vec_source") in vocab.FALLBACK_SOURCES or r["status"] == vocab.NO_TEXT
        reason, error = split_legacy_error(r["status"], r["error"], rejected)
        reasons.append(reason)
        errors.append(error)
    table = table.set_column(table.column_names.index("error"), "error", pa.array(errors, pa.string()))
    return table.add_column(table.column_names.index("status") + 1, "reason", pa.array(reasons, pa.string()))


def migrate_layout(layout: Layout, storage: Storage) -> dict[str, int]:
    """Convert a root written by an earlier vecap to the current layout in place; returns what
    changed, by kind.

    vecap 0.1: markers go to ``<stage>/_done/NNNNN.json``, tars and ``sizes.json`` to ``clip/``.
    Before the ``reason`` column: each Parquet of a stage (committed or in ``_parts``) is
    rewritten with it, its reason taken off the head of ``error``. Safe to rerun after an
    interruption: each file is moved or rewritten (atomically) at most once, markers move last.
    """
    moved = {"markers": 0, "tars": 0, "tables": 0}
    for step in STAGES:
        for path in list(_stage_parquet(layout, step, storage)):
            names = _columns(storage, path)
            if names is not None and "reason" not in names:
                storage.write_table(path, _with_reason(storage.read_table(path), step))
                moved["tables"] += 1
    names = storage.names(layout.stage(vocab.WRITE))
    if storage.local:
        os.makedirs(layout.clip, exist_ok=True)
    for name in names:
        if name.endswith(".tar") or name == "sizes.json":
            storage.fs.mv(layout.join(STAGE_DIRS[vocab.WRITE], name), layout.join(CLIP_DIR, name))
            moved["tars"] += name.endswith(".tar")
    for step in STAGES:
        for name in storage.names(layout.stage(step)):
            if name.endswith(LEGACY_STATS_SUFFIX) and not name.startswith("."):
                shard = name[: -len(LEGACY_STATS_SUFFIX)]
                stats = storage.read_json(layout.join(STAGE_DIRS[step], name))
                storage.write_json(layout.marker(step, shard), stats)
                storage.remove(layout.join(STAGE_DIRS[step], name))
                moved["markers"] += 1
    if moved["tars"]:
        write_sizes(layout, storage)
    return moved
