"""The storage layer, commits and leases: atomic on POSIX, marker last, one run per root, the old layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import stage_output

from vecap import schemas
from vecap.layout import Layout
from vecap.lease import Lease, RootBusy
from vecap.outputs import LegacyLayoutError, StageOutput, check_layout, migrate_layout, write_sizes
from vecap.storage import Storage, retry_io


def _table(n: int, shard: str = "00000") -> pa.Table:
    rows = [{"key": f"{i:07d}", "shard": shard, "status": "ok", "vlm_caption": "x" * 50, "seed": i} for i in range(n)]
    return schemas.table(rows, schemas.CAPTIONS)


def test_commit_writes_parquet_then_marker(tmp_path):
    out = stage_output(tmp_path, "caption")
    assert out.done() == set()
    out.commit("00000", _table(3), {"n_rows": 3})
    assert out.done() == {"00000"} and out.is_done("00000")
    assert out.read_table("00000").equals(_table(3)) and out.read_stats("00000") == {"n_rows": 3}
    assert sorted(os.listdir(tmp_path / "captions")) == ["00000.parquet", "_done"]
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "captions")) == 3  # the marker folder is invisible to pandas


def test_a_writer_killed_halfway_leaves_no_visible_file(tmp_path):
    """A real SIGKILL while a staged file is being written: nothing at the final name; a rerun's
    cleanup (under the lease) removes the hidden temporary file."""
    target = tmp_path / "clip" / "00001.tar"
    script = textwrap.dedent(
        f"""
        import os, signal
        from vecap.storage import Storage
        with Storage.for_path({str(tmp_path)!r}).staged({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 100000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()
    hidden = os.listdir(tmp_path / "clip")
    assert len(hidden) == 1 and hidden[0].startswith(".")
    assert Storage.for_path(str(tmp_path)).remove_temps(str(tmp_path / "clip")) == 1
    assert os.listdir(tmp_path / "clip") == []


def test_marker_is_written_last(tmp_path, monkeypatch):
    """A commit that dies between the Parquet and the marker leaves the shard not done."""
    storage = Storage.for_path(str(tmp_path))
    out = StageOutput(Layout(str(tmp_path)), "fuse", storage)
    real = storage.write_bytes
    calls = []

    def dying(path, data):
        calls.append(os.path.basename(path))
        if "/_done/" in path:
            raise KeyboardInterrupt("killed before the marker")
        return real(path, data)

    monkeypatch.setattr(storage, "write_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        out.commit("00002", schemas.table([], schemas.FUSED), {"n_rows": 0})
    assert calls == ["00002.parquet", "00002.json"]
    assert not out.is_done("00002")


def test_invalidate_keeps_sizes_equal_to_the_tars(tmp_path):
    layout, storage = Layout(str(tmp_path)), Storage.for_path(str(tmp_path))
    out = StageOutput(layout, "write", storage)
    for shard in ("00000", "00001"):
        storage.write_bytes(layout.tar(shard), b"tar")
        out.commit(shard, schemas.table([], schemas.VECAP), {"n_samples": 2})
    assert write_sizes(layout, storage) == {"00000.tar": 2, "00001.tar": 2}
    out.invalidate("00000")
    assert json.loads((tmp_path / "clip" / "sizes.json").read_text()) == {"00001.tar": 2}
    assert sorted(os.listdir(tmp_path / "clip")) == ["00001.tar", "sizes.json"]
    assert out.done() == {"00001"}


def test_transient_errors_are_retried_and_missing_files_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "ok"

    assert retry_io(flaky, "test", first_delay_s=0.001) == "ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError):
        retry_io(lambda: (calls.append(1), open("/nonexistent/x"))[1], "test", first_delay_s=0.001)


def test_second_lease_on_a_root_is_refused_and_a_dead_one_taken_over(tmp_path):
    storage = Storage.for_path(str(tmp_path))
    path = str(tmp_path / "_lease.json")
    first = Lease(storage, path, "run-a", ttl_s=60, heartbeat_s=0.05).acquire()
    with pytest.raises(RootBusy, match="run-a"):
        Lease(storage, path, "run-b").acquire()
    import time

    time.sleep(0.2)
    assert json.loads((tmp_path / "_lease.json").read_text())["heartbeat_at"] > first._started  # heartbeats
    first.release()
    assert not (tmp_path / "_lease.json").exists()
    # A lease whose heartbeat is older than its ttl belongs to a dead run: taken over.
    (tmp_path / "_lease.json").write_text(
        json.dumps({"run_id": "old", "host": "elsewhere", "heartbeat_at": 0, "ttl_s": 60})
    )
    lease = Lease(storage, path, "run-c").acquire()
    assert lease.took_over["run_id"] == "old"
    lease.release()


def test_old_layout_is_refused_with_the_command_that_converts_it(tmp_path):
    (tmp_path / "fused").mkdir(parents=True)
    (tmp_path / "vecap").mkdir()
    pq.write_table(pa.table({"key": ["a"], "status": ["ok"], "error": [None]}), tmp_path / "fused" / "00000.parquet")
    (tmp_path / "fused" / "00001.parquet").write_bytes(b"")  # damaged: left as it is, said in the log
    (tmp_path / "fused" / "00000_stats.json").write_text(json.dumps({"n_rows": 1}))
    (tmp_path / "vecap" / "00000.tar").write_bytes(b"tar")
    (tmp_path / "vecap" / "00000_stats.json").write_text(json.dumps({"n_samples": 1}))
    (tmp_path / "vecap" / "sizes.json").write_text("{}")
    layout, storage = Layout(str(tmp_path)), Storage.for_path(str(tmp_path))
    with pytest.raises(LegacyLayoutError, match=f"vecap migrate {tmp_path}"):
        check_layout(layout, storage)
    assert migrate_layout(layout, storage) == {"markers": 2, "tars": 1, "tables": 1}
    check_layout(layout, storage)  # no error now
    assert pq.read_table(tmp_path / "fused" / "00000.parquet").column_names == ["key", "status", "reason", "error"]
    assert json.loads((tmp_path / "clip" / "sizes.json").read_text()) == {"00000.tar": 1}
    assert StageOutput(layout, "fuse", storage).done() == {"00000"}
