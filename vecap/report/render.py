"""The report's presentation: :class:`~vecap.report.data.ReportData` → one self-contained HTML page.

All markup lives in ``templates/report.html.j2``, rendered by Jinja2 with autoescaping on:
values from the files (captions, keys, errors, model names) reach the page only as escaped
text, never through ``|safe`` or markup built here. This module only turns the data into
plain values (numbers, strings, lists) the template lays out. The only URLs on the page
are thumbnails made by :func:`vecap.report.data.thumbnail_uri`; any other ``src`` is dropped.
The page's own small script (``templates/probe.js``: counts loaded images and script
errors for the browser test) is allowed by its hash in a Content-Security-Policy that
blocks every other script, inline handler and external resource.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import unicodedata
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vecap import vocab
from vecap.report.data import (
    CAPTION_COLUMNS,
    NULL,
    QUANTILES,
    LengthHistograms,
    QualityColumn,
    ReportData,
    StageQuality,
    load_report_data,
)

if TYPE_CHECKING:
    import jinja2

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
PROBE_SCRIPT = "probe.js"
MAX_SHOWN_CHARS = 700  # captions longer than this are cut in the cards
MAX_ERROR_CHARS = 200
MAX_BADGE_CHARS = 80
MAX_VALUE_CHARS = 120  # counted values (statuses, fallback reasons) longer than this are cut, whole in the title
MAX_FAILED_ROWS = 20
MAX_SHARDS_LISTED = 12
MAX_EXAMPLE_CHARS = 240  # rejected texts and alt-texts in the rejection examples
MAX_CATEGORIES = 12  # values listed per categorical q_* column (the most frequent)
LABELS = {"alt_text": "alt-text", "vlm_caption": "VLM caption", "vec_caption": "VeC caption"}
_THUMB_RE = re.compile(r"^data:image/(?:jpeg|png|webp);base64,[A-Za-z0-9+/]+={0,2}$")
# SVG histogram geometry (viewBox units)
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 360, 200, 34, 8, 24, 30
_SPARK_W, _SPARK_H = 240, 36  # the small histogram in a numeric q_* column's panel


# --- the Jinja2 environment -------------------------------------------------------------
def _clean(value: Any) -> Any:
    """Every ``{{ }}`` value passes here before escaping: None → "", control characters → U+FFFD."""
    if value is None:
        return ""
    if isinstance(value, str) and not hasattr(value, "__html__"):  # Markup (a macro's output) is already clean
        return "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch for ch in value)
    return value


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The template environment: package templates, autoescape on for everything, undefined is an error."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("vecap.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_clean,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _script_hash(name: str) -> str:
    """The CSP source (``'sha256-…'``) of a template included verbatim as an inline script."""
    text = environment().get_template(name).render()
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# --- data → plain values ----------------------------------------------------------------
def safe_thumbnail(uri: str | None) -> str | None:
    """``uri`` if it is a base64 image data URI (what the data layer makes), else None: no other src."""
    return uri if uri and _THUMB_RE.match(uri) else None


def _cut(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pct(part: int | float, whole: int | float) -> float:
    return 100 * part / whole if whole else 0.0


def _count_panel(title: str, name: str, counts: dict[str, int], extra: dict[str, int] | None = None,
                 extra_title: str = "") -> dict[str, Any]:  # fmt: skip
    """A counts table: one row per value, most frequent first; ``extra`` is a second count column."""
    total = sum(counts.values())
    values = sorted(set(counts) | set(extra or {}), key=lambda v: (-counts.get(v, 0), v))
    rows = [
        {"value": v, "label": _cut(v, MAX_VALUE_CHARS), "cut": len(v) > MAX_VALUE_CHARS, "is_null": v == NULL,
         "n": counts.get(v, 0), "pct": _pct(counts.get(v, 0), total),
         "extra": None if extra is None else extra.get(v, 0)}
        for v in values
    ]  # fmt: skip
    return {"title": title, "name": name, "rows": rows, "has_extra": extra is not None, "extra_title": extra_title}


def _svg_bars(counts: list[int], labels: list[str], ticks: list[str], ymax: int) -> dict[str, Any]:
    """Bar geometry of one histogram; ``labels`` title each bar, ``ticks`` label the x axis (every few bars)."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    bw = plot_w / max(len(counts), 1)
    step = max(1, -(-len(counts) // 6))
    bars, xticks = [], []
    for i, n in enumerate(counts):
        x = _LEFT + i * bw
        h = plot_h * n / ymax if ymax else 0
        bars.append({"x": round(x + 1, 1), "y": round(_TOP + plot_h - h, 1), "w": round(max(bw - 2, 1), 1),
                     "h": round(h, 1), "title": f"{labels[i]}: {n}"})  # fmt: skip
        last = len(counts) - 1
        if i == last or (i % step == 0 and last - i >= step):  # the last bin's tick, none crowding it
            xticks.append({"x": round(x + bw / 2, 1), "label": ticks[i]})
    return {"w": _W, "h": _H, "left": _LEFT, "top": _TOP, "right": _W - _RIGHT, "bottom": _TOP + plot_h,
            "ymax": ymax, "bars": bars, "ticks": xticks, "mid": round(_LEFT + plot_w / 2, 1)}  # fmt: skip


def _length_figures(hist: LengthHistograms) -> list[dict[str, Any]]:
    figures = []
    for column, counts in hist.counts.items():
        labels, ticks = [], []
        for i, lo in enumerate(hist.edges):
            last = hist.overflow and i == len(hist.edges) - 1
            labels.append(
                f"≥{lo} words" if last else f"{lo} words" if hist.width == 1 else f"{lo}–{lo + hist.width - 1} words"
            )
            ticks.append(f"≥{lo}" if last else str(lo))
        s = hist.summaries[column]
        summary = (
            f"{s.n_nonempty} non-empty of {s.n}; mean {s.mean:.1f}, median {s.median:g}, max {s.max} words"
            if s.n_nonempty else f"all {s.n} empty"
        )  # fmt: skip
        figures.append({"column": column, "label": f"{LABELS.get(column, column)} (words)", "axis": "words",
                        "summary": summary, "svg": _svg_bars(counts, labels, ticks, hist.ymax)})  # fmt: skip
    return figures


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def _spark(q: QualityColumn) -> dict[str, Any]:
    """A q_* column's histogram as a small bar strip (same bins as :class:`QualityColumn`)."""
    top = max(q.counts, default=0)
    bw = _SPARK_W / max(len(q.counts), 1)
    bars = []
    for i, n in enumerate(q.counts):
        h = (_SPARK_H - 2) * n / top if top else 0
        lo, hi = q.edges[i], q.edges[i + 1]
        bars.append({"x": round(i * bw + 0.5, 1), "y": round(_SPARK_H - h, 1), "w": round(max(bw - 1, 0.5), 1),
                     "h": round(h, 1), "title": f"{_fmt(lo)} – {_fmt(hi)}: {n}"})  # fmt: skip
    return {"w": _SPARK_W, "h": _SPARK_H, "bars": bars}


def _stage_quality(sq: StageQuality) -> dict[str, Any]:
    """One stage's q_* columns (numeric: quantiles and a small histogram; else value counts) and its rejections."""
    numeric, categorical, empty = [], [], []
    for q in sq.columns:
        if q.n and q.n_null == q.n:
            empty.append(q.name)
            continue
        if q.kind == "numeric":
            numeric.append({
                "name": q.name, "n": q.n - q.n_null, "n_null": q.n_null, "mean": _fmt(q.mean),
                "min": _fmt(q.min), "max": _fmt(q.max), "spark": _spark(q),
                "quantiles": [{"label": label, "value": q.quantiles[label], "text": _fmt(q.quantiles[label])}
                              for label, _ in QUANTILES],
            })  # fmt: skip
            continue
        top = q.values.most_common(MAX_CATEGORIES)
        counts = dict(top)
        if q.n_null:
            counts[NULL] = q.n_null
        title = q.name + (f" ({len(top)} of {len(q.values)} values)" if len(q.values) > len(top) else "")
        categorical.append({"name": q.name, "panel": _count_panel(title, f"{sq.folder}/{q.name}", counts)})
    rejections = [
        {"reason": r.reason, "n": r.n, "pct": _pct(r.n, sq.n_rows),
         "examples": [
             {"key": e.key, "shard": e.shard, "detail": _cut(e.detail, MAX_ERROR_CHARS),
              "text": None if e.text is None else _cut(e.text, MAX_EXAMPLE_CHARS),
              "alt_text": _cut(e.alt_text, MAX_EXAMPLE_CHARS),
              "fallback": None if sq.step != vocab.FUSE else _cut(e.fallback, MAX_EXAMPLE_CHARS),
              "fallback_source": e.fallback_source or "none"}
             for e in r.examples]}
        for r in sq.rejections
    ]  # fmt: skip
    return {"step": sq.step, "folder": sq.folder, "n_rows": sq.n_rows, "n_shards": sq.n_shards,
            "numeric": numeric, "categorical": categorical, "empty": empty, "rejections": rejections,
            "n_rejected": sq.n_rejected, "pct_rejected": _pct(sq.n_rejected, sq.n_rows),
            "judged": sq.step in (vocab.CAPTION, vocab.FUSE)}  # fmt: skip


def _card(row: dict[str, Any], thumb: str | None) -> dict[str, Any]:
    """One sample: thumbnail, badges and the three captions side by side (the ``.txt`` one marked)."""
    from vecap.fusion import kept_entities

    txt_col = {"alt": "alt_text", "vec": "vec_caption"}.get(row.get("txt_source") or "")
    badges = [
        {
            "cls": "st-ok" if row.get("status") == vocab.OK else "st-bad",
            "text": row.get("status") or NULL,
            "title": None,
        }
    ]
    if row.get("vec_source"):
        badges.append({"cls": "src", "text": f"vec: {row['vec_source']}", "title": None})
    if row.get("txt_source"):
        badges.append({"cls": "txt", "text": f"txt: {row['txt_source']}", "title": None})
    if row.get("vec_source") in vocab.FALLBACK_SOURCES and row.get("reason"):
        why = _why(row)
        badges.append({"cls": "warn", "text": f"fallback: {_cut(why, MAX_BADGE_CHARS)}", "title": why})
    kept, total = kept_entities(row.get("alt_text") or "", row.get("vec_caption") or "")
    dims = f"{row['width']}×{row['height']} {row.get('image_ext') or ''}".strip() if row.get("width") else ""
    caps = [
        {"column": c, "label": LABELS[c], "words": len((row.get(c) or "").split()),
         "text": _cut(row.get(c), MAX_SHOWN_CHARS), "is_txt": c == txt_col}
        for c in CAPTION_COLUMNS
    ]  # fmt: skip
    return {"key": row["key"], "shard": row["shard"], "thumb": safe_thumbnail(thumb), "dims": dims,
            "url": _cut(row.get("url"), 200), "badges": badges, "kept": kept, "total": total, "caps": caps}  # fmt: skip


def page_context(data: ReportData) -> dict[str, Any]:
    """Everything the template shows, as plain values."""
    shards = ", ".join(data.shards[:MAX_SHARDS_LISTED]) + (" …" if len(data.shards) > MAX_SHARDS_LISTED else "")
    meta = [("dataset root", data.root), ("stage read", f"{data.folder}/ ({len(data.shards)} shard(s): {shards})")]
    if data.n_in_tars is not None:
        meta.append(("samples in CLIP tars", f"{data.n_in_tars} in {len(data.sizes or {})} tar(s) (clip/sizes.json)"))
    if data.run:
        meta.append(("run", f"{data.run_path}, finished {data.run.get('finished_at') or '?'}"))
        versions = data.run.get("versions") if isinstance(data.run.get("versions"), dict) else {}
        if versions:
            meta.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    meta.append(("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))

    marker_fallbacks = data.marker_totals(vocab.FUSE, "fallbacks")
    panels = [
        _count_panel("Statuses", "status", data.counts("status"), data.marker_totals(data.stage, "statuses"),
                     f"{data.folder}/_done"),
        _count_panel("VeC caption source", "vec_source", data.counts("vec_source")),
        _count_panel("Training text (.txt) source", "txt_source", data.counts("txt_source")),
        _count_panel("Fusion fallback reasons", "fallback", data.fallback_reasons(), marker_fallbacks,
                     "fused/_done"),
    ]  # fmt: skip
    failed = data.failed_rows
    return {
        "title": data.root.rstrip("/").rsplit("/", 1)[-1] or data.root,
        "csp_script": _script_hash(PROBE_SCRIPT),
        "meta": meta,
        "n_rows": len(data.rows),
        "n_ok": len(data.ok_rows),
        "n_samples": len(data.samples),
        "models": [vars(m) for m in data.models],
        "panels": panels,
        "has_fused_markers": marker_fallbacks is not None,
        "lengths": _length_figures(data.lengths),
        "retention": [{**vars(r), "pct": _pct(r.kept, r.total), "color": r.column} for r in data.retention],
        "n_with_alt_entities": data.n_with_alt_entities,
        "stage_quality": [_stage_quality(sq) for sq in data.stage_quality],
        "cards": [_card(r, data.thumbnails.get((r["shard"], r["key"]))) for r in data.samples],
        "failed": [
            {
                "key": r["key"],
                "shard": r["shard"],
                "status": r.get("status") or NULL,
                "error": _cut(_why(r), MAX_ERROR_CHARS),
                "alt_text": _cut(r.get("alt_text"), 140),
            }
            for r in failed[:MAX_FAILED_ROWS]
        ],  # fmt: skip
        "n_failed": len(failed),
    }


def _why(row: dict[str, Any]) -> str | None:
    """A row's reason and error as one line ('truncated: stopped at …'); the reason alone when it is the status."""
    reason, error = row.get("reason"), row.get("error")
    if reason and reason != row.get("status"):
        return f"{reason}: {error}" if error else reason
    return error or reason


def render_html(data: ReportData) -> str:
    """The report page of ``data`` as a string."""
    return environment().get_template(TEMPLATE).render(**page_context(data))


def build_report(
    root: str | Path,
    out: str | Path | None = None,
    n_samples: int = 48,
    storage_options: dict[str, Any] | None = None,
) -> Path | str:
    """Write the report of ``root`` (default ``<root>/report.html``) atomically and return where.

    ``root`` and ``out`` may be local paths (a :class:`~pathlib.Path` comes back) or URIs;
    ``storage_options`` (fsspec's: an object store's endpoint, credentials) are the root's, and
    the output's too when it is on the same kind of storage.
    """
    from vecap.storage import Storage, is_uri, protocol

    data = load_report_data(str(root), n_samples=n_samples, storage=Storage.for_path(str(root), storage_options))
    page = render_html(data).encode("utf-8", errors="replace")
    target = str(out) if out is not None else f"{data.root}/report.html"
    same_storage = protocol(target) == protocol(str(root))
    Storage.for_path(target, storage_options if same_storage else None).write_bytes(target, page)
    log.info("report of %s written to %s (%d KiB)", data.root, target, len(page) // 1024)
    return target if is_uri(target) else Path(target)
