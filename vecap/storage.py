"""One storage layer for every stage: local paths, shared POSIX mounts, ``s3://``, ``gs://``.

Built on fsspec (``s3fs``/``gcsfs`` for object stores, an extra). What fsspec does not
give is the commit protocol, which differs by file system:

- POSIX: write under a private temporary name, fsync, rename into place.
- Object stores have no rename, but a single PUT is atomic: objects are written under
  their final names (large files are staged on local disk and uploaded once complete).

Either way a shard's done marker is written last, so a shard without its marker is not
done and its objects are simply overwritten by the next run. Transient ``OSError`` s
(a flaky mount, a throttled bucket) are retried with back-off; missing files are not.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

T = TypeVar("T")
TMP_MARK = ".tmp-"
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_INSTALL_HINT = {
    "s3": "pip install 'vecap[s3]' (s3fs)",
    "gs": "pip install 'vecap[gcs]' (gcsfs)",
    "gcs": "pip install 'vecap[gcs]' (gcsfs)",
}


def is_uri(path: str) -> bool:
    return "://" in str(path)


def protocol(path: str) -> str:
    return str(path).split("://", 1)[0] if is_uri(path) else "file"


def retry_io(fn: Callable[[], T], what: str, attempts: int = 4, first_delay_s: float = 0.2) -> T:
    """Call ``fn``; retry transient ``OSError`` s with exponential back-off, then re-raise."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except _NOT_TRANSIENT:
            raise
        except OSError as err:
            if attempt == attempts:
                raise
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__, err, attempt, attempts - 1, delay
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class Storage:
    """A file system and its commit protocol. Picklable: Ray tasks receive it as it is.

    Every method takes full paths as :class:`vecap.layout.Layout` gives them (local
    paths or URIs of this file system).
    """

    def __init__(self, fs: Any, *, local: bool) -> None:
        self.fs = fs
        self.local = local

    @classmethod
    def for_path(cls, path: str, options: dict[str, Any] | None = None) -> Storage:
        """The storage that holds ``path`` (``s3://...`` needs s3fs, ``gs://...`` gcsfs)."""
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        try:
            fs, _ = fsspec.core.url_to_fs(str(path), **(options or {}))
        except (ImportError, ValueError) as err:
            hint = _INSTALL_HINT.get(protocol(path))
            raise ImportError(f"cannot open {path}: {err}" + (f" — install it with: {hint}" if hint else "")) from None
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        return cls(fs, local=isinstance(fs, LocalFileSystem) and bool({"file", "local"} & set(protocols)))

    # --- reading ------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        def exists() -> bool:
            self.fs.invalidate_cache(path)
            return self.fs.exists(path)

        return retry_io(exists, f"exists {path}")

    def names(self, folder: str) -> list[str]:
        """File and folder names directly under ``folder``; [] when it does not exist."""

        def ls() -> list[str]:
            self.fs.invalidate_cache(folder)  # other processes write here: never trust a cached listing
            try:
                entries = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                return []
            return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries})

        return retry_io(ls, f"list {folder}")

    def read_bytes(self, path: str) -> bytes:
        return retry_io(lambda: self.fs.cat_file(path), f"read {path}")

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(path)), columns=columns)

    def read_schema(self, path: str) -> pa.Schema:
        """A Parquet file's schema, from its footer alone."""

        def read() -> pa.Schema:
            with self.fs.open(path, "rb") as f:
                return pq.read_schema(f)

        return retry_io(read, f"read schema {path}")

    def open_read(self, path: str):
        """A binary file object for streaming (tars); the caller handles errors mid-stream."""
        return retry_io(lambda: self.fs.open(path, "rb"), f"open {path}")

    # --- writing ------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically replace ``path`` with ``data`` (rename on POSIX, one PUT on object stores)."""
        if not self.local:
            retry_io(lambda: self.fs.pipe_file(path, data), f"write {path}")
            return

        def write() -> None:
            with self.staged(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)

        retry_io(write, f"write {path}")

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_table(self, path: str, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write_bytes(path, buf.getvalue().to_pybytes())

    @contextlib.contextmanager
    def staged(self, path: str) -> Iterator[str]:
        """Yield a local file path to write; on success it becomes ``path`` at once.

        POSIX: a hidden temporary file beside ``path``, fsynced and renamed. Object stores:
        a local temporary file uploaded in one piece. On error nothing appears at ``path``.
        """
        if self.local:
            folder, name = os.path.split(path)
            os.makedirs(folder or ".", exist_ok=True)
            tmp = os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        else:
            fd, tmp = tempfile.mkstemp(prefix="vecap-upload-")
            os.close(fd)
        try:
            yield tmp
            if self.local:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_dir(os.path.dirname(path) or ".")
            else:
                retry_io(lambda: self.fs.put_file(tmp, path), f"upload {path}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if it does not exist (the lease); False if it already does.

        POSIX: ``O_EXCL``. Object stores: a conditional PUT (If-None-Match) where fsspec's
        implementation offers it (s3fs, gcsfs), else a check-then-write (said in the log).
        """
        if self.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:
            log.warning("%s has no conditional writes: the lease is check-then-write", type(self.fs).__name__)
            if self.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True
        except OSError as err:  # e.g. 412 Precondition Failed surfaced as a generic error
            if "precondition" in str(err).lower() or "412" in str(err):
                return False
            raise

    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file (or a folder with ``recursive``); a missing one is fine."""

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        retry_io(rm, f"remove {path}")

    def remove_temps(self, folder: str) -> int:
        """Delete temporary files left in ``folder`` by killed writers (POSIX only); returns how many.

        Call it only while holding the root's lease: then no live writer owns them.
        """
        if not self.local or not os.path.isdir(folder):
            return 0
        stale = [n for n in os.listdir(folder) if n.startswith(".") and TMP_MARK in n]
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
        return len(stale)


def _fsync_dir(path: str) -> None:
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
