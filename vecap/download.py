"""Run img2dataset over a URL list with the settings this pipeline needs.

The pipeline reads img2dataset's webdataset output as is (docs/architecture.md, "The on-disk contract") and
copies the original image bytes into its own output, so the download must not resize or
re-encode. img2dataset 1.47.0 can only keep the original bytes with
``disable_all_reencoding=True``; then every image member is named ``<key>.<encode_format>``
whatever the real format is (a PNG arrives as ``<key>.jpg``), ``width``/``height`` are left
null and no size/area/aspect filter runs. Readers must sniff the real format from the bytes
(:func:`vecap.images.sniff_image_format`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from vecap.config import ConfigError  # a ValueError: a bad URL list is the user's input, `vecap` exits 2

log = logging.getLogger(__name__)

# The one place that says how this pipeline calls img2dataset (sample data and `download`).
IMG2DATASET_DEFAULTS: dict[str, Any] = {
    "output_format": "webdataset",  # NNNNN.tar/.parquet/_stats.json: the pipeline's input contract
    "resize_mode": "no",  # never resize (also what happens if reencoding is turned back on)
    "disable_all_reencoding": True,  # keep the server's bytes exactly: no decode, no re-encode
    "encode_format": "jpg",  # only names the tar member; with the line above the bytes stay as served
    "compute_hash": "sha256",  # sha256 of the original bytes, in the .json and the Parquet
    "min_image_size": 0,  # no filters: a sample-level problem becomes a status downstream
    "max_image_area": math.inf,
    "max_aspect_ratio": math.inf,
    "incremental_mode": "incremental",  # a rerun skips shards that have their _stats.json
}

# Options that only have an effect when img2dataset decodes the image; giving one of them
# without saying anything about `disable_all_reencoding` turns reencoding back on.
_DECODING_OPTIONS: dict[str, Any] = {
    "resize_mode": "no",
    "min_image_size": 0,
    "max_image_area": math.inf,
    "max_aspect_ratio": math.inf,
    "bbox_col": None,
}

# img2dataset's input formats, longest suffix first so ".csv.gz" wins over ".gz".
INPUT_FORMATS: tuple[str, ...] = (
    "jsonl.gz",
    "json.gz",
    "csv.gz",
    "tsv.gz",
    "txt.gz",
    "parquet",
    "jsonl",
    "json",
    "csv",
    "tsv",
    "txt",
)


def infer_input_format(url_list: str | Path) -> str:
    """img2dataset's ``input_format`` from a file name (or the files of a folder)."""
    path = Path(url_list)
    if path.is_dir():
        found = {fmt for f in path.iterdir() if f.is_file() and (fmt := _format_of(f.name))}
        if len(found) != 1:
            raise ConfigError(
                f"cannot infer the input format of folder {path}: found formats {sorted(found) or 'none'}; "
                f"pass input_format= (one of {', '.join(INPUT_FORMATS)})"
            )
        return found.pop()
    fmt = _format_of(path.name)
    if fmt is None:
        raise ConfigError(
            f"cannot infer the input format of {path} from its extension; "
            f"pass input_format= (one of {', '.join(INPUT_FORMATS)})"
        )
    return fmt


def _format_of(name: str) -> str | None:
    lower = name.lower()
    return next((fmt for fmt in INPUT_FORMATS if lower.endswith("." + fmt)), None)


def _check_columns(url_list: Path, input_format: str, url_col: str, caption_col: str | None) -> None:
    """Fail early, naming the column, instead of deep inside img2dataset's worker processes."""
    if url_list.is_dir():
        return
    if input_format == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(url_list).names
    elif input_format in ("csv", "tsv"):
        with url_list.open(encoding="utf-8", newline="") as f:
            import csv

            names = next(csv.reader(f, delimiter="," if input_format == "csv" else "\t"), [])
    else:
        return
    missing = [c for c in (url_col, caption_col) if c is not None and c not in names]
    if missing:
        raise ConfigError(f"{url_list}: column(s) {missing} not found; columns are {names}")


def resolve_img2dataset_options(**overrides: Any) -> dict[str, Any]:
    """The pipeline's defaults merged with the caller's options.

    Asking for a resize, a size filter or blurring without mentioning
    ``disable_all_reencoding`` turns reencoding back on (with a warning), since img2dataset
    would otherwise silently ignore the request.
    """
    options = {**IMG2DATASET_DEFAULTS, **overrides}
    if "disable_all_reencoding" not in overrides:
        asked = [k for k, neutral in _DECODING_OPTIONS.items() if k in overrides and overrides[k] != neutral]
        if asked:
            log.warning(
                "img2dataset options %s need decoding: reencoding is turned on, "
                "so images are no longer the original bytes",
                asked,
            )
            options["disable_all_reencoding"] = False
    return options


