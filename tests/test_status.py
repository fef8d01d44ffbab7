"""`vecap status` from the files alone: a root built by hand with shards done, one in progress and one
failed, held by a live run, then by a dead one, then by none; the same root on a real S3 endpoint
(moto's server); the run's driver log on an object store."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import MOTO_WHY, import_or_skip

from vecap.status import load_status, render_status

NOW = 2_000_000_000.0  # a fixed "now": every age and rate below follows from it
RUN = "20330518-033000-abcdef"
PREVIOUS = "20330517-120000-123456"


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _marker(path: Path, shard: str, stage: str, committed: float, statuses: dict, **extra) -> None:
    path.mkdir(parents=True, exist_ok=True)
    stats = {
        "stage": stage,
        "shard": shard,
        "n_rows": sum(statuses.values()),
        "statuses": statuses,
        "committed_at": _ts(committed),
        **extra,
    }
    (path / f"{shard}.json").write_text(json.dumps(stats))


def _parquet(path: Path, keys: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "status": ["ok"] * len(keys)}), path)


def build_root(root: Path) -> Path:
    """5 input shards. captions: 00000 (an earlier run), 00001 and 00002 (this run) done, 00003 in
    progress (2 parts), 00004 failed in the last finished run; fused: 00000 done, 00001 in progress."""
    for shard in ("00000", "00001", "00002", "00003", "00004"):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{shard}.tar").write_bytes(b"")
    ok = {"ok": 7, "image_undecodable": 1}
    for shard, committed in (("00000", NOW - 1000), ("00001", NOW - 60), ("00002", NOW - 20)):
        _parquet(root / "captions" / f"{shard}.parquet", [f"{shard}{i:04d}" for i in range(8)])
        _marker(root / "captions" / "_done", shard, "caption", committed, ok, prompt_tokens=100, output_tokens=20)
    _parquet(root / "captions" / "_parts" / "00003" / "aaaa.parquet", ["000300000"])
    _parquet(root / "captions" / "_parts" / "00003" / "bbbb.parquet", ["000300001"])
    (root / "captions" / "_run.json").write_text(
        json.dumps(
            {
                "run_id": PREVIOUS,
                "step": "caption",
                "seconds": 500.0,
                "samples_per_s": 0.5,
                "finished_at": _ts(NOW - 900),
                "totals": {"shards": 1, "rows": 8},
                "failed_shards": {"00004": "OSError: [Errno 5] Input/output error", "00002": "done since: not listed"},
            }
        )
    )
    _parquet(root / "fused" / "00000.parquet", [f"00000{i:04d}" for i in range(8)])
    _marker(root / "fused" / "_done", "00000", "fuse", NOW - 990, ok, fallbacks={"truncated": 3, "no_alt_text": 2})
    _parquet(root / "fused" / "_parts" / "00001" / "cccc.parquet", ["000100000"])
    lease(root, heartbeat_age=5, pid=os.getpid())
    return root


def row(text: str, stage: str) -> str:
    """A stage's row of the status table, its columns separated by single spaces."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{stage} "))
    return " ".join(line.split()[1:])


def lease(root: Path, heartbeat_age: float, pid: int, host: str | None = None) -> None:
    (root / "_lease.json").write_text(
        json.dumps(
            {
                "run_id": RUN,
                "host": host or socket.gethostname(),
                "pid": pid,
                "started_at": NOW - 100,
                "heartbeat_at": NOW - heartbeat_age,
                "ttl_s": 120.0,
            }
        )
    )


def test_status_of_a_running_run_with_shards_done_in_progress_and_failed(tmp_path):
    root = build_root(tmp_path / "root")
    st = load_status(str(root), now=NOW)
    assert st.input_shards == 5 and st.running
    assert (
        st.lease.run_id == RUN
        and st.lease.pid == os.getpid()
        and st.lease.heartbeat_age_s == 5
        and st.lease.dead is None
    )
    cap, fuse, write = st.stages
    assert (cap.done, cap.samples, cap.statuses) == (3, 24, {"ok": 21, "image_undecodable": 3})
    assert (cap.prompt_tokens, cap.output_tokens) == (300, 60)
    assert cap.in_progress == {"00003": 2}
    assert cap.failed == {"00004": "OSError: [Errno 5] Input/output error"}  # 00002 is done since
    # throughput and ETA of the running run: shards committed since its lease started
    assert (cap.run_shards, cap.run_samples) == (2, 16)
    assert cap.samples_per_s == pytest.approx(16 / 100)
    assert cap.eta_s == pytest.approx((5 - 3) / (2 / 100))
    assert (fuse.done, fuse.fallbacks, fuse.in_progress) == (1, {"truncated": 3, "no_alt_text": 2}, {"00001": 1})
    assert fuse.run_shards == 0 and fuse.eta_s is None  # nothing committed by this run yet
    assert (write.done, write.samples) == (0, 0)
    assert st.log_dir == f"{root}/logs/{RUN}"

    text = render_status(st)
    assert (
        f"run      {RUN} on host {socket.gethostname()}, pid {os.getpid()} "
        "(this host), started 1m40s ago; heartbeat 5s ago — running"
    ) in text
    assert row(text, "caption") == "3/5 24 0.16 1m40s 1 1 ok=21, image_undecodable=3"
    assert row(text, "fuse") == "1/5 8 0.00 - 1 0 ok=7, image_undecodable=1 | truncated=3, no_alt_text=2"
    assert row(text, "write") == "0/5 0 0.00 - 0 0 -"
    assert "in progress  caption: 00003 (2 part(s))" in text and "in progress  fuse: 00001 (1 part(s))" in text
    assert f"FAILED   caption 00004 (run {PREVIOUS}): OSError: [Errno 5] Input/output error" in text
    assert f"logs     {root}/logs/{RUN}/" in text


