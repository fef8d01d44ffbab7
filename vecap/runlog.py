"""Logs on disk under the root, so that a failed run on a cluster leaves something to read.

```
<root>/logs/<run id>/driver.log                   the driver: plan, Ray, shards, summary, errors
<root>/logs/<run id>/worker-<host>-<pid>.log      each Ray worker process of the run (engines, tasks)
```

On local and shared-mount roots the files are written in place (every record flushed).
Object stores have no append: the file is written on local disk and uploaded whole every
``upload_every_s`` and when it closes (the driver's at the end of the run). Ray ends its
worker processes without running their exit handlers, so the workers stage their files in
one folder per run on each machine (:func:`staging_dir`), and at the end of the run the
driver sends one task to every node that uploads that node's staged files and removes
them (:func:`collect_worker_logs`). A run whose driver died keeps its workers' last
periodic uploads; what they staged after stays on the nodes' local disk.

Workers get their log through Ray's ``worker_process_setup_hook`` (every worker process
of the job runs it at start), set up by :func:`worker_runtime_env` when vecap starts or
connects to Ray itself. When Ray was initialised by someone else, the job's workers are
already running and only the driver's log is written.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from vecap.layout import Layout
from vecap.storage import Storage

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that may not propagate to the root logger but belong in the files.
_OWN_HANDLER_LOGGERS = ("ray", "ray.data", "vllm")
_RAY_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"  # Ray's reserved variable: set means a hook exists


class _FileHandler(logging.FileHandler):
    """A file handler on several loggers at once: a record reaching it twice (through a logger
    and its parent) is written once, and its format stays ours (Ray's ``ray.init`` resets the
    formatter of every handler on the ``ray`` logger)."""

    _last: logging.LogRecord | None = None

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        if self.formatter is None:
            super().setFormatter(fmt)

    def _open(self):  # noqa: ANN202 - logging's own signature
        os.makedirs(os.path.dirname(self.baseFilename) or ".", exist_ok=True)
        return super()._open()

    def handle(self, record: logging.LogRecord) -> bool:
        if record is self._last:
            return False
        self._last = record
        return bool(super().handle(record))


class LogFile:
    """A log file under the root, as a logging handler: in place, or staged locally and uploaded."""

    def __init__(
        self,
        storage: Storage,
        path: str,
        upload_every_s: float = 30.0,
        level: int = logging.INFO,
        staged_as: str | None = None,
    ) -> None:
        """``staged_as``: on an object store, the local file to stage in (default: a new temporary file)."""
        self.storage = storage
        self.path = path
        if storage.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.local_path = path
        elif staged_as is not None:
            self.local_path = staged_as  # its folder is made with the file, at the first record
        else:
            fd, self.local_path = tempfile.mkstemp(prefix="vecap-log-", suffix=".log")
            os.close(fd)
        # delay: a worker that never logs leaves no empty file
        self.handler = _FileHandler(self.local_path, encoding="utf-8", delay=True)
        self._uploaded = -1  # size of the last upload
        self.handler.setLevel(level)
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not storage.local:
            self._thread = threading.Thread(
                target=self._upload_loop, args=(upload_every_s,), name="vecap-log", daemon=True
            )
            self._thread.start()

    def _upload_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.upload()

    def upload(self) -> None:
        """Object stores: replace the remote file with what is written so far (one PUT)."""
        if self.storage.local:
            return
        with self._lock:
            if not os.path.exists(self.local_path):
                return  # collected at the end of the run (collect_worker_logs), or not written yet
            try:
                self.handler.flush()
                size = os.path.getsize(self.local_path)
                if size in (0, self._uploaded):
                    return
                with open(self.local_path, "rb") as f:
                    self.storage.write_bytes(self.path, f.read())
                self._uploaded = size
            except Exception as err:  # noqa: BLE001 - a log upload never fails the run
                logging.getLogger(__name__).debug("log upload to %s failed: %s", self.path, err)

    def attach(self, *loggers: logging.Logger) -> None:
        for lg in loggers:
            if self.handler not in lg.handlers:
                lg.addHandler(self.handler)

    def detach(self, *loggers: logging.Logger) -> None:
        for lg in loggers:
            lg.removeHandler(self.handler)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.upload()
        self.handler.close()
        if not self.storage.local:
            with contextlib.suppress(OSError):
                os.unlink(self.local_path)


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(logging.getLogger(n) for n in _OWN_HANDLER_LOGGERS)]


# --- the driver ------------------------------------------------------------------------------
_current: tuple[Storage, str] | None = None  # (storage, log folder) of the run logging in this process
_driver_sink: LogFile | None = None


def file_only(text: str, level: int = logging.INFO) -> None:
    """Write ``text`` to the current run's driver log only (what the CLI prints anyway, e.g. the summary)."""
    if _driver_sink is not None:
        _driver_sink.handler.handle(logging.LogRecord("vecap", level, __file__, 0, "%s", (text,), None))


