"""``build_report``: one self-contained HTML page that shows what a dataset root holds.

Reads the most advanced stage present (``vecap/``, else ``fused/``, else ``captions/``,
else the img2dataset ``images/`` Parquet), and writes counts, caption-length histograms
(inline SVG), alt-text entity retention, a grid of sample cards with JPEG thumbnails
(base64 data URIs) and a table of failed rows. No scripts, no external resources; every
caption is untrusted text and is HTML-escaped.

    python -m vecap.report data/sample            # -> data/sample/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import statistics
import tarfile
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vecap.fusion import entities, kept_entities

log = logging.getLogger(__name__)

STAGES = ("vecap", "fused", "captions")
THUMB_SIDE = 160
MAX_THUMB_SOURCE_BYTES = 32 << 20  # tar members larger than this get no thumbnail
MAX_FAILED_ROWS = 20
MAX_SHOWN_CHARS = 700  # captions longer than this are cut in the cards
_NULL = "null"
_COLORS = {"alt_text": "#d97706", "vlm_caption": "#2563eb", "vec_caption": "#059669"}
_LABELS = {"alt_text": "alt-text", "vlm_caption": "VLM caption", "vec_caption": "VeC caption"}
_COLUMNS = (
    "key", "shard", "url", "alt_text", "vlm_caption", "vec_caption", "vec_source", "txt", "txt_source",
    "image_ext", "width", "height", "status", "error",
    "caption_model", "caption_prompt_id", "fuse_model", "fuse_prompt_id", "model", "prompt_id",
)  # fmt: skip


# --- reading ----------------------------------------------------------------------------
def _done_shards(stage_dir: Path) -> list[str]:
    """Committed shards of a stage folder (done marker and Parquet both present)."""
    from vecap.writer import StageDir

    stage = StageDir(stage_dir)
    return sorted(s for s in stage.done() if stage.parquet_path(s).exists())


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """The report's columns of one Parquet file, as dicts (absent columns are left out)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[c for c in _COLUMNS if c in names]).to_pylist()


def _normalise(row: dict[str, Any], stage: str, shard: str) -> dict[str, Any]:
    """A row of any stage → the VECAP field names (missing fields None)."""
    out = {c: row.get(c) for c in _COLUMNS if c not in ("model", "prompt_id")}
    out["shard"] = row.get("shard") or shard
    out["key"] = str(row.get("key"))
    if stage in ("fused", "captions"):  # one model per stage: map its provenance columns
        step = "fuse" if stage == "fused" else "caption"
        out[f"{step}_model"] = row.get("model")
        out[f"{step}_prompt_id"] = row.get("prompt_id")
    return out


def load_rows(root: str | Path) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(stage read, its shards, rows normalised to the VECAP column names) for a dataset root."""
    from vecap.reader import read_parquet_rows

    root = Path(root)
    for stage in STAGES:
        shards = _done_shards(root / stage)
        if shards:
            rows = [_normalise(r, stage, s) for s in shards for r in _read_parquet(root / stage / f"{s}.parquet")]
            if stage == "captions":  # the captions stage has no alt-text: join it from images/
                for shard in shards:
                    alts = {str(r["key"]): r for r in read_parquet_rows(str(root / "images"), shard)}
                    for row in rows:
                        if row["shard"] == shard and row["key"] in alts:
                            row["alt_text"] = alts[row["key"]].get("caption")
                            row["url"] = alts[row["key"]].get("url")
            return stage, shards, rows
    images = root / "images"
    shards = sorted(p.stem for p in images.glob("*.parquet")) if images.is_dir() else []
    rows = []
    for shard in shards:
        for r in read_parquet_rows(str(images), shard):
            ok = r.get("status") in (None, "success")
            rows.append(
                {
                    **{c: None for c in _COLUMNS if c not in ("model", "prompt_id")},
                    "key": str(r.get("key")),
                    "shard": shard,
                    "url": r.get("url"),
                    "alt_text": r.get("caption"),
                    "status": "ok" if ok else "download_failed",
                    "error": None if ok else (r.get("error_message") or r.get("status")),
                }
            )
    if not shards:
        raise FileNotFoundError(f"{root}: no committed shard in {', '.join(s + '/' for s in STAGES)} and no images/*.parquet")
    return "images", shards, rows


def _run_info(root: Path) -> dict[str, Any]:
    """The newest stage's ``_run.json`` (empty dict when none is readable)."""
    for stage in STAGES:
        path = root / stage / "_run.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                log.warning("%s unreadable: %s", path, err)
                continue
            if isinstance(data, dict):
                data["_path"] = f"{stage}/_run.json"
                return data
    return {}


