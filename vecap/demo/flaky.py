"""A local file system that fails now and then: ``flaky:///path`` (for tests of transient I/O).

Each read, write, listing or existence check raises ``OSError`` with probability
``fail_rate`` (reads may also fail halfway through a file), as a flaky mount or a
throttled bucket does. It behaves as an object store (no rename), so the pipeline
uses its object-store commit protocol on it.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)
    root_marker = "/"

    def __init__(self, fail_rate: float = 0.1, seed: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("auto_mkdir", True)  # as object stores: no folders to make first
        super().__init__(**kwargs)
        self.fail_rate = fail_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.failures = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return LocalFileSystem._strip_protocol(path)

    def _maybe_fail(self, what: str, path: Any) -> None:
        with self._lock:
            fail = self._rng.random() < self.fail_rate
            self.failures += fail
        if fail:
            raise OSError(5, f"flaky storage: {what} failed (injected)", str(path))

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail("read", path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self._maybe_fail("write", path)
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def put_file(self, lpath, rpath, callback=None, mode="overwrite", **kwargs):
        self._maybe_fail("upload", rpath)
        return super().put_file(lpath, rpath, callback=callback, mode=mode, **kwargs)

    def ls(self, path, detail=False, **kwargs):
        self._maybe_fail("list", path)
        return super().ls(path, detail=detail, **kwargs)

    def exists(self, path, **kwargs):
        self._maybe_fail("stat", path)
        return super().exists(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self._maybe_fail("open", path)
        f = super()._open(path, mode=mode, **kwargs)
        return _FlakyReader(f, self) if "r" in mode else f


class _FlakyReader:
    """A file whose reads fail now and then (halfway through a tar, say)."""

    def __init__(self, f: Any, fs: FlakyFileSystem) -> None:
        self._f = f
        self._fs = fs

    def read(self, *args: Any) -> bytes:
        self._fs._maybe_fail("read", getattr(self._f, "path", "?"))  # noqa: SLF001
        return self._f.read(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FlakyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def register() -> None:
    """Make ``flaky://`` known to fsspec in this process."""
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
