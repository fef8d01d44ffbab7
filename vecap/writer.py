"""Per-shard outputs of a stage, committed atomically with a done marker.

A shard's files are written under temporary names and renamed into place when
complete; ``NNNNN_stats.json`` is renamed last and is the done marker. A process
killed at any point therefore leaves either the old state or the complete shard,
never a half-written file that a reader or a rerun could mistake for output.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"
_TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StageDir:
    """The folder of one stage (``captions/``, ``fused/``, ``vecap/``): what is done, and commits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StageDir({str(self.path)!r})"

    # --- what is there ------------------------------------------------------------
    def stats_path(self, shard: str) -> Path:
        return self.path / f"{shard}{STATS_SUFFIX}"

    def parquet_path(self, shard: str) -> Path:
        return self.path / f"{shard}.parquet"

    def tar_path(self, shard: str) -> Path:
        return self.path / f"{shard}.tar"

    def done(self) -> set[str]:
        """Shards whose done marker exists."""
        if not self.path.is_dir():
            return set()
        return {p.name[: -len(STATS_SUFFIX)] for p in self.path.glob(f"*{STATS_SUFFIX}") if not p.name.startswith(".")}

    def is_done(self, shard: str) -> bool:
        return self.stats_path(shard).exists()

    def read_stats(self, shard: str) -> dict[str, Any]:
        return json.loads(self.stats_path(shard).read_text())

    def read_table(self, shard: str) -> pa.Table:
        return pq.read_table(self.parquet_path(shard))

    # --- writing ------------------------------------------------------------------
    def temp_path(self, name: str) -> Path:
        """A private temporary path beside ``name``: invisible to readers (dot prefix)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / f".{name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def remove_stale_temps(self) -> int:
        """Delete temporary files left by killed writers; returns how many."""
        if not self.path.is_dir():
            return 0
        stale = [p for p in self.path.glob(f".*{_TMP_MARK}*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def write_parquet(self, name: str, batches: pa.Table | Iterable[pa.RecordBatch], schema: pa.Schema) -> Path:
        """Stream ``batches`` to a temporary Parquet file; returns its path (not yet visible)."""
        tmp = self.temp_path(name)
        if isinstance(batches, pa.Table):
            batches = batches.to_batches()
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        return tmp

    def commit(
        self,
        shard: str,
        stats: dict[str, Any],
        parquet: pa.Table | None = None,
        schema: pa.Schema | None = None,
        extra_files: dict[str, Path] | None = None,
    ) -> Path:
        """Make a shard visible: data files first (by rename), the stats file last.

        ``extra_files`` maps final file names (e.g. ``"00000.tar"``) to temporary files
        already written by the caller with :meth:`temp_path`.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[Path, Path]] = []
        for name, tmp in (extra_files or {}).items():
            staged.append((Path(tmp), self.path / name))
        if parquet is not None:
            tmp = self.write_parquet(f"{shard}.parquet", parquet, schema or parquet.schema)
            staged.append((tmp, self.parquet_path(shard)))
        stats_tmp = self.temp_path(f"{shard}{STATS_SUFFIX}")
        stats_tmp.write_text(json.dumps(stats, indent=2, sort_keys=True, default=str))
        for tmp, final in staged:
            _fsync_file(tmp)
            os.replace(tmp, final)
        _fsync_file(stats_tmp)
        os.replace(stats_tmp, self.stats_path(shard))
        _fsync_dir(self.path)
        return self.stats_path(shard)

    def invalidate(self, shard: str) -> None:
        """Remove a shard's done marker first, then its files (used by --overwrite)."""
        self.stats_path(shard).unlink(missing_ok=True)
        for p in (self.parquet_path(shard), self.tar_path(shard)):
            p.unlink(missing_ok=True)

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically replace a small JSON file of the folder (``sizes.json``, ``_run.json``)."""
        tmp = self.temp_path(name)
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        final = self.path / name
        os.replace(tmp, final)
        return final


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