def _models(
    root: Path, stage: str, run: dict[str, Any], rows: list[dict[str, Any]]
) -> list[tuple[str, str, str, str]]:
    """(step, model, prompt id, note) rows, from _run.json fingerprints else the Parquet columns.

    A fingerprint counts only for a step that ran (its stage folder exists, or vecap/ was read).
    """
    prints = run.get("fingerprints") if isinstance(run.get("fingerprints"), dict) else {}
    out = []
    for step, folder in (("caption", "captions"), ("fuse", "fused")):
        fp = prints.get(step)
        ran = stage == "vecap" or (root / folder).is_dir()
        if ran and isinstance(fp, dict) and fp.get("model"):
            sha = str(fp.get("prompt_sha256") or "")[:12]
            out.append((step, str(fp.get("model")), str(fp.get("prompt_id") or ""), f"prompt sha256 {sha}…" if sha else ""))
            continue
        pairs = Counter((r.get(f"{step}_model"), r.get(f"{step}_prompt_id")) for r in rows if r.get(f"{step}_model"))
        for (model, prompt), n in pairs.most_common():
            out.append((step, str(model), str(prompt or ""), f"{n} rows (Parquet)"))
    return out


def _fused_stats_fallbacks(root: Path) -> Counter | None:
    """Fallback reasons summed over ``fused/NNNNN_stats.json`` (None when there is no fused stage)."""
    shards = _done_shards(root / "fused")
    if not shards:
        return None
    total: Counter = Counter()
    for shard in shards:
        try:
            stats = json.loads((root / "fused" / f"{shard}_stats.json").read_text())
        except (OSError, ValueError) as err:
            log.warning("fused stats of %s unreadable: %s", shard, err)
            continue
        fallbacks = stats.get("fallbacks") if isinstance(stats, dict) else None
        if isinstance(fallbacks, dict):
            total.update({str(k): int(v) for k, v in fallbacks.items() if isinstance(v, int)})
    return total


