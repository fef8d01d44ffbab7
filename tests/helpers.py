"""Small builders shared by tests: img2dataset-like shards made inside the test."""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import socket
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vecap.backends.base import ChatEngine, Generation


def free_port() -> int:
    """A TCP port free on loopback now (for a server a test starts), outside the ranges Ray takes its
    own ports from: the kernel's ephemeral range (Ray binds port 0 for its agents' gRPC servers,
    so a port the kernel just handed out here can be a Ray server's a moment later; the metrics
    test once scraped one) and Ray's worker ports (10002-19999)."""
    import random

    low, high = 20000, _ephemeral_low() - 1
    if high - low < 1000:  # an unusual ephemeral range: the kernel's choice, as before
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in random.SystemRandom().sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def png_bytes(color=(200, 30, 30), size=(24, 16), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color=(30, 30, 200), size=(40, 30), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(
    key: str, image: bytes, alt: str | None = "an alt text", ext: str = "jpg"
) -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image)]
    if alt is not None:
        members.append((f"{key}.txt", alt.encode()))
    members.append((f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}", "caption": alt}).encode()))
    return members


def write_img2dataset_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows with key/url/caption/status/error_message, like img2dataset's per-shard Parquet."""
    full = [
        {
            "key": r["key"],
            "url": r.get("url", f"http://x/{r['key']}"),
            "caption": r.get("caption"),
            "status": r.get("status", "success"),
            "error_message": r.get("error_message"),
        }
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(full), path)
    return path


def stage_output(root, step: str):
    """The committed shards of a stage (``step``: caption, fuse, write) under ``root``."""
    from vecap.layout import Layout
    from vecap.outputs import StageOutput

    return StageOutput(Layout(str(root)), step)


def marker_path(root, step: str, shard: str) -> Path:
    from vecap.layout import Layout

    return Path(Layout(str(root)).marker(step, shard))


def in_ci() -> bool:
    """``$CI`` is set (and not 0/false): every test a feature depends on must run, none may skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


MOTO_WHY = "the S3 tests' loopback server, moto[server], comes with the test extra (make setup installs it)"


def import_or_skip(module: str, why: str):
    """``module``, imported; without it the test skips, except in CI, where it fails (``why``: who installs it)."""
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if in_ci():
            pytest.fail(f"{module} cannot be imported in CI ({err}); {why}")
        pytest.skip(f"{module} not importable ({err}); {why}")


class ConcurrencyEngine(ChatEngine):
    """A backend (``helpers:ConcurrencyEngine``) that takes 50 ms a call and records how many of
    its calls ran at once, the most in ``ConcurrencyEngine.most`` (reset by the test)."""

    max_concurrent_calls = 64
    most = 0
    _now = 0
    _lock = threading.Lock()

    def _generate(self, requests):
        cls = type(self)
        with cls._lock:
            cls._now += 1
            cls.most = max(cls.most, cls._now)
        time.sleep(0.05)
        with cls._lock:
            cls._now -= 1
        return [Generation(text="a red bus", finish_reason="stop") for _ in requests]


class KillWhen(threading.Thread):
    """SIGKILL a ``vecap run`` subprocess and its session (the local Ray it started) from outside,
    as soon as ``ready()`` (read from the root's files) is true: a real kill at a known point.

    The process must have been started with ``start_new_session=True``. After ``join()``,
    ``cmdline`` is the command line of the process that was killed (empty if none was).
    """

    def __init__(self, proc, ready, expect: str = "vecap.cli run", poll_s: float = 0.02, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.proc, self.ready, self.expect, self.poll_s, self.timeout_s = proc, ready, expect, poll_s, timeout_s
        self.cmdline = ""

    def run(self) -> None:
        import psutil

        deadline = time.time() + self.timeout_s
        while time.time() < deadline and self.proc.poll() is None:
            try:
                ready = self.ready()
            except OSError:  # a listing racing a write
                ready = False
            if ready:
                cmdline = " ".join(psutil.Process(self.proc.pid).cmdline())
                if self.expect in cmdline:  # the process meant, else nothing is killed (the test fails)
                    self.cmdline = cmdline
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return
            time.sleep(self.poll_s)
