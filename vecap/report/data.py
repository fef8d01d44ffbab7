"""The report's data: what a dataset root holds, read once into one :class:`ReportData`.

``vecap report`` renders it (:mod:`vecap.report.render`), ``vecap inspect`` prints parts of
it, and the tests compare it with the files. Nothing here produces markup: every value is
the untrusted text as it was read, and escaping is the template's job.

Reads the layout of :mod:`vecap.layout` through :class:`vecap.storage.Storage`, so a root
may be local or ``s3://``/``gs://``. The rows come from the most advanced stage that has a
committed shard (``vecap/``, else ``fused/``, else ``captions/``, else the img2dataset
``images/`` Parquet); done shards are the markers in ``<stage>/_done/``. The ``q_*`` columns
and rejection reasons (:class:`StageQuality`) are read from each stage's own Parquet, since the
``vecap/`` rows do not carry them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import statistics
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from os import PathLike
from typing import Any, Literal

import pyarrow as pa

from vecap import vocab
from vecap.layout import DONE_DIR, STAGE_DIRS, Layout
from vecap.outputs import StageOutput, check_layout
from vecap.stats import ShardStats
from vecap.storage import Storage

log = logging.getLogger(__name__)

READ_ORDER = (vocab.WRITE, vocab.FUSE, vocab.CAPTION)  # the rows of the first of these with a done shard are read
THUMB_SIDE = 160
MAX_THUMB_SOURCE_BYTES = 32 << 20  # tar members larger than this get no thumbnail
NULL = "null"  # how a missing value is counted
QUALITY_PREFIX = "q_"  # optional quality columns (scores, flags) added by later helpers
CAPTION_COLUMNS = ("alt_text", "vlm_caption", "vec_caption")
COLUMNS = (
    "key", "shard", "url", "alt_text", "vlm_caption", "vec_caption", "vec_source", "txt", "txt_source",
    "image_ext", "width", "height", "status", "reason", "error",
    "caption_model", "caption_prompt_id", "fuse_model", "fuse_prompt_id", "model", "prompt_id",
)  # fmt: skip
_ROW_COLUMNS = tuple(c for c in COLUMNS if c not in ("model", "prompt_id"))
_QUALITY_BINS = 10
QUANTILES = (("p5", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95))  # pandas' "linear"
QUALITY_STEPS = vocab.STAGES  # stages whose Parquet may hold q_* columns, in pipeline order
N_EXAMPLES = 3  # examples shown per rejection reason


# --- value objects ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """One model a step used: from the run's fingerprints, else counted in the Parquet."""

    step: str
    model: str
    prompt_id: str
    note: str


@dataclass(frozen=True)
class LengthSummary:
    n: int
    n_nonempty: int
    mean: float | None
    median: float | None
    max: int | None


@dataclass(frozen=True)
class LengthHistograms:
    """Words per caption of each column on shared bins; the last bin holds longer ones when ``overflow``."""

    edges: list[int]  # lower bound of each bin
    width: int  # words per bin
    overflow: bool
    ymax: int  # the tallest bin over all columns (one y-scale for all)
    counts: dict[str, list[int]]
    summaries: dict[str, LengthSummary]


@dataclass(frozen=True)
class Retention:
    """Alt-text entities (``vecap.validation.entities``) found in ``column`` over ``rows_with_entities`` rows."""

    ident: str
    label: str
    column: str
    rows_with_entities: int
    kept: int
    total: int


@dataclass(frozen=True)
class QualityColumn:
    """The distribution of one optional ``q_*`` column: a histogram if numeric, else value counts."""

    name: str
    kind: Literal["numeric", "categorical"]
    n: int
    n_null: int
    values: Counter = field(default_factory=Counter)  # categorical
    edges: list[float] = field(default_factory=list)  # numeric: lower bounds, then the upper bound
    counts: list[int] = field(default_factory=list)  # numeric: rows per bin
    mean: float | None = None
    median: float | None = None
    min: float | None = None
    max: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)  # numeric: p5 … p95 (pandas' linear interpolation)