# --- images -----------------------------------------------------------------------------
def thumbnail_uri(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """Image bytes (any format PIL reads) → a ``data:image/jpeg;base64,`` thumbnail; None if unreadable."""
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


def _from_vecap_tar(path: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Bytes of the members named in ``wanted`` (member name → key); names are never used as paths."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                key = wanted.get(member.name)
                if key is None or not member.isfile() or member.size > MAX_THUMB_SOURCE_BYTES:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    found[key] = f.read()
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, OSError) as err:
        log.warning("%s unreadable after %d images: %s", path, len(found), err)
    return found


def _from_images_shard(images_dir: Path, shard: str, keys: set[str]) -> dict[str, bytes]:
    """Bytes of ``keys``'s images from an img2dataset shard, via :class:`vecap.reader.ShardReader`."""
    from vecap.reader import ShardReader

    found: dict[str, bytes] = {}
    if not (images_dir / f"{shard}.tar").is_file():
        return found
    for sample in ShardReader(str(images_dir), shard, max_image_bytes=MAX_THUMB_SOURCE_BYTES):
        if sample.key in keys and sample.image:
            found[sample.key] = sample.image
            if len(found) == len(keys):
                break
    return found


def _thumbnails(root: Path, picks: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(shard, key) → thumbnail URI for the picked rows: vecap/ tar first, then images/."""
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in picks:
        by_shard[row["shard"]].append(row)
    out: dict[tuple[str, str], str] = {}
    for shard, rows in sorted(by_shard.items()):
        data: dict[str, bytes] = {}
        tar = root / "vecap" / f"{shard}.tar"
        wanted = {f"{r['key']}.{r['image_ext']}": r["key"] for r in rows if r.get("image_ext")}
        if wanted and tar.is_file():
            data = _from_vecap_tar(tar, wanted)
        missing = {r["key"] for r in rows} - set(data)
        if missing:
            data.update(_from_images_shard(root / "images", shard, missing))
        for key, raw in data.items():
            uri = thumbnail_uri(raw)
            if uri:
                out[(shard, key)] = uri
    log.info("thumbnails: %d of %d samples", len(out), len(picks))
    return out


# --- statistics -------------------------------------------------------------------------
def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _counts(rows: Iterable[dict[str, Any]], column: str) -> Counter:
    return Counter(_NULL if r.get(column) is None else str(r.get(column)) for r in rows)


def _retention(rows: Iterable[dict[str, Any]], column: str) -> tuple[int, int, int]:
    """(entities kept, alt-text entities, rows with any) of alt-text entities found in ``column``."""
    kept = total = n = 0
    for r in rows:
        k, t = kept_entities(r.get("alt_text") or "", r.get(column) or "")
        if t:
            kept, total, n = kept + k, total + t, n + 1
    return kept, total, n


# --- HTML -------------------------------------------------------------------------------
def _esc(value: Any) -> str:
    """Untrusted text → HTML-safe text (quotes too); control characters shown as U+FFFD."""
    text = "" if value is None else str(value)
    text = "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch for ch in text)
    return html.escape(text, quote=True)


def _cut(text: str | None, limit: int = MAX_SHOWN_CHARS) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _bar(part: int, whole: int, color: str = "#6366f1") -> str:
    width = 100 * part / whole if whole else 0
    return f'<div class="bar"><span style="width:{width:.1f}%;background:{color}"></span></div>'


def _count_table(title: str, name: str, counts: Counter, extra: Counter | None = None, extra_title: str = "") -> str:
    """A counts table; each count cell carries ``data-count="<name>:<value>"``."""
    total = sum(counts.values())
    head = f"<tr><th>{_esc(name)}</th><th>rows</th><th>share</th>"
    head += f"<th>{_esc(extra_title)}</th></tr>" if extra is not None else "</tr>"
    body = []
    values = sorted(set(counts) | set(extra or {}), key=lambda v: (-counts.get(v, 0), v))
    for value in values:
        n = counts.get(value, 0)
        label = f"<em>{_NULL}</em>" if value == _NULL else f"<code>{_esc(value)}</code>"
        cells = (
            f'<td>{label}</td><td class="num" data-count="{_esc(name)}:{_esc(value)}">{n}</td>'
            f"<td>{_bar(n, total)}<small>{_pct(n, total)}</small></td>"
        )
        if extra is not None:
            cells += f'<td class="num" data-stats-count="{_esc(name)}:{_esc(value)}">{extra.get(value, 0)}</td>'
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append('<tr><td colspan="4" class="muted">none</td></tr>')
    return (
        f'<div class="panel"><h3>{_esc(title)}</h3><table class="counts" data-table="{_esc(name)}">'
        f"{head}{''.join(body)}</table></div>"
    )


def _histogram_svg(column: str, values: list[int], edges: list[int], ymax: int, overflow: bool = False) -> str:
    """An inline SVG histogram of word counts; ``edges`` are the bins' lower bounds (shared),
    the last bin also holds everything longer when ``overflow``."""
    w, h, left, right, top, bottom = 360, 200, 34, 8, 24, 30
    width = edges[1] - edges[0] if len(edges) > 1 else 1
    counts = [0] * len(edges)
    for v in values:
        counts[min(v // width, len(edges) - 1)] += 1
    plot_w, plot_h = w - left - right, h - top - bottom
    bw = plot_w / max(len(edges), 1)
    color = _COLORS[column]
    parts = [
        f'<svg class="hist" data-hist="{column}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_LABELS[column]} length histogram">',
        f'<text x="{left}" y="15" class="t">{_LABELS[column]} (words)</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{w - right}" y2="{top + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 4}" class="y">{ymax}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" class="y">0</text>',
    ]
    step = max(1, math.ceil(len(edges) / 6))
    for i, (lo, n) in enumerate(zip(edges, counts)):
        x = left + i * bw
        bar_h = plot_h * n / ymax if ymax else 0
        last = overflow and i == len(edges) - 1
        label = f"≥{lo}" if last else f"{lo}" if width == 1 else f"{lo}–{lo + width - 1}"
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{color}"><title>{label} words: {n}</title></rect>'
        )
        if i % step == 0 or last:
            tick = f"≥{lo}" if last else str(lo)
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{top + plot_h + 14}" class="x">{tick}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{h - 2}" class="x">words</text></svg>')
    return "".join(parts)


def _histograms(ok_rows: list[dict[str, Any]]) -> str:
    """Three histograms with the same bins and y-scale, plus n / mean / median each.

    Bins cover up to the 98th percentile of all lengths; longer captions go to a last "≥" bin.
    """
    lengths = {c: [_words(r.get(c)) for r in ok_rows] for c in _COLORS}
    every = sorted(v for vs in lengths.values() for v in vs)
    top = every[int(0.98 * (len(every) - 1))] if every else 0
    width = max(1, math.ceil((top + 1) / 20))
    n_bins = top // width + 1
    overflow = bool(every) and every[-1] >= n_bins * width
    edges = [i * width for i in range(n_bins + overflow)]
    ymax = max(
        (Counter(min(v // width, len(edges) - 1) for v in vs).most_common(1)[0][1] for vs in lengths.values() if vs),
        default=0,
    )
    figs = []
    for column, values in lengths.items():
        present = [v for v in values if v]
        summary = (
            f"{len(present)} non-empty of {len(values)}; mean {statistics.fmean(present):.1f}, "
            f"median {statistics.median(present):g}, max {max(present)} words"
            if present
            else f"all {len(values)} empty"
        )
        svg = _histogram_svg(column, values, edges, ymax, overflow)
        figs.append(f"<figure>{svg}<figcaption>{summary}</figcaption></figure>")
    return '<div class="hists">' + "".join(figs) + "</div>"


def _retention_table(ok_rows: list[dict[str, Any]]) -> str:
    fused = [r for r in ok_rows if r.get("vec_source") == "fused"]
    lines = [
        ("vec_all", "VeC caption, all rows", ok_rows, "vec_caption", _COLORS["vec_caption"]),
        ("vec_fused", "VeC caption, vec_source = fused", fused, "vec_caption", _COLORS["vec_caption"]),
        ("vlm_all", "VLM caption, all rows (comparison)", ok_rows, "vlm_caption", _COLORS["vlm_caption"]),
        ("vlm_fused", "VLM caption, vec_source = fused rows", fused, "vlm_caption", _COLORS["vlm_caption"]),
    ]
    body = []
    for ident, label, rows, column, color in lines:
        kept, total, n = _retention(rows, column)
        body.append(
            f'<tr data-retention="{ident}" data-kept="{kept}" data-total="{total}"><td>{label}</td>'
            f'<td class="num">{n}</td><td class="num">{kept} / {total}</td>'
            f"<td>{_bar(kept, total, color)}<small>{_pct(kept, total)}</small></td></tr>"
        )
    return (
        '<table class="counts"><tr><th>caption</th><th>rows with alt-text entities</th>'
        "<th>entities kept</th><th>share kept</th></tr>" + "".join(body) + "</table>"
    )


def _card(row: dict[str, Any], thumb: str | None) -> str:
    """One sample: thumbnail, badges, and the three captions side by side (the .txt one marked)."""
    img = (
        f'<img src="{thumb}" alt="thumbnail of {_esc(row["key"])}">' if thumb else '<div class="noimg">no image</div>'
    )
    txt_col = {"alt": "alt_text", "vec": "vec_caption"}.get(row.get("txt_source") or "")
    badges = [f'<span class="badge st-{_esc(row.get("status"))}">{_esc(row.get("status"))}</span>']
    if row.get("vec_source"):
        badges.append(f'<span class="badge src">vec: {_esc(row["vec_source"])}</span>')
    if row.get("txt_source"):
        badges.append(f'<span class="badge txt">txt: {_esc(row["txt_source"])}</span>')
    if row.get("vec_source") in ("vlm", "alt") and row.get("error"):
        badges.append(f'<span class="badge warn">fallback: {_esc(row["error"])}</span>')
    kept, total = kept_entities(row.get("alt_text") or "", row.get("vec_caption") or "")
    dims = f"{row['width']}×{row['height']} {row.get('image_ext') or ''}" if row.get("width") else ""
    caps = []
    for column in _COLORS:
        text = row.get(column)
        mark = ' is-txt" title="the sample\'s .txt' if column == txt_col else ""
        body = f"<p>{_esc(_cut(text))}</p>" if text else '<p class="muted">—</p>'
        caps.append(
            f'<section class="cap {column}{mark}">'
            f"<h4>{_LABELS[column]} <small>{_words(text)} w</small></h4>{body}</section>"
        )
    return (
        f'<article class="card" data-key="{_esc(row["key"])}" data-shard="{_esc(row["shard"])}">'
        f'<div class="side">{img}<div class="key"><code>{_esc(row["key"])}</code> · {_esc(row["shard"])}</div>'
        f'<div class="dims">{_esc(dims)}</div><div class="badges">{"".join(badges)}</div>'
        f'<div class="dims">alt entities kept in VeC: {kept}/{total}</div></div>'
        f'<div class="caps">{"".join(caps)}</div></article>'
    )


def _failed_table(failed: list[dict[str, Any]], n_failed: int) -> str:
    if not failed:
        return '<p class="muted">No failed rows.</p>'
    body = "".join(
        f'<tr data-failed-key="{_esc(r["key"])}"><td><code>{_esc(r["key"])}</code></td><td>{_esc(r["shard"])}</td>'
        f'<td><span class="badge st-bad">{_esc(r.get("status"))}</span></td><td>{_esc(_cut(r.get("error"), 200))}</td>'
        f"<td>{_esc(_cut(r.get('alt_text'), 140))}</td></tr>"
        for r in failed
    )
    note = f"<p class=\"muted\">First {len(failed)} of {n_failed} rows whose status is not ok.</p>"
    return (
        note + '<table class="counts failed"><tr><th>key</th><th>shard</th><th>status</th><th>error</th>'
        "<th>alt-text</th></tr>" + body + "</table>"
    )


_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:14px;margin:0 0 6px}h4{font-size:12px;margin:0 0 4px;text-transform:uppercase;letter-spacing:.03em;color:var(--muted)}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.muted{color:var(--muted)}.note{background:#fef3c7;border:1px solid #fcd34d;padding:8px 12px;border-radius:6px}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:10px 0}
.meta dt{color:var(--muted)}.meta dd{margin:0}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:14px}
.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
table.counts{border-collapse:collapse;width:100%;background:var(--card)}
table.counts th,table.counts td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
table.counts th{font-weight:600;color:var(--muted);font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;width:90px;height:8px;background:var(--line);border-radius:4px;margin-right:6px;vertical-align:middle}
.bar span{display:block;height:100%;border-radius:4px}
.hists{display:flex;flex-wrap:wrap;gap:12px}.hists figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px}
.hists figcaption{font-size:12px;color:var(--muted);padding:0 6px 4px}
svg.hist text{font:10px system-ui,sans-serif;fill:var(--muted)}svg.hist text.t{font-size:12px;font-weight:600;fill:var(--fg)}
svg.hist text.y{text-anchor:end}svg.hist text.x{text-anchor:middle}svg.hist .axis{stroke:#9ca3af}
.grid{display:grid;gap:12px}
.card{display:grid;grid-template-columns:176px 1fr;gap:12px;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px}
.side img{display:block;max-width:160px;max-height:160px;border-radius:4px;background:#eee}
.noimg{width:160px;height:100px;display:flex;align-items:center;justify-content:center;background:#f3f4f6;color:var(--muted);border-radius:4px}
.key{margin-top:6px}.dims{font-size:12px;color:var(--muted)}
.badges{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0}
.badge{font-size:11px;padding:1px 6px;border-radius:10px;background:#e5e7eb}
.badge.st-ok{background:#d1fae5}.badge.st-bad{background:#fee2e2}.badge.warn{background:#fef3c7}.badge.src{background:#dbeafe}.badge.txt{background:#ede9fe}
.caps{display:grid;grid-template-columns:repeat(3,1fr);gap:10px;min-width:0}
.cap{border-left:3px solid var(--line);padding:2px 8px;min-width:0}
.cap p{margin:0;overflow-wrap:anywhere;unicode-bidi:plaintext;white-space:pre-wrap}
.cap.alt_text{border-color:#d97706}.cap.vlm_caption{border-color:#2563eb}.cap.vec_caption{border-color:#059669}
.cap.is-txt{background:#f0fdf4}.cap.is-txt h4::after{content:" · .txt";color:#059669}
table.failed td{overflow-wrap:anywhere;max-width:380px}
@media (max-width:800px){.card{grid-template-columns:1fr}.caps{grid-template-columns:1fr}}
"""


def render_html(root: Path, n_samples: int = 48) -> str:
    """The report page of ``root`` as a string."""
    stage, shards, rows = load_rows(root)
    run = _run_info(root)
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    failed_rows = sorted((r for r in rows if r.get("status") != "ok"), key=lambda r: (r["key"], r["shard"]))
    picks = sorted(ok_rows, key=lambda r: (r["key"], r["shard"]))[: max(n_samples, 0)]
    thumbs = _thumbnails(root, picks)

    sizes_path = root / "vecap" / "sizes.json"
    n_in_tars = ""
    if stage == "vecap" and sizes_path.is_file():
        try:
            n_in_tars = str(sum(int(v) for v in json.loads(sizes_path.read_text()).values()))
        except (OSError, ValueError, TypeError, AttributeError):
            n_in_tars = "unreadable"
    models = _models(root, stage, run, rows)
    model_rows = "".join(
        f"<tr><td>{_esc(step)}</td><td><code>{_esc(m)}</code></td><td><code>{_esc(p)}</code></td>"
        f'<td class="muted">{_esc(note)}</td></tr>'
        for step, m, p, note in models
    ) or '<tr><td colspan="4" class="muted">no model provenance found</td></tr>'
    meta = [
        ("dataset root", f"<code>{_esc(root.resolve())}</code>"),
        ("stage read", f"<code>{_esc(stage)}/</code> ({len(shards)} shard(s): {_esc(', '.join(shards[:12]))}"
         f"{' …' if len(shards) > 12 else ''})"),
        ("rows", f'<span data-total="rows">{len(rows)}</span> (<span data-total="ok">{len(ok_rows)}</span> ok)'),
    ]  # fmt: skip
    if n_in_tars:
        meta.append(("samples in vecap tars", f"{_esc(n_in_tars)} (sizes.json)"))
    if run:
        meta.append(("run", f"{_esc(run.get('_path'))}, finished {_esc(run.get('finished_at') or '?')}"))
        versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
        if versions:
            meta.append(("versions", _esc(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))))
    meta.append(("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))

    fallbacks = Counter(
        _NULL if r.get("error") is None else str(r["error"]) for r in rows if r.get("vec_source") in ("vlm", "alt")
    )
    stats_fallbacks = _fused_stats_fallbacks(root)
    count_panels = [
        _count_table("Statuses", "status", _counts(rows, "status")),
        _count_table("VeC caption source", "vec_source", _counts(rows, "vec_source")),
        _count_table("Training text (.txt) source", "txt_source", _counts(rows, "txt_source")),
        _count_table(
            "Fusion fallback reasons", "fallback", fallbacks, stats_fallbacks, "fused stats"
        ),
    ]
    n_alt_ents = sum(1 for r in ok_rows if entities(r.get("alt_text") or ""))
    failed_shown = failed_rows[:MAX_FAILED_ROWS]
    cards = "\n".join(_card(r, thumbs.get((r["shard"], r["key"]))) for r in picks)

    body = f"""
<header>
<h1>VeCap dataset report</h1>
<dl class="meta">{''.join(f'<dt>{k}</dt><dd>{v}</dd>' for k, v in meta)}</dl>
<table class="counts models"><tr><th>step</th><th>model</th><th>prompt id</th><th></th></tr>{model_rows}</table>
<p class="note">Demo pipelines use tiny <em>random-weight</em> models: their captions are noise by design.
This page checks the plumbing (counts, fallbacks, files), not caption quality.</p>
</header>
<h2>Counts</h2>
<div class="panels">{''.join(count_panels)}</div>
<p class="muted">Fallback reasons: the <code>error</code> of rows whose <code>vec_source</code> is vlm or alt;
"fused stats" sums <code>fused/NNNNN_stats.json</code> → <code>fallbacks</code>.</p>
<h2>Caption lengths</h2>
<p class="muted">Words per caption over the {len(ok_rows)} ok rows (empty = 0); same bins and y-scale for all three.</p>
{_histograms(ok_rows)}
<h2>Entity retention</h2>
<p class="muted">Share of alt-text entities (capitalised names and numbers, <code>vecap.fusion.entities</code>) found
in each caption, summed over ok rows; {n_alt_ents} of {len(ok_rows)} ok rows have any.</p>
{_retention_table(ok_rows)}
<h2>Samples</h2>
<p class="muted">The first {len(picks)} ok rows by key (of {len(ok_rows)}); the caption used as the sample's
<code>.txt</code> is shaded.</p>
<div class="grid">{cards}</div>
<h2>Failed rows</h2>
{_failed_table(failed_shown, len(failed_rows))}
"""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>VeCap report: {_esc(root.name)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def build_report(root: str | Path, out: str | Path | None = None, n_samples: int = 48) -> Path:
    """Writes one self-contained HTML file (default <root>/report.html) and returns its path."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report.html"
    page = render_html(root, n_samples=n_samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8", errors="replace")
    os.replace(tmp, out)
    log.info("report of %s written to %s (%d KiB)", root, out, len(page) // 1024)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m vecap.report ROOT [--out FILE] [-n N]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--out", default=None)
    parser.add_argument("-n", "--n-samples", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_report(args.root, args.out, args.n_samples))


if __name__ == "__main__":
    main()