@contextlib.contextmanager
def driver_log(storage: Storage, layout: Layout, run_id: str) -> Iterator[str]:
    """``<root>/logs/<run id>/driver.log`` for the duration of a run; yields its path.

    Records at INFO and above of every logger that reaches the root logger (and Ray's and
    vLLM's own) go to the file, at the levels the process's logging configuration allows.
    An exception that ends the run is written with its traceback (to the file only: the
    terminal gets the one-line error from the CLI). At the end, the workers' logs staged on
    the nodes are uploaded (object stores, :func:`collect_worker_logs`).
    """
    global _current, _driver_sink
    folder = layout.logs(run_id)
    try:
        sink = LogFile(storage, f"{folder}/driver.log")
    except OSError as err:
        log.warning("no driver log under %s: %s", folder, err)
        yield ""
        return
    loggers = _loggers()
    sink.attach(*loggers)
    previous, _current = _current, (storage, folder)
    previous_sink, _driver_sink = _driver_sink, sink
    try:
        yield sink.path
    except BaseException as err:
        record = logging.LogRecord(
            "vecap", logging.ERROR, __file__, 0, "run %s ended with %s: %s", (run_id, type(err).__name__, err), None
        )
        record.exc_info = (type(err), err, err.__traceback__)
        sink.handler.handle(record)
        raise
    finally:
        with contextlib.suppress(Exception):
            collect_worker_logs()  # object stores: the workers' staged logs, which Ray's exits never upload
        _current, _driver_sink = previous, previous_sink
        sink.detach(*loggers)
        sink.close()


def worker_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """``runtime_env`` plus the hook that gives every worker of the job its log file, when a run logs."""
    if _current is None or os.environ.get(_RAY_HOOK_ENV):
        return runtime_env  # no run logging here, or the job already has a setup hook (ray job submit)
    storage, folder = _current

    def vecap_worker_logging() -> None:
        setup_worker_logging(storage, folder)

    return {**(runtime_env or {}), "worker_process_setup_hook": vecap_worker_logging}


# --- the workers -----------------------------------------------------------------------------
_worker_log: LogFile | None = None


def setup_worker_logging(storage: Storage, folder: str) -> str | None:
    """Attach ``<folder>/worker-<host>-<pid>.log`` to this worker process's loggers (once); its path.

    Warnings still go to stderr too (Ray's own worker logs, and the driver with
    ``ray.log_to_driver``).
    """
    global _worker_log
    if _worker_log is not None:
        return _worker_log.path
    name = f"worker-{socket.gethostname()}-{os.getpid()}.log"
    try:
        _worker_log = LogFile(storage, f"{folder}/{name}", staged_as=os.path.join(staging_dir(folder), name))
    except Exception as err:  # noqa: BLE001 - a worker without its log file still works
        logging.getLogger(__name__).warning("no worker log under %s: %s", folder, err)
        return None
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        stderr = logging.StreamHandler()
        stderr.setLevel(logging.WARNING)
        stderr.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(stderr)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _worker_log.attach(*_loggers())
    atexit.register(_worker_log.close)
    return _worker_log.path


# --- collecting the workers' staged logs (object stores) -------------------------------------
def staging_dir(folder: str) -> str:
    """The local folder in which this machine's workers stage their logs of the run logging to
    ``folder`` (``<root>/logs/<run id>``), named by its hash."""
    name = hashlib.sha256(folder.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "vecap-logs", name)


def upload_staged_logs(storage: Storage, folder: str) -> int:
    """Upload each worker log staged on this machine for the run logging to ``folder`` (whole,
    one PUT each), then remove it; how many. A worker still alive stops uploading once its file
    is gone (its later lines are lost)."""
    staged = staging_dir(folder)
    names = sorted(os.listdir(staged)) if os.path.isdir(staged) else []
    for name in names:
        local = os.path.join(staged, name)
        with open(local, "rb") as f:
            storage.write_bytes(f"{folder.rstrip('/')}/{name}", f.read())
        os.unlink(local)
    for empty in (staged, os.path.dirname(staged)):
        with contextlib.suppress(OSError):
            os.rmdir(empty)
    return len(names)


def collect_worker_logs(timeout_s: float = 120.0) -> int:
    """At the end of a run on an object store: one task on every alive node of the Ray this
    process is connected to uploads and removes that node's staged worker logs; how many files.
    Nothing to do on local roots (written in place) or when this process runs no run's log."""
    if _current is None or _current[0].local:
        return 0
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return 0
    storage, folder = _current
    upload = ray.remote(num_cpus=0, max_retries=2)(upload_staged_logs)
    tasks = [
        upload.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            storage, folder
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]
    if not tasks:
        return 0
    ready, pending = ray.wait(tasks, num_returns=len(tasks), timeout=timeout_s)
    n = 0
    for ref in ready:
        try:
            n += ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a log upload never fails the run
            log.warning("worker logs of a node were not uploaded to %s: %s", folder, err)
    if pending:
        log.warning("worker logs of %d node(s) were not uploaded to %s in %.0f s", len(pending), folder, timeout_s)
    return n
