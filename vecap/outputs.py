"""The committed shards of one stage on one root: what is done, reading, committing, invalidating.

A shard of a stage is done when its marker (``<stage>/_done/NNNNN.json``, the shard's
stats) exists; the marker is written after every other file of the shard, through
:class:`vecap.storage.Storage`, so a reader or a rerun never mistakes a half-written
shard for output. Invalidation removes the marker first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from vecap.layout import LEGACY_STATS_SUFFIX, STAGE_DIRS, STAGES, Layout
from vecap.storage import Storage

log = logging.getLogger(__name__)


class LegacyLayoutError(RuntimeError):
    """A root written by vecap 0.1 (markers beside the Parquet, tars in ``vecap/``)."""


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
        if self.step == "write":
            write_sizes(self.layout, self.storage)  # never list a tar that is about to go
            self.storage.remove(self.layout.tar(shard))
        self.storage.remove(self.layout.parquet(self.step, shard))
        self.storage.remove(self.layout.parts(self.step, shard), recursive=True)


def write_sizes(layout: Layout, storage: Storage) -> dict[str, int]:
    """``clip/sizes.json``: tar name → sample count of every done write shard, as open_clip reads it."""
    sizes = {f"{s}.tar": int(m["n_samples"]) for s, m in StageOutput(layout, "write", storage).markers().items()}
    storage.write_json(layout.sizes, sizes)
    return sizes


def check_layout(layout: Layout, storage: Storage) -> None:
    """Refuse a root written in the old layout, saying how to convert it."""
    for step in STAGES:
        names = storage.names(layout.stage(step))
        if any(n.endswith(LEGACY_STATS_SUFFIX) for n in names) or (
            step == "write" and any(n.endswith(".tar") for n in names)
        ):
            raise LegacyLayoutError(
                f"{layout.stage(step)} was written by vecap 0.1 (markers '*{LEGACY_STATS_SUFFIX}' beside the Parquet, "
                f"tars in vecap/). Convert it in place with: vecap migrate {layout.root}"
            )


def migrate_layout(layout: Layout, storage: Storage) -> dict[str, int]:
    """Move a vecap 0.1 root to the current layout in place; returns what moved, by kind.

    Markers go to ``<stage>/_done/NNNNN.json``, tars and ``sizes.json`` to ``clip/``. Safe to
    rerun after an interruption: each file is moved at most once and markers move last.
    """
    moved = {"markers": 0, "tars": 0}
    names = storage.names(layout.stage("write"))
    if storage.local:
        os.makedirs(layout.clip, exist_ok=True)
    for name in names:
        if name.endswith(".tar") or name == "sizes.json":
            storage.fs.mv(layout.join(STAGE_DIRS["write"], name), layout.join("clip", name))
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
