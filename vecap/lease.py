"""One run per root: a lease file with a run id and a heartbeat.

Taken by an exclusive create (``O_EXCL`` on POSIX, a conditional PUT on object stores).
The holder refreshes ``heartbeat_at`` every ``heartbeat_s``; a lease whose heartbeat is
older than ``ttl_s`` (or whose process, on this host, is gone) belongs to a run that died,
and the next run takes it over (and only then cleans that run's temporary files).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from vecap.storage import Storage

log = logging.getLogger(__name__)


class RootBusy(RuntimeError):
    """Another live run holds the root."""


def _dead_here(held: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this host and its process no longer exists."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class Lease:
    def __init__(
        self, storage: Storage, path: str, run_id: str, ttl_s: float = 120.0, heartbeat_s: float = 15.0
    ) -> None:
        self.storage = storage
        self.path = path
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self.took_over: dict[str, Any] | None = None  # the expired lease this run replaced

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started,
            "heartbeat_at": now,
            "ttl_s": self.ttl_s,
        }

    def read(self) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(self.path)
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: treat as expired
            return {"run_id": "?", "heartbeat_at": 0}

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`RootBusy` naming the live run that holds it."""
        self._started = time.time()
        for _ in range(3):
            if self.storage.create_exclusive(self.path, json.dumps(self._record()).encode()):
                self._start_heartbeat()
                return self
            held = self.read()
            if held is None:
                continue  # released between our two calls: try again
            age = time.time() - float(held.get("heartbeat_at", 0))
            if age <= float(held.get("ttl_s", self.ttl_s)) and not _dead_here(held):
                raise RootBusy(
                    f"{self.path} is held by run {held.get('run_id')} (host {held.get('host')}, pid {held.get('pid')}, "
                    f"last heartbeat {age:.0f}s ago). One run per root: wait for it, or use another root. A lease "
                    f"whose heartbeat is older than {held.get('ttl_s', self.ttl_s):.0f}s is taken over automatically."
                )
            log.warning(
                "taking over the lease of run %s (its process is gone, or no heartbeat for %.0fs)",
                held.get("run_id"),
                age,
            )
            self.took_over = held
            self.storage.remove(self.path)
        raise RootBusy(f"could not take the lease {self.path}: another run is starting on this root")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="vecap-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.read()
                if held is None or held.get("run_id") != self.run_id:
                    log.error("lease %s lost to run %s", self.path, held and held.get("run_id"))
                    return
                self.storage.write_json(self.path, self._record())
            except OSError as err:
                log.warning("lease heartbeat failed: %s", err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.read()
        if held is not None and held.get("run_id") == self.run_id:
            self.storage.remove(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
