"""Read img2dataset webdataset shards (``NNNNN.tar`` + ``NNNNN.parquet``) as samples.

The tar is untrusted input. Member names are only ever parsed into a key and an
extension, never used as a path; the tar is streamed (``r|``) so a truncated file
yields what it holds. The Parquet beside it is the authoritative key list: keys that
failed to download, or that a broken tar lost, come back as samples with a status,
so every key of the input reaches every stage's output exactly once.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vecap import vocab
from vecap.storage import Storage

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
MAX_TEXT_BYTES = 1 << 20  # alt-text / json members larger than this are cut


@dataclass
class Sample:
    """One key of a shard, with its image bytes when the tar had a usable one."""

    key: str
    status: str = vocab.OK
    error: str | None = None
    image: bytes | None = None
    ext: str | None = None
    alt_text: str | None = None
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # img2dataset's, from its Parquet (of the downloaded bytes)


@dataclass
class ShardReport:
    """What reading one shard found, complete once the iteration has ended."""

    shard: str
    truncated: bool = False
    error: str | None = None
    statuses: Counter = field(default_factory=Counter)
    missing_txt: int = 0
    skipped_members: int = 0
    parquet_error: str | None = None
    io_retries: int = 0


def _join(base: str, name: str) -> str:
    return str(base).rstrip("/") + "/" + name


def list_shards(images_dir: str, suffix: str = ".tar", storage: Storage | None = None) -> list[str]:
    """Shard stems ("00000", ...) of an img2dataset folder, sorted; local paths or URIs."""
    storage = storage or Storage.for_path(str(images_dir))
    names = storage.names(str(images_dir))
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith("."))


def read_parquet_rows(images_dir: str, shard: str, storage: Storage | None = None) -> list[dict[str, Any]]:
    """img2dataset's per-shard Parquet (all rows, failed downloads too); [] when absent."""
    storage = storage or Storage.for_path(str(images_dir))
    path = _join(str(images_dir), f"{shard}.parquet")
    if not storage.exists(path):
        return []
    return storage.read_table(path).to_pylist()


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"000012.jpg"`` → ("000012", "jpg"); None for anything that is not a plain file name."""
    if "/" in name or "\\" in name or "." not in name:
        return None
    key, ext = name.split(".", 1)
    if not _KEY_RE.match(key):
        return None
    return key, ext.lower()


class ShardReader:
    """Iterate the samples of one input shard; ``report`` is filled as it goes.

    >>> reader = ShardReader("data/sample/images", "00000")
    >>> for sample in reader: ...
    >>> reader.report.truncated
    """

    def __init__(
        self, images_dir: str, shard: str, max_image_bytes: int = 32 << 20, storage: Storage | None = None
    ) -> None:
        self.images_dir = str(images_dir)
        self.shard = shard
        self.max_image_bytes = max_image_bytes
        self.storage = storage or Storage.for_path(self.images_dir)
        self.report = ShardReport(shard=shard)

    def __iter__(self) -> Iterator[Sample]:
        import pyarrow as pa

        try:
            rows: dict[str, dict[str, Any]] = {}
            for r in read_parquet_rows(self.images_dir, self.shard, self.storage):
                if r.get("key"):
                    rows.setdefault(str(r["key"]), r)  # a key listed twice: the first row, like the tar's first copy
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            # A corrupt input Parquet costs its key list (failed downloads), not the shard.
            log.warning("shard %s: input Parquet unreadable, keys come from the tar only: %s", self.shard, err)
            self.report.parquet_error = f"{type(err).__name__}: {err}"[:300]
            rows = {}
        seen: set[str] = set()
        for sample in self._tar_samples():
            if sample.key in seen:
                sample.status, sample.error = vocab.DUPLICATE_KEY, "key already seen in this shard"
                sample.image = None
            seen.add(sample.key)
            row = rows.get(sample.key, {})
            sample.url = sample.url or row.get("url")
            sample.sha256 = row.get("sha256") if sample.image is not None else None
            if sample.alt_text is None:
                sample.alt_text = row.get("caption")
            yield self._count(sample)
        for key, row in rows.items():
            if key in seen:
                continue
            if row.get("status") not in (None, "success"):
                status, error = vocab.DOWNLOAD_FAILED, row.get("error_message") or row.get("status")
            elif self.report.truncated:
                status, error = vocab.MISSING_FROM_TAR, f"shard tar unreadable past this point: {self.report.error}"
            else:
                status, error = vocab.MISSING_FROM_TAR, "listed as downloaded but not in the tar"
            yield self._count(
                Sample(key=key, status=status, error=error, alt_text=row.get("caption"), url=row.get("url"))
            )

    def _count(self, sample: Sample) -> Sample:
        self.report.statuses[sample.status] += 1
        return sample

    def _tar_samples(self, io_retries: int = 3) -> Iterator[Sample]:
        """The tar's samples in order. A transient ``OSError`` (a flaky mount, a dropped connection)
        reopens the tar and resumes after the samples already yielded; only a real end of file or
        a corrupt archive is a truncated tar."""
        path = _join(self.images_dir, f"{self.shard}.tar")
        if not self.storage.exists(path):
            self.report.truncated, self.report.error = True, "tar file missing"
            return
        emitted, delay, failures, progress_at = 0, 0.2, 0, -1
        while True:
            try:
                for i, sample in enumerate(self._tar_pass(path)):
                    if i >= emitted:
                        emitted += 1
                        yield sample
                return
            except OSError as err:
                self.report.io_retries += 1
                # A connection that keeps making progress is flaky, not broken: count failures in a row.
                failures = 1 if emitted > progress_at else failures + 1
                progress_at = emitted
                if failures > io_retries:
                    raise
                log.warning(
                    "shard %s: reading the tar failed after %d samples (%s); reopening", self.shard, emitted, err
                )
                time.sleep(delay)
                delay *= 2

    def _tar_pass(self, path: str) -> Iterator[Sample]:
        """One pass over the tar: group consecutive members by key (webdataset order) into Samples."""
        group_key: str | None = None
        group: dict[str, Any] = {}
        try:
            with self.storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        self.report.skipped_members += 1
                        continue
                    parsed = split_member_name(member.name)
                    if parsed is None:
                        # Never used as a path: it becomes a sample that says what was wrong.
                        if group_key is not None:
                            yield self._finish(group_key, group)
                            group_key, group = None, {}
                        yield Sample(
                            key=member.name,
                            status=vocab.INVALID_KEY,
                            error="tar member name is not a plain file name",
                        )
                        continue
                    key, ext = parsed
                    if key != group_key:
                        if group_key is not None:
                            yield self._finish(group_key, group)
                        group_key, group = key, {}
                    if ext in group:
                        group["__duplicate__"] = f"two '{ext}' members"
                    group[ext] = self._read_member(tar, member, ext)
        except (tarfile.TarError, EOFError, ValueError, gzip.BadGzipFile, zlib.error) as err:
            # A truncated or corrupt tar: keep what was complete, report the rest.
            self.report.truncated, self.report.error = True, f"{type(err).__name__}: {err}"
            log.warning("shard %s: tar unreadable after %d keys: %s", self.shard, len(self.report.statuses), err)
            return
        if group_key is not None:
            yield self._finish(group_key, group)

    def _read_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> Any:
        limit = self.max_image_bytes if ext in IMAGE_EXTS else MAX_TEXT_BYTES
        if member.size > limit and ext in IMAGE_EXTS:
            return _TooLarge(member.size)
        f = tar.extractfile(member)
        data = f.read(limit) if f is not None else b""
        if f is not None and len(data) < min(member.size, limit):
            raise EOFError(f"member {member.name} is truncated")
        return data

    def _finish(self, key: str, group: dict[str, Any]) -> Sample:
        sample = Sample(key=key)
        if "txt" in group:
            sample.alt_text = group["txt"].decode("utf-8", errors="replace")
        else:
            self.report.missing_txt += 1
        if "json" in group:
            try:
                meta = json.loads(group["json"])
                sample.meta = meta if isinstance(meta, dict) else {}
            except ValueError:
                sample.meta = {}
            sample.url = sample.meta.get("url") if isinstance(sample.meta.get("url"), str) else None
        images = [ext for ext in group if ext in IMAGE_EXTS]
        if "__duplicate__" in group or len(images) > 1:
            sample.status = vocab.DUPLICATE_KEY
            sample.error = group.get("__duplicate__") or f"several images for one key: {sorted(images)}"
        elif not images:
            sample.status, sample.error = vocab.MISSING_IMAGE, "no image member for this key"
        elif isinstance(group[images[0]], _TooLarge):
            sample.status = vocab.IMAGE_TOO_LARGE
            sample.error = f"{group[images[0]].size} bytes > limit {self.max_image_bytes}"
        else:
            sample.ext, sample.image = images[0], group[images[0]]
        return sample


@dataclass
class _TooLarge:
    size: int


def read_alt_texts(images_dir: str, shard: str, storage: Storage | None = None) -> dict[str, dict[str, Any]]:
    """key → {alt_text, url} without decoding images: the fuse stage's join input.

    Uses the Parquet when present (it has every row), else streams the tar's text members.
    """
    rows = read_parquet_rows(images_dir, shard, storage)
    if rows:
        joined: dict[str, dict[str, Any]] = {}
        for r in rows:  # a key listed twice: the first row, as the reader keeps the tar's first copy
            joined.setdefault(str(r["key"]), {"alt_text": r.get("caption"), "url": r.get("url")})
        return joined
    return {s.key: {"alt_text": s.alt_text, "url": s.url} for s in ShardReader(images_dir, shard, storage=storage)}