@dataclass(frozen=True)
class RejectionExample:
    """One rejected row: ``text`` is the rejected output when the Parquet keeps it (the VLM caption of a
    ``caption_rejected`` row; the fused Parquet keeps only the fallback, in ``fallback``)."""

    key: str
    shard: str
    detail: str  # the error after "<reason>: "
    text: str | None
    alt_text: str | None
    fallback: str | None = None  # fuse: the VeC caption used instead
    fallback_source: str | None = None  # fuse: its vec_source (vlm, alt; None: no text)


@dataclass(frozen=True)
class Rejection:
    """One rejection reason of a stage: its rows and up to :data:`N_EXAMPLES` of them (by :func:`example_rank`)."""

    reason: str
    n: int
    examples: list[RejectionExample]


@dataclass(frozen=True)
class StageQuality:
    """The ``q_*`` columns and rejections of one stage's committed Parquet (``captions/``, ``fused/``, ``vecap/``)."""

    step: str
    folder: str
    n_rows: int
    n_shards: int
    columns: list[QualityColumn]
    rejections: list[Rejection]  # most frequent first

    @property
    def n_rejected(self) -> int:
        return sum(r.n for r in self.rejections)

    def rejection_counts(self) -> Counter:
        return Counter({r.reason: r.n for r in self.rejections})


# --- pure helpers (shared with vecap inspect) -------------------------------------------
def count_values(rows: Iterable[dict[str, Any]], column: str) -> Counter:
    """Rows per value of ``column`` (``"null"`` for a missing value), as strings."""
    return Counter(NULL if r.get(column) is None else str(r.get(column)) for r in rows)


def sum_markers(markers: dict[str, dict[str, Any]], name: str) -> Counter:
    """``{value: n}`` maps under ``name`` (``statuses``, ``fallbacks``, ``caption_sources``) summed over
    markers, as :class:`vecap.stats.ShardStats` reads them."""
    total = ShardStats.total(m for _, m in sorted(markers.items()) if isinstance(m, dict))
    return Counter({k: int(v) for k, v in getattr(total, name).items()})


def words(text: str | None) -> int:
    """Words of a caption, as the validator counts them (CJK and Thai by characters):
    ``vecap.validation.word_count``."""
    from vecap.validation import word_count

    return word_count(text)


def quality_columns(rows: list[dict[str, Any]]) -> list[QualityColumn]:
    """Distributions of every ``q_*`` column present in ``rows`` (none required)."""
    names = sorted({k for r in rows for k in r if k.startswith(QUALITY_PREFIX)})
    return [_quality(name, [r.get(name) for r in rows]) for name in names]