def download(
    url_list: str | Path,
    output_folder: str | Path,
    *,
    input_format: str | None = None,
    url_col: str = "url",
    caption_col: str | None = "caption",
    processes_count: int | None = None,
    thread_count: int = 32,
    number_sample_per_shard: int = 10000,
    quiet: bool = True,
    **img2dataset_options: Any,
) -> Path:
    """Download a URL list into ``output_folder`` as the pipeline's ``images/`` input.

    `url_list` is a local file (parquet/csv/tsv/json/jsonl/txt, optionally .gz) or a folder
    of such files; any other img2dataset option (``save_additional_columns``, ``timeout``,
    ``retries``, ``distributor``...) is passed through. Returns the output folder.

    img2dataset prints its own progress and per-worker lines; with ``quiet`` they go to
    ``<output_folder>.img2dataset.log`` (beside the folder, which stays as img2dataset writes
    it) and the terminal gets a progress bar of committed shards and our summary.

    img2dataset starts spawned worker processes and installs a SIGINT handler: call this
    from the main thread, and from scripts under ``if __name__ == "__main__":``.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # also inherited by img2dataset's spawned workers

    path = Path(url_list)
    if not path.exists():
        raise ConfigError(f"URL list not found: {path}")
    if input_format is None:
        input_format = infer_input_format(path)
    elif input_format not in INPUT_FORMATS:
        raise ConfigError(f"unknown input_format {input_format!r}; expected one of {', '.join(INPUT_FORMATS)}")
    if input_format.startswith("txt"):
        caption_col = None  # a txt list has URLs only
    _check_columns(path, input_format, url_col, caption_col)

    options = resolve_img2dataset_options(**img2dataset_options)
    options.update(
        url_list=str(path),
        output_folder=str(output_folder),
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col,
        processes_count=processes_count or max(1, os.cpu_count() or 1),
        thread_count=thread_count,
        number_sample_per_shard=number_sample_per_shard,
    )
    log.info("img2dataset %s -> %s (%s)", path, output_folder, {k: options[k] for k in IMG2DATASET_DEFAULTS})

    from img2dataset import download as i2d_download

    out = Path(output_folder)
    if not quiet:
        i2d_download(**options)
    else:
        library_log = out.parent / f"{out.name}.img2dataset.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _shard_progress(_ShardStats(out), _count_urls(path, input_format)), _output_to(library_log):
                i2d_download(**options)
        except BaseException:
            log.error("img2dataset failed; its own output is in %s:\n%s", library_log, _tail(library_log))
            raise
        log.info("img2dataset's own output: %s", library_log)
    _log_summary(out)
    return out


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr, and those of the processes it starts, to ``path``.

    img2dataset prints from its main process and from the worker processes it spawns, so both
    file descriptors 1 and 2 (inherited by the workers) and ``sys.stdout``/``sys.stderr`` (which
    need not write to them, e.g. under pytest) are redirected.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f, open(path, "a", buffering=1, encoding="utf-8", errors="replace") as text:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            with redirect_stdout(text), redirect_stderr(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextmanager
def _shard_progress(stats: _ShardStats, total: int | None) -> Iterator[None]:
    """A progress bar of the samples in committed shards (img2dataset writes ``NNNNN_stats.json``
    last) on the caller's terminal: it writes to a duplicate of descriptor 2 taken on entry, so
    enter it before :func:`_output_to`."""
    from tqdm import tqdm

    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    stop = threading.Event()
    bar = tqdm(total=total, unit="sample", desc="download", file=terminal, mininterval=1.0, smoothing=0.1)

    def poll() -> None:
        while True:
            stopping = stop.wait(2.0)
            bar.update(stats.totals()["count"] - bar.n)
            if stopping:
                return

    thread = threading.Thread(target=poll, name="vecap-download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
        terminal.close()


def _count_urls(url_list: Path, input_format: str) -> int | None:
    """Rows of a Parquet URL list from its footer (free); None for other formats (unknown total)."""
    if input_format != "parquet":
        return None
    import pyarrow.parquet as pq

    files = sorted(url_list.glob("*.parquet")) if url_list.is_dir() else [url_list]
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _ShardStats:
    """Totals over img2dataset's ``NNNNN_stats.json`` files (written last, one per committed shard),
    each file read once however often the totals are asked for (a download can have 30,000)."""

    FIELDS = ("count", "successes", "failed_to_download", "failed_to_resize")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.by_shard: dict[str, dict[str, int]] = {}

    def totals(self) -> dict[str, int]:
        for f in self.folder.glob("*_stats.json") if self.folder.is_dir() else []:
            if f.name in self.by_shard:
                continue
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):  # being written: read at the next call
                continue
            if isinstance(d, dict):
                self.by_shard[f.name] = {k: int(d.get(k) or 0) for k in self.FIELDS}
        return {k: sum(s[k] for s in self.by_shard.values()) for k in self.FIELDS}


def _log_summary(output_folder: Path) -> None:
    """img2dataset only prints; put the totals into our log (a fresh read: the progress bar's tally
    may hold files that img2dataset's overwrite mode deleted)."""
    stats = _ShardStats(output_folder)
    totals = stats.totals()
    log.info("img2dataset wrote %d shard(s) to %s: %s", len(stats.by_shard), output_folder, totals)
