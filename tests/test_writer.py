"""Atomic shard commits: a writer killed halfway leaves no visible shard and no done marker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa

from vecap import schemas
from vecap.writer import StageDir


def _rows(n, shard="00000"):
    return [{"key": f"{i:07d}", "shard": shard, "status": "ok", "vlm_caption": "x" * 50, "seed": i} for i in range(n)]


def test_commit_makes_files_visible_and_marks_done(tmp_path):
    out = StageDir(tmp_path / "captions")
    assert out.done() == set()
    out.commit("00000", {"n_rows": 3}, schemas.table(_rows(3), schemas.CAPTIONS), schemas.CAPTIONS)
    assert out.done() == {"00000"} and out.is_done("00000")
    assert out.read_table("00000").num_rows == 3
    assert out.read_table("00000").schema.equals(schemas.CAPTIONS)
    assert out.read_stats("00000") == {"n_rows": 3}
    assert sorted(p.name for p in out.path.iterdir()) == ["00000.parquet", "00000_stats.json"]


def test_writer_killed_halfway_leaves_no_visible_shard(tmp_path):
    """A real SIGKILL in the middle of streaming a shard's Parquet."""
    script = textwrap.dedent(
        f"""
        import os, signal, pyarrow as pa
        from vecap import schemas
        from vecap.writer import StageDir

        def batches():
            for b in range(10):
                rows = [{{"key": f"{{b}}-{{i}}", "shard": "00001", "status": "ok"}} for i in range(1000)]
                yield schemas.table(rows, schemas.CAPTIONS).to_batches()[0]
                if b == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

        out = StageDir({str(tmp_path / "captions")!r})
        out.commit("00000", {{"n_rows": 1}}, schemas.table([], schemas.CAPTIONS), schemas.CAPTIONS)
        tmp = out.write_parquet("00001.parquet", batches(), schemas.CAPTIONS)
        out.commit("00001", {{"n_rows": 10000}}, extra_files={{"00001.parquet": tmp}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = StageDir(tmp_path / "captions")
    assert out.done() == {"00000"}  # the earlier shard is intact, the killed one is not done
    visible = sorted(p.name for p in out.path.iterdir() if not p.name.startswith("."))
    assert visible == ["00000.parquet", "00000_stats.json"]
    hidden = [p for p in out.path.iterdir() if p.name.startswith(".")]
    assert hidden  # the half-written temp file exists, but hidden...
    assert out.remove_stale_temps() == len(hidden)  # ...and a rerun clears it
    assert not [p for p in out.path.iterdir() if p.name.startswith(".")]


def test_stats_file_is_renamed_last(tmp_path, monkeypatch):
    """If the process dies between the data rename and the marker rename, the shard is not done."""
    out = StageDir(tmp_path / "fused")
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append(os.path.basename(dst))
        if str(dst).endswith("_stats.json"):
            raise KeyboardInterrupt("killed before the marker")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    try:
        out.commit("00002", {"n_rows": 1}, schemas.table(_rows(1), schemas.FUSED), schemas.FUSED)
    except KeyboardInterrupt:
        pass
    assert calls == ["00002.parquet", "00002_stats.json"]
    assert not out.is_done("00002")


def test_invalidate_removes_marker_and_files(tmp_path):
    out = StageDir(tmp_path / "captions")
    out.commit("00000", {"n_rows": 1}, pa.table({"key": ["a"]}))
    out.invalidate("00000")
    assert out.done() == set() and not out.parquet_path("00000").exists()