def _quality(name: str, values: list[Any]) -> QualityColumn:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    numeric = [float(v) for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not present or len(numeric) < len(present):
        return QualityColumn(name, "categorical", len(values), len(values) - len(present),
                             values=Counter(str(v) for v in present))  # fmt: skip
    lo, hi = min(numeric), max(numeric)
    ordered = sorted(numeric)
    n_bins = _QUALITY_BINS if hi > lo else 1
    step = (hi - lo) / n_bins if hi > lo else 1.0
    counts = [0] * n_bins
    for v in numeric:
        counts[min(int((v - lo) / step), n_bins - 1)] += 1
    return QualityColumn(
        name, "numeric", len(values), len(values) - len(present),
        edges=[lo + i * step for i in range(n_bins + 1)], counts=counts,
        mean=statistics.fmean(numeric), median=statistics.median(numeric), min=lo, max=hi,
        quantiles={label: quantile(ordered, p) for label, p in QUANTILES},
    )  # fmt: skip


def quantile(ordered: list[float], p: float) -> float:
    """The ``p`` quantile of sorted values, interpolated linearly (numpy's and pandas' default)."""
    h = (len(ordered) - 1) * p
    i = math.floor(h)
    if i + 1 >= len(ordered):
        return ordered[-1]
    a, b, t = ordered[i], ordered[i + 1], h - i
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # numpy's lerp, rounded as numpy does


def example_rank(shard: str, key: str) -> str:
    """The order in which rejected rows become examples: a hash, so they spread over shards, stable across runs."""
    return hashlib.blake2b(f"{shard}/{key}".encode(), digest_size=8).hexdigest()


def rejection_reason(step: str, status: str | None, reason: str | None, vec_source: str | None) -> str | None:
    """The check that rejected a row's model output (its ``reason``), or None if validation did not.

    caption: status ``caption_rejected``. fuse: a fallback (``vec_source`` vlm/alt, or ``no_text``)
    whose reason is not an engine failure or a missing source (``vocab.NOT_REJECTIONS``).
    """
    reason = reason or "unknown"
    if step == vocab.CAPTION:
        return reason if status == vocab.CAPTION_REJECTED else None
    if step == vocab.FUSE and (vec_source in vocab.FALLBACK_SOURCES or status == vocab.NO_TEXT):
        return None if reason in vocab.NOT_REJECTIONS else reason
    return None


def length_histograms(rows: list[dict[str, Any]], columns: Iterable[str] = CAPTION_COLUMNS) -> LengthHistograms:
    """Word counts of ``columns`` on the same bins (empty = 0 words).

    Bins cover up to the 98th percentile of all lengths, about 20 of them; longer captions
    go to a last "≥" bin, so one runaway output does not flatten the rest.
    """
    lengths = {c: [words(r.get(c)) for r in rows] for c in columns}
    every = sorted(v for vs in lengths.values() for v in vs)
    top = every[int(0.98 * (len(every) - 1))] if every else 0
    width = max(1, math.ceil((top + 1) / 20))
    n_bins = top // width + 1
    overflow = bool(every) and every[-1] >= n_bins * width
    edges = [i * width for i in range(n_bins + overflow)]
    counts = {}
    for column, values in lengths.items():
        bins = [0] * len(edges)
        for v in values:
            bins[min(v // width, len(edges) - 1)] += 1
        counts[column] = bins
    summaries = {}
    for column, values in lengths.items():
        present = [v for v in values if v]
        summaries[column] = LengthSummary(
            n=len(values), n_nonempty=len(present),
            mean=statistics.fmean(present) if present else None,
            median=statistics.median(present) if present else None,
            max=max(present) if present else None,
        )  # fmt: skip
    ymax = max((max(b) for b in counts.values() if b), default=0)
    return LengthHistograms(edges, width, overflow, ymax, counts, summaries)


def entity_retention(rows: list[dict[str, Any]]) -> list[Retention]:
    """Alt-text entity retention of the VeC and VLM captions, over all rows and over fused ones."""
    from vecap.validation import entity_counts

    fused = [r for r in rows if r.get("vec_source") == vocab.FUSED_SOURCE]
    lines = [
        ("vec_all", "VeC caption, all rows", rows, "vec_caption"),
        ("vec_fused", "VeC caption, vec_source = fused", fused, "vec_caption"),
        ("vlm_all", "VLM caption, all rows (comparison)", rows, "vlm_caption"),
        ("vlm_fused", "VLM caption, vec_source = fused rows", fused, "vlm_caption"),
    ]
    out = []
    for ident, label, subset, column in lines:
        kept = total = n = 0
        for r in subset:
            k, t = entity_counts(r.get("alt_text") or "", r.get(column) or "")
            if t:
                kept, total, n = kept + k, total + t, n + 1
        out.append(Retention(ident, label, column, n, kept, total))
    return out


# --- the report's data ------------------------------------------------------------------
@dataclass
class ReportData:
    """Everything the report shows about one root; the rows are normalised to the ``vecap`` columns.

    ``stage`` is the step whose rows were read (``write``, ``fuse``, ``caption``) or ``images``;
    ``done``/``markers`` cover every step; ``samples`` are the rows picked for cards and
    ``thumbnails`` maps their ``(shard, key)`` to a ``data:image/jpeg;base64,`` URI made here.
    """

    root: str
    stage: str
    shards: list[str]
    rows: list[dict[str, Any]]
    done: dict[str, list[str]] = field(default_factory=dict)
    markers: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    run_path: str | None = None
    sizes: dict[str, int] | None = None
    tars: list[str] = field(default_factory=list)
    models: list[ModelInfo] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    thumbnails: dict[tuple[str, str], str] = field(default_factory=dict)
    stage_quality: list[StageQuality] = field(default_factory=list)  # per stage with q_* columns or rejections

    @property
    def folder(self) -> str:
        """The folder the rows were read from (``vecap``, ``fused``, ``captions``, ``images``)."""
        return STAGE_DIRS.get(self.stage, self.stage)

    @cached_property
    def ok_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == vocab.OK]

    @cached_property
    def failed_rows(self) -> list[dict[str, Any]]:
        """Rows whose status is not ok, by key."""
        return sorted((r for r in self.rows if r.get("status") != vocab.OK), key=lambda r: (r["key"], r["shard"]))

    def counts(self, column: str) -> Counter:
        return count_values(self.rows, column)

    def fallback_reasons(self) -> Counter:
        """The ``reason`` of rows whose VeC caption fell back to the VLM caption or the alt-text."""
        return count_values((r for r in self.rows if r.get("vec_source") in vocab.FALLBACK_SOURCES), "reason")

    def marker_totals(self, step: str, name: str) -> Counter | None:
        """``name`` (``statuses``, ``fallbacks``) summed over a step's done markers; None if no marker has it."""
        markers = self.markers.get(step)
        if not markers or not any(name in m for m in markers.values()):
            return None
        return sum_markers(markers, name)

    @property
    def n_in_tars(self) -> int | None:
        """Samples in the CLIP tars according to ``clip/sizes.json`` (None without one)."""
        return sum(self.sizes.values()) if self.sizes is not None else None

    @cached_property
    def lengths(self) -> LengthHistograms:
        return length_histograms(self.ok_rows)

    @cached_property
    def retention(self) -> list[Retention]:
        return entity_retention(self.ok_rows)

    @cached_property
    def n_with_alt_entities(self) -> int:
        from vecap.validation import entities

        return sum(1 for r in self.ok_rows if entities(r.get("alt_text") or ""))


def load_report_data(
    root: str | PathLike[str], n_samples: int = 48, thumbnails: bool = True, storage: Storage | None = None
) -> ReportData:
    """Read ``root`` (a local path or a URI) into a :class:`ReportData`.

    ``n_samples`` ok rows (the first by key) become ``samples``; ``thumbnails=False``
    skips reading images (what ``vecap inspect`` wants). Raises ``FileNotFoundError``
    when the root holds no committed shard and no input, and
    :class:`vecap.outputs.LegacyLayoutError` (saying to run ``vecap migrate``) for a
    root of the old layout.
    """
    layout = Layout(str(root))
    storage = storage or Storage.for_path(layout.root)
    check_layout(layout, storage)
    done = {step: done_shards(storage, layout, step) for step in READ_ORDER}
    markers = {step: read_markers(storage, layout, step, shards) for step, shards in done.items() if shards}
    stage, shards, rows = _read_rows(storage, layout, done)
    run, run_path = _run_info(storage, layout)
    data = ReportData(
        root=layout.root, stage=stage, shards=shards, rows=rows, done=done, markers=markers,
        run=run, run_path=run_path, sizes=_sizes(storage, layout),
        tars=sorted(n[:-4] for n in storage.names(layout.clip) if n.endswith(".tar") and not n.startswith(".")),
    )  # fmt: skip
    data.models = _models(data)
    data.stage_quality = [
        q for step in QUALITY_STEPS if done.get(step)
        for q in [read_stage_quality(storage, layout, step, done[step])] if q.n_rows and (q.columns or q.rejections)
    ]  # fmt: skip
    data.samples = sorted(data.ok_rows, key=lambda r: (r["key"], r["shard"]))[: max(n_samples, 0)]
    if thumbnails and data.samples:
        data.thumbnails = _thumbnails(storage, layout, data.samples)
    log.info("%s: %d rows of %s/ in %d shard(s)", layout.root, len(rows), data.folder, len(shards))
    return data


# --- reading ----------------------------------------------------------------------------
def done_shards(storage: Storage, layout: Layout, step: str) -> list[str]:
    """Committed shards of a step: a marker in ``_done/`` and the Parquet beside it."""
    markers = {n[:-5] for n in storage.names(layout.done_dir(step)) if n.endswith(".json") and not n.startswith(".")}
    if not markers:
        return []
    parquets = {n[:-8] for n in storage.names(layout.stage(step)) if n.endswith(".parquet")}
    missing = markers - parquets
    if missing:
        log.warning(
            "%s: %d marker(s) without Parquet (e.g. %s), ignored", layout.stage(step), len(missing), min(missing)
        )
    return sorted(markers & parquets)


def read_markers(storage: Storage, layout: Layout, step: str, shards: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each done shard's marker JSON (its stats); an unreadable one is logged and left out."""
    return StageOutput(layout, step, storage).markers(shards)


def read_rows(storage: Storage, path: str) -> list[dict[str, Any]]:
    """The report's columns (and any ``q_*``) of one Parquet file, as dicts."""
    table = storage.read_table(path)
    names = [c for c in table.column_names if c in COLUMNS or c.startswith(QUALITY_PREFIX)]
    return table.select(names).to_pylist()


def read_stage_quality(storage: Storage, layout: Layout, step: str, shards: Iterable[str]) -> StageQuality:
    """The ``q_*`` distributions and rejection reasons of a stage's done shards.

    Reads only ``key``, ``status``, ``reason``, ``vec_source`` and the ``q_*`` columns of each
    shard, then the text columns of the few rows picked as examples (and, for ``captions/``,
    their alt-text from ``images/``). A ``q_*`` column absent from some shards counts as null there.
    """
    from vecap.reader import read_parquet_rows

    shards = list(shards)
    values: dict[str, list[Any]] = {}
    n_rows = 0
    counts: Counter = Counter()
    picked: dict[str, list[tuple[str, str, int]]] = defaultdict(list)  # reason → (rank, shard, row index)
    texts = ("error", "vlm_caption", "alt_text", "vec_caption", "vec_source")
    examples: dict[tuple[str, int], dict[str, Any]] = {}
    n_read = 0
    for shard in shards:
        path = layout.parquet(step, shard)
        try:
            pf = _parquet_file(storage, path)
            names = pf.schema_arrow.names
            q_names = [n for n in names if n.startswith(QUALITY_PREFIX)]
            base = [c for c in ("key", "status", "reason", "vec_source") if c in names]
            table = pf.read(columns=base + q_names)
        except (OSError, pa.ArrowException) as err:
            log.warning("%s unreadable, left out of the quality section: %s", path, err)
            continue
        n_read += 1
        for name in q_names:
            values.setdefault(name, [None] * n_rows).extend(table[name].to_pylist())
        n_rows += table.num_rows
        for column in values.values():
            column.extend([None] * (n_rows - len(column)))
        if step not in (vocab.CAPTION, vocab.FUSE):
            continue
        cols = {
            c: table[c].to_pylist() if c in base else [None] * table.num_rows
            for c in ("key", "status", "reason", "vec_source")
        }
        shard_picks: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for i, (key, status, why, source) in enumerate(
            zip(cols["key"], cols["status"], cols["reason"], cols["vec_source"], strict=True)
        ):
            reason = rejection_reason(step, status, why, source)
            if reason is not None:
                counts[reason] += 1
                shard_picks[reason].append((example_rank(shard, str(key)), shard, i))
        wanted = []
        for reason, cands in shard_picks.items():
            merged = sorted(picked[reason] + sorted(cands)[:N_EXAMPLES])[:N_EXAMPLES]
            picked[reason] = merged
            wanted += [i for _, s, i in merged if s == shard]
        if wanted:  # the text of this shard's candidates (a later shard may displace them)
            rows = pf.read(columns=["key"] + [c for c in texts if c in names]).take(sorted(wanted)).to_pylist()
            alts = {}
            if step == vocab.CAPTION:
                alts = {str(r["key"]): r.get("caption") for r in read_parquet_rows(layout.images, shard, storage)}
            for i, row in zip(sorted(wanted), rows, strict=True):
                row.setdefault("alt_text", alts.get(str(row["key"])))
                examples[(shard, i)] = row
    rejections = []
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = []
        for _, shard, i in picked[reason]:
            row = examples[(shard, i)]
            detail = row.get("error") or ""
            fuse = step == vocab.FUSE
            shown.append(RejectionExample(
                key=str(row["key"]), shard=shard, detail=detail, text=None if fuse else row.get("vlm_caption"),
                alt_text=row.get("alt_text"), fallback=row.get("vec_caption") if fuse else None,
                fallback_source=row.get("vec_source") if fuse else None,
            ))  # fmt: skip
        rejections.append(Rejection(reason, n, shown))
    columns = [_quality(name, column) for name, column in sorted(values.items())]
    return StageQuality(step, STAGE_DIRS[step], n_rows, n_read, columns, rejections)


def _parquet_file(storage: Storage, path: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(storage.read_bytes(path)))


def _normalise(row: dict[str, Any], step: str, shard: str) -> dict[str, Any]:
    """A row of any stage → the ``vecap`` column names (missing ones None), ``q_*`` kept."""
    out = {c: row.get(c) for c in _ROW_COLUMNS}
    out.update({k: v for k, v in row.items() if k.startswith(QUALITY_PREFIX)})
    out["shard"] = row.get("shard") or shard
    out["key"] = str(row.get("key"))
    if step in (vocab.CAPTION, vocab.FUSE):  # one model per stage: map its provenance columns
        out[f"{step}_model"] = row.get("model")
        out[f"{step}_prompt_id"] = row.get("prompt_id")
    return out


def _read_rows(
    storage: Storage, layout: Layout, done: dict[str, list[str]]
) -> tuple[str, list[str], list[dict[str, Any]]]:
    from vecap.reader import read_parquet_rows

    for step in READ_ORDER:
        shards = done[step]
        if not shards:
            continue
        rows = [_normalise(r, step, s) for s in shards for r in read_rows(storage, layout.parquet(step, s))]
        if step == vocab.CAPTION:  # the captions stage has no alt-text: join it from images/
            by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in rows:
                by_shard[row["shard"]].append(row)
            for shard, shard_rows in by_shard.items():
                inputs = {str(r["key"]): r for r in read_parquet_rows(layout.images, shard)}
                for row in shard_rows:
                    src = inputs.get(row["key"], {})
                    row["alt_text"], row["url"] = src.get("caption"), src.get("url")
        return step, shards, rows
    shards = sorted(n[:-8] for n in storage.names(layout.images) if n.endswith(".parquet") and not n.startswith("."))
    rows = []
    for shard in shards:
        for r in read_parquet_rows(layout.images, shard):
            ok = r.get("status") in (None, "success")
            rows.append({
                **{c: None for c in _ROW_COLUMNS},
                "key": str(r.get("key")), "shard": shard, "url": r.get("url"), "alt_text": r.get("caption"),
                "status": vocab.OK if ok else vocab.DOWNLOAD_FAILED,
                "reason": None if ok else vocab.DOWNLOAD_FAILED,
                "error": None if ok else (r.get("error_message") or r.get("status")),
            })  # fmt: skip
    if not shards:
        folders = ", ".join(f"{STAGE_DIRS[s]}/{DONE_DIR}/" for s in READ_ORDER)
        raise FileNotFoundError(f"{layout.root}: no done marker in {folders} and no images/*.parquet")
    return vocab.FROM_IMAGES, shards, rows


def _run_info(storage: Storage, layout: Layout) -> tuple[dict[str, Any], str | None]:
    """The newest stage's ``_run.json`` and its path relative to the root (({}, None) when none)."""
    for step in READ_ORDER:
        path = layout.run_file(step)
        try:
            if not storage.exists(path):
                continue
            data = storage.read_json(path)
        except (OSError, ValueError) as err:
            log.warning("%s unreadable: %s", path, err)
            continue
        if isinstance(data, dict):
            return data, f"{STAGE_DIRS[step]}/{path.rsplit('/', 1)[-1]}"
    return {}, None


def _sizes(storage: Storage, layout: Layout) -> dict[str, int] | None:
    """``clip/sizes.json`` (tar name → samples); None when absent or unreadable."""
    try:
        if not storage.exists(layout.sizes):
            return None
        sizes = storage.read_json(layout.sizes)
        return {str(k): int(v) for k, v in sizes.items()}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        log.warning("%s unreadable: %s", layout.sizes, err)
        return None


def _models(data: ReportData) -> list[ModelInfo]:
    """Models per step, from ``_run.json`` fingerprints else counted in the rows.

    A fingerprint counts only for a step that ran (it has done shards, or the write stage was read).
    """
    fingerprints = data.run.get("fingerprints")
    prints: dict[str, Any] = fingerprints if isinstance(fingerprints, dict) else {}
    out = []
    for step in (vocab.CAPTION, vocab.FUSE):
        fp = prints.get(step)
        ran = data.stage == vocab.WRITE or bool(data.done.get(step))
        if ran and isinstance(fp, dict) and fp.get("model"):
            sha = str(fp.get("prompt_sha256") or "")[:12]
            out.append(
                ModelInfo(
                    step, str(fp["model"]), str(fp.get("prompt_id") or ""), f"prompt sha256 {sha}…" if sha else ""
                )
            )
            continue
        pairs = Counter(
            (r.get(f"{step}_model"), r.get(f"{step}_prompt_id")) for r in data.rows if r.get(f"{step}_model")
        )
        for (model, prompt), n in pairs.most_common():
            out.append(ModelInfo(step, str(model), str(prompt or ""), f"{n} rows (Parquet)"))
    return out


# --- images -----------------------------------------------------------------------------
def thumbnail_uri(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """Image bytes (any format PIL reads) → a ``data:image/jpeg;base64,`` thumbnail; None if unreadable.

    Re-encoding is the point: the page never embeds the untrusted bytes (or their MIME type) as they came.
    """
    import base64
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as src:
            src.draft("RGB", (side * 2, side * 2))  # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(src)
            if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            elif im.mode.startswith("I;16") or im.mode == "I":
                im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
    except Exception as err:  # untrusted bytes: anything PIL raises means "no thumbnail"
        log.debug("no thumbnail: %s: %s", type(err).__name__, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _from_clip_tar(storage: Storage, path: str, wanted: dict[str, str]) -> dict[str, bytes]:
    """Bytes of the members named in ``wanted`` (member name → key); names are never used as paths."""
    found: dict[str, bytes] = {}
    try:
        with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                key = wanted.get(member.name)
                if key is None or not member.isfile() or member.size > MAX_THUMB_SOURCE_BYTES:
                    continue
                extracted = tar.extractfile(member)
                if extracted is not None:
                    found[key] = extracted.read()
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, OSError) as err:
        log.warning("%s unreadable after %d images: %s", path, len(found), err)
    return found


def _from_images_shard(images_dir: str, shard: str, keys: set[str]) -> dict[str, bytes]:
    """Bytes of ``keys``'s images from an img2dataset shard, via :class:`vecap.reader.ShardReader`."""
    from vecap.reader import ShardReader

    found: dict[str, bytes] = {}
    for sample in ShardReader(images_dir, shard, max_image_bytes=MAX_THUMB_SOURCE_BYTES):
        if sample.key in keys and sample.image:
            found[sample.key] = sample.image
            if len(found) == len(keys):
                break
    return found


def _thumbnails(storage: Storage, layout: Layout, picks: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(shard, key) → thumbnail URI for the picked rows: the CLIP tar first, then images/."""
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in picks:
        by_shard[row["shard"]].append(row)
    out: dict[tuple[str, str], str] = {}
    for shard, rows in sorted(by_shard.items()):
        data: dict[str, bytes] = {}
        wanted = {f"{r['key']}.{r['image_ext']}": r["key"] for r in rows if r.get("image_ext")}
        if wanted and storage.exists(layout.tar(shard)):
            data = _from_clip_tar(storage, layout.tar(shard), wanted)
        missing = {r["key"] for r in rows} - set(data)
        if missing and storage.exists(f"{layout.images}/{shard}.tar"):
            data.update(_from_images_shard(layout.images, shard, missing))
        for key, raw in data.items():
            uri = thumbnail_uri(raw)
            if uri:
                out[(shard, key)] = uri
    log.info("thumbnails: %d of %d samples", len(out), len(picks))
    return out