def test_status_says_when_the_lease_holder_looks_dead_or_no_run_holds_the_root(tmp_path):
    root = build_root(tmp_path / "root")
    lease(root, heartbeat_age=500, pid=os.getpid(), host="another-host")
    st = load_status(str(root), now=NOW)
    assert not st.running and "no heartbeat for 500s" in st.lease.dead
    assert "LOOKS DEAD: no heartbeat for 500s" in render_status(st)

    gone = subprocess.Popen(["true"])
    gone.wait()
    lease(root, heartbeat_age=5, pid=gone.pid)  # fresh heartbeat, but its process is gone on this host
    st = load_status(str(root), now=NOW)
    assert not st.running and f"process {gone.pid} is gone" in st.lease.dead
    assert st.stages[0].eta_s is None and st.stages[0].samples_per_s == 0.5  # the last finished run's rate

    (root / "_lease.json").unlink()
    st = load_status(str(root), now=NOW)
    assert st.lease is None and not st.running and st.log_dir == f"{root}/logs/{PREVIOUS}"
    text = render_status(st)
    assert f"none holds the root; the last run, {PREVIOUS}, finished {_ts(NOW - 900)} after 8m20s" in text
    assert row(text, "caption").startswith("3/5 24 0.50 - 1 1 ") and "* of the last finished run" in text
    assert "00003 (2 part(s)) — left by a run that stopped; redone by the next" in text


def test_vecap_status_command_text_and_json(tmp_path, capsys):
    from vecap.cli import main

    root = build_root(tmp_path / "root")
    assert main(["status", str(root)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"root     {root} (5 input shard(s))") and "FAILED   caption 00004" in text
    assert main(["status", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["running"] and data["stages"][0]["in_progress"] == {"00003": 2}
    assert data["stages"][0]["failed"] == {"00004": "OSError: [Errno 5] Input/output error"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port; yields the s3fs storage options that reach it."""
    moto_server = import_or_skip("moto.server", MOTO_WHY)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port  # noqa: SLF001 - moto exposes the bound port only here
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
    server.stop()


def test_status_of_an_s3_root_equals_the_local_one(tmp_path, s3):
    from vecap.storage import Storage

    local = build_root(tmp_path / "root")
    storage = Storage.for_path("s3://vecap-status", s3)
    storage.fs.mkdir("vecap-status")
    storage.fs.put(str(local) + "/", "s3://vecap-status/root/", recursive=True)
    remote = load_status("s3://vecap-status/root", s3, now=NOW)
    here = load_status(str(local), now=NOW)
    assert [s.__dict__ | {"folder": None} for s in remote.stages] == [
        s.__dict__ | {"folder": None} for s in here.stages
    ]
    assert remote.lease == here.lease and remote.log_dir == f"s3://vecap-status/root/logs/{RUN}"


def test_driver_log_on_an_object_store_is_uploaded_with_the_error_that_ended_the_run(s3):
    from vecap.layout import Layout
    from vecap.runlog import LogFile, driver_log
    from vecap.storage import Storage

    storage = Storage.for_path("s3://vecap-logs", s3)
    storage.fs.mkdir("vecap-logs")
    layout = Layout("s3://vecap-logs/root")
    log = logging.getLogger("vecap.test")
    log.setLevel(logging.INFO)
    with pytest.raises(RuntimeError, match="engine on fire"), driver_log(storage, layout, RUN) as path:
        assert path == f"s3://vecap-logs/root/logs/{RUN}/driver.log"
        log.info("planned 3 shards")
        raise RuntimeError("engine on fire")
    text = storage.read_bytes(path).decode()
    assert "vecap.test: planned 3 shards" in text
    assert f"run {RUN} ended with RuntimeError: engine on fire" in text and "Traceback" in text

    # A long run's log appears while it runs: uploaded every upload_every_s, not only at the end.
    sink = LogFile(storage, "s3://vecap-logs/root/logs/live.log", upload_every_s=0.2)
    sink.attach(log)
    try:
        log.info("first shard committed")
        deadline = time.time() + 60
        while not storage.exists(sink.path) and time.time() < deadline:
            time.sleep(0.2)
        assert "first shard committed" in storage.read_bytes(sink.path).decode()
    finally:
        sink.detach(log)
        sink.close()


def test_marker_stats_read_and_add_one_way_whatever_a_marker_lacks():
    from vecap.stats import ShardStats

    caption = {"n_rows": 4, "statuses": {"ok": 3, "model_error": 1}, "prompt_tokens": 40, "timings": {"t_read": 0.5}}
    write = {"n_rows": 4, "n_samples": 3, "statuses": {"ok": 3, "no_text": 1}}  # a write marker: no tokens
    damaged = {"n_rows": "four", "statuses": ["ok"], "fallbacks": {"truncated": True, "refusal": 2}}
    total = ShardStats.total([caption, write, damaged])
    assert (total.shards, total.rows, total.samples, total.prompt_tokens) == (3, 8, 3, 40)
    assert total.statuses == {"ok": 6, "model_error": 1, "no_text": 1}
    assert total.fallbacks == {"refusal": 2} and total.timings == {"t_read": 0.5}
    assert ShardStats.of_marker(caption) + ShardStats() == ShardStats.of_marker(caption)
