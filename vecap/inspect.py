"""``vecap inspect``: what is in a shard of any stage, at a glance."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from vecap.writer import STATS_SUFFIX


def _parquet_summary(path: Path, n_rows: int) -> str:
    import pandas as pd

    df = pd.read_parquet(path)
    lines = [f"{path}: {len(df)} rows, columns: {', '.join(df.columns)}"]
    for col in ("status", "vec_source", "txt_source"):
        if col in df.columns:
            counts = df[col].fillna("∅").value_counts().to_dict()
            lines.append(f"  {col}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    show = [c for c in ("key", "status", "alt_text", "vlm_caption", "vec_caption", "txt", "error") if c in df.columns]
    if n_rows and len(df):
        with pd.option_context("display.max_colwidth", 48, "display.width", 200):
            lines.append(df[show].head(n_rows).to_string(index=False))
    return "\n".join(lines)


def _tar_summary(path: Path) -> str:
    exts: Counter = Counter()
    keys = set()
    with tarfile.open(path, "r|*") as tar:
        for m in tar:
            if m.isfile() and "." in m.name:
                key, ext = m.name.split(".", 1)
                keys.add(key)
                exts[ext] += 1
    return f"{path}: {len(keys)} keys; members by extension: " + ", ".join(f"{k}={v}" for k, v in sorted(exts.items()))


def inspect_path(path: str | Path, n_rows: int = 5) -> str:
    """Summarise a ``.parquet``, ``.tar``, ``_stats.json`` or a whole stage folder."""
    path = Path(path)
    if path.is_dir():
        stats = sorted(path.glob(f"*{STATS_SUFFIX}"))
        tars = sorted(path.glob("*.tar"))
        parts = [f"{path}: {len(stats)} done shard(s), {len(tars)} tar(s)"]
        total: Counter = Counter()
        for s in stats:
            data = json.loads(s.read_text())
            total.update(data.get("statuses", {}))
            if not data.get("statuses") and "successes" in data:  # img2dataset's stats
                total.update({"success": data["successes"], "failed": data.get("failed_to_download", 0)})
        if total:
            parts.append("  statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(total.items())))
        first = sorted(path.glob("*.parquet"))
        if first:
            parts.append(_parquet_summary(first[0], n_rows))
        return "\n".join(parts)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix == ".parquet":
        return _parquet_summary(path, n_rows)
    if path.suffix == ".tar":
        return _tar_summary(path)
    if path.name.endswith(".json"):
        return json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True)
    raise ValueError(f"don't know how to inspect {path} (expected .parquet, .tar, .json or a folder)")
