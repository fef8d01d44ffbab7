"""The report and ``vecap inspect`` on roots of the current layout, built by hand in each test.

The report: counts equal the Parquet's and the markers', cards carry decodable thumbnails,
roots that stop at an earlier stage render, old-layout roots are refused with a how-to, and
hostile values (keys, errors, model names, alt-text, captions) never become markup.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import jpeg_bytes, png_bytes, sample_members, write_img2dataset_parquet, write_tar

from vecap import schemas, validation, vocab
from vecap.inspect import inspect_path
from vecap.layout import Layout
from vecap.report import LegacyLayoutError, ReportData, build_report, load_report_data, render_html
from vecap.report.data import example_rank

VOID = {"img", "meta", "br", "hr", "input", "link", "col"}
SCRIPT_TAG = '"><script>alert(1)</script>'
JS_URL = "javascript:alert(1)"
IMG_TAG = "<img src=x onerror=alert(1)>"
HOSTILE = (SCRIPT_TAG, JS_URL, IMG_TAG)
PROBE = (Path(__file__).resolve().parent.parent / "vecap" / "report" / "templates" / "probe.js").read_text()


# --- building roots in the layout of vecap.layout ---------------------------------------
def write_stage(root: Path, step: str, shard: str, rows: list[dict], schema: pa.Schema, marker: dict) -> None:
    """A committed shard: ``<stage>/NNNNN.parquet`` and its marker ``<stage>/_done/NNNNN.json``."""
    layout = Layout(str(root))
    extra = sorted({k for r in rows for k in r if k.startswith("q_")} - set(schema.names))
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    for name in extra:
        table = table.append_column(name, pa.array([r.get(name) for r in rows]))
    Path(layout.stage(step)).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, layout.parquet(step, shard))
    Path(layout.done_dir(step)).mkdir(exist_ok=True)
    Path(layout.marker(step, shard)).write_text(json.dumps(marker))


def _webp_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 160, 90)).save(buf, format="WEBP")
    return buf.getvalue()


def vecap_root(root: Path, alt_of=None, key_of=None, n_per_shard: int = 8) -> list[dict]:
    """Two write-stage shards: ok rows of three image formats, two failures per shard, CLIP tars, sizes.json.

    ``alt_of(s, i)`` / ``key_of(s, i)`` override the alt-text / key of a row (hostile values).
    """
    images = [("jpg", jpeg_bytes(size=(400, 300))),
              ("png", png_bytes(size=(64, 200), mode="RGBA", color=(0, 0, 255, 90))),
              ("webp", _webp_bytes())]  # fmt: skip
    vec_sources = ["fused", "fused", "vlm", "alt"]
    layout = Layout(str(root))
    all_rows, sizes = [], {}
    for s, shard in enumerate(("00000", "00001")):
        rows, members = [], []
        for i in range(n_per_shard):
            key = (key_of and key_of(s, i)) or f"{s}{i:06d}"
            ext, data = images[i % 3]
            failed = i in (3, 6)
            vec_source = None if failed else vec_sources[i % 4]
            alt = (alt_of and alt_of(s, i)) or f"Tower Bridge in London, {2000 + i} edition of sample {i}"
            vec = f"A red bus near Tower Bridge, London, {2000 + i}" if vec_source == "fused" else "a bus on a bridge"
            fallback_reason = {"vlm": "lost_entities", "alt": "no_vlm"}
            row = {
                "key": key, "shard": shard, "url": f"http://x/{key}", "alt_text": alt,
                "vlm_caption": "a bus on a bridge", "vec_caption": None if failed else vec,
                "vec_source": vec_source, "txt": None if failed else (alt if i % 2 else vec),
                "txt_source": None if failed else ("alt" if i % 2 else "vec"),
                "image_ext": None if failed else ext, "width": None if failed else 10, "height": None if failed else 10,
                "status": "download_failed" if failed else "ok",
                "reason": "download_failed" if failed else fallback_reason.get(str(vec_source)),
                "error": "HTTP 404" if failed else None,
                "caption_model": "models/tiny-llava", "caption_prompt_id": "concise",
                "fuse_model": "models/tiny-llama", "fuse_prompt_id": "vecap",
            }  # fmt: skip
            rows.append(row)
            if not failed and key != "1000007":  # 1000007: ok row whose image is lost → card without image
                members += [(f"{key}.{ext}", data), (f"{key}.txt", str(row["txt"]).encode()), (f"{key}.json", b"{}")]
        write_tar(Path(layout.tar(shard)), members)
        sizes[f"{shard}.tar"] = sum(1 for name, _ in members if name.endswith(".txt"))
        statuses = Counter(r["status"] for r in rows)
        write_stage(root, "write", shard, rows, schemas.VECAP,
                    {"n_rows": len(rows), "n_samples": sizes[f"{shard}.tar"], "statuses": dict(statuses)})  # fmt: skip
        all_rows += rows
    Path(layout.sizes).write_text(json.dumps(sizes))
    Path(layout.run_file("write")).write_text(json.dumps({
        "fingerprints": {"caption": {"model": "models/tiny-llava", "prompt_id": "concise"},
                         "fuse": {"model": "models/tiny-llama", "prompt_id": "vecap"}},
        "finished_at": "2025-01-01T00:00:00Z", "versions": {"vecap": "0.1.0"}}))  # fmt: skip
    # The fuse stage's markers carry the fallback reasons the report shows beside the rows'.
    for shard in ("00000", "00001"):
        write_stage(
            root, "fuse", shard, [], schemas.FUSED, {"n_rows": 0, "fallbacks": {"lost_entities": 1, "no_vlm": 1}}
        )
    return all_rows


# --- reading the page -------------------------------------------------------------------
class Page(HTMLParser):
    """Cards (data-key → img srcs), count cells, scripts, every attribute, and balanced tags."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.stats_counts: dict[str, int] = {}
        self.failed: list[str] = []
        self.quantiles: dict[str, float] = {}  # "step:column:p50" → the exact value (data-value)
        self.quality: list[str] = []  # "step:column" of each q_* column shown
        self.rejections: dict[str, int] = {}  # "step:reason" → rows
        self.examples: list[str] = []  # "step:reason:key"
        self.totals: dict[str, int] = {}
        self.scripts: list[tuple[dict, str]] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.tags: Counter = Counter()
        self.text: list[str] = []
        self.stack: list[str] = []
        self.unbalanced: list[str] = []
        self._card: str | None = None
        self._cell: tuple[dict, str] | None = None
        self._script: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "script":
            self._script = a
        if tag == "article" and "data-key" in a:
            self._card = a["data-key"]
            self.cards[self._card] = []
        if tag == "img" and self._card is not None:
            self.cards[self._card].append(a["src"])
        for attr, target in (("data-count", self.counts), ("data-stats-count", self.stats_counts)):
            if attr in a:
                self._cell = (target, a[attr])
        if tag == "span" and "data-total" in a:
            self._cell = (self.totals, a["data-total"])
        if "data-failed-key" in a:
            self.failed.append(a["data-failed-key"])
        if "data-quantile" in a:
            self.quantiles[a["data-quantile"]] = float(a["data-value"])
        if "data-quality" in a:
            self.quality.append(a["data-quality"])
        if "data-rejection" in a:
            self._cell = (self.rejections, a["data-rejection"])
        if "data-example" in a:
            self.examples.append(a["data-example"])

    def handle_endtag(self, tag):
        if tag == "article":
            self._card = None
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.unbalanced.append(tag)
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self._script is not None:
            self.scripts.append((self._script, data))
            self._script = None
            return
        self.text.append(data)
        if self._cell is not None:
            target, name = self._cell
            target[name] = int(data)
            self._cell = None


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert not page.unbalanced and page.stack == [], (page.unbalanced, page.stack)
    return page


def assert_no_live_markup(html: str) -> Page:
    """No script but the page's own probe, no ``on*`` attribute, no ``javascript:`` and no non-data URL."""
    page = parse(html)
    assert page.tags["script"] == 1 and [a for a, _ in page.scripts] == [{"id": "vecap-probe"}]
    assert page.scripts[0][1] == PROBE.rstrip("\n")  # the template's file, verbatim: no data inside
    assert not [(t, k) for t, k, _ in page.attrs if k.lower().startswith("on")]
    for tag, name, value in page.attrs:
        assert "javascript:" not in value.lower() or name.startswith("data-") or name in ("alt", "title"), (tag, name)
        if name in ("src", "href", "action", "formaction", "srcset", "xlink:href", "poster", "background"):
            assert value.startswith("data:image/jpeg;base64,"), (tag, name, value[:40])
    assert page.tags["a"] == page.tags["iframe"] == page.tags["object"] == page.tags["embed"] == 0
    assert page.tags["img"] == len([1 for srcs in page.cards.values() for _ in srcs])  # no injected <img>
    csp = [v for t, k, v in page.attrs if t == "meta" and k == "content" and "script-src" in v]
    directives = dict(d.strip().split(" ", 1) for d in csp[0].split(";")) if len(csp) == 1 else {}
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:", csp
    assert directives["script-src"].startswith("'sha256-") and " " not in directives["script-src"], csp
    return page


def decodes(uri: str) -> tuple[int, int]:
    from PIL import Image

    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True))) as im:
        assert im.format == "JPEG"
        im.load()
        return im.size


# --- tests ------------------------------------------------------------------------------
def test_report_of_a_write_root(tmp_path):
    root = tmp_path / "root"
    rows = vecap_root(root)
    out = build_report(root, n_samples=9)
    assert out == root / "report.html"
    html = out.read_text(encoding="utf-8")
    page = assert_no_live_markup(html)

    ok_keys = sorted(r["key"] for r in rows if r["status"] == "ok")
    assert list(page.cards) == ok_keys[:9]  # n_samples honoured, sorted across shards
    for key, srcs in page.cards.items():
        assert len(srcs) == 1, key
        assert max(decodes(srcs[0])) <= 160
    assert page.totals == {"rows": len(rows), "ok": len(ok_keys), "samples": 9, "failed": 4}

    table = [r for s in ("00000", "00001") for r in pq.read_table(root / "vecap" / f"{s}.parquet").to_pylist()]
    for column in ("status", "vec_source", "txt_source"):
        expected = Counter("null" if r[column] is None else r[column] for r in table)
        shown = {k.split(":", 1)[1]: v for k, v in page.counts.items() if k.startswith(column + ":")}
        assert shown == dict(expected), column
    assert page.stats_counts["status:ok"] == 12 and page.stats_counts["status:download_failed"] == 4  # markers
    assert {k: v for k, v in page.counts.items() if k.startswith("fallback:")} == {
        "fallback:lost_entities": 2, "fallback:no_vlm": 2}  # fmt: skip
    assert page.stats_counts["fallback:lost_entities"] == 2 and page.stats_counts["fallback:no_vlm"] == 2
    assert page.failed == sorted(r["key"] for r in rows if r["status"] != "ok")
    assert "models/tiny-llava" in html and "concise" in html and "random-weight" in html
    assert "11 in 2 tar(s) (clip/sizes.json)" in html
    assert html.count('data-hist="') == 3 and 'data-retention="vec_fused"' in html
    assert "data-quality" not in html  # no q_* columns, no section

    # All samples: the image-less card renders without an <img>.
    out2 = build_report(root, tmp_path / "all.html", n_samples=48)
    page2 = assert_no_live_markup(out2.read_text())
    assert list(page2.cards) == ok_keys
    assert page2.cards["1000007"] == [] and all(page2.cards[k] for k in ok_keys if k != "1000007")


def test_report_data_is_what_the_files_hold(tmp_path):
    """The data object alone: stage, shards, done markers, sizes, models, samples and their thumbnails."""
    root = tmp_path / "root"
    rows = vecap_root(root)
    data = load_report_data(str(root), n_samples=5)
    assert isinstance(data, ReportData)
    assert (data.stage, data.folder, data.shards) == ("write", "vecap", ["00000", "00001"])
    assert data.done == {"write": ["00000", "00001"], "fuse": ["00000", "00001"], "caption": []}
    assert len(data.rows) == len(rows) and len(data.ok_rows) == 12 and len(data.failed_rows) == 4
    assert data.marker_totals("write", "statuses") == Counter({"ok": 12, "download_failed": 4})
    assert data.marker_totals("fuse", "fallbacks") == Counter({"lost_entities": 2, "no_vlm": 2})
    assert data.marker_totals("caption", "statuses") is None
    assert data.n_in_tars == 11 and data.tars == ["00000", "00001"] and data.run_path == "vecap/_run.json"
    assert [(m.step, m.model, m.prompt_id) for m in data.models] == [
        ("caption", "models/tiny-llava", "concise"), ("fuse", "models/tiny-llama", "vecap")]  # fmt: skip
    assert [r["key"] for r in data.samples] == sorted(r["key"] for r in rows if r["status"] == "ok")[:5]
    assert set(data.thumbnails) == {(r["shard"], r["key"]) for r in data.samples}
    assert sum(sum(c) for c in data.lengths.counts.values()) == 3 * 12
    # thumbnails=False reads no image (what vecap inspect asks for)
    assert load_report_data(str(root), thumbnails=False).thumbnails == {}


def test_quality_columns_are_shown_when_present(tmp_path):
    root = tmp_path / "root"
    rows = [
        {"key": f"{i:04d}", "shard": "00000", "status": "ok", "alt_text": "Big Ben", "vlm_caption": "a clock",
         "vec_caption": "Big Ben, a clock", "vec_source": "fused", "q_clip_score": None if i == 5 else 0.1 * i,
         "q_lang": ["en", "fr", None][i % 3]}
        for i in range(6)
    ]  # fmt: skip
    write_stage(root, "fuse", "00000", rows, schemas.FUSED, {"n_rows": 6, "statuses": {"ok": 6}, "fallbacks": {}})
    data = load_report_data(str(root), thumbnails=False)
    assert [sq.step for sq in data.stage_quality] == ["fuse"]
    q = {c.name: c for c in data.stage_quality[0].columns}
    assert q["q_clip_score"].kind == "numeric" and q["q_clip_score"].n_null == 1 and sum(q["q_clip_score"].counts) == 5
    assert q["q_lang"].kind == "categorical" and q["q_lang"].values == Counter({"en": 2, "fr": 2})
    page = assert_no_live_markup(render_html(data))
    assert page.counts["fused/q_lang:en"] == 2 and page.counts["fused/q_lang:null"] == 2
    assert ("div", "data-quality", "fuse:q_clip_score") in page.attrs and (
        "div",
        "data-quality",
        "fuse:q_lang",
    ) in page.attrs
    assert page.quantiles["fuse:q_clip_score:p50"] == pytest.approx(0.2) and page.rejections == {}
    assert "q_lang: en=2, fr=2, null=2" in inspect_path(root / "fused" / "00000.parquet")


def test_report_of_a_root_with_only_fused(tmp_path):
    root = tmp_path / "root"
    images = root / "images"
    keys = [f"{i:07d}" for i in range(5)]
    members = []
    for i, key in enumerate(keys[:4]):  # key 4 failed to download: not in the tar
        members += sample_members(key, png_bytes() if i % 2 else jpeg_bytes(), alt=f"Eiffel Tower {i}")
    write_tar(images / "00000.tar", members)
    write_img2dataset_parquet(images / "00000.parquet", [
        {"key": k, "caption": f"Eiffel Tower {i}", "status": "success" if i < 4 else "failed_to_download"}
        for i, k in enumerate(keys)])  # fmt: skip
    fused = [
        {"key": k, "shard": "00000", "status": "ok" if i < 4 else "download_failed", "alt_text": f"Eiffel Tower {i}",
         "vlm_caption": "a tall tower", "vec_caption": f"The Eiffel Tower {i} at dusk" if i < 2 else "a tall tower",
         "vec_source": "fused" if i < 2 else "vlm", "reason": None if i < 2 else "truncated",
         "model": "models/tiny-llama", "prompt_id": "vecap"}
        for i, k in enumerate(keys)
    ]  # fmt: skip
    fused[4].update(vec_caption=None, vec_source=None, reason="download_failed", error="HTTP 404")
    write_stage(root, "fuse", "00000", fused, schemas.FUSED,
                {"fallbacks": {"truncated": 2}, "statuses": {"ok": 4, "download_failed": 1}})  # fmt: skip
    (root / "fused" / "00001.parquet").write_bytes(
        (root / "fused" / "00000.parquet").read_bytes()
    )  # no marker: not done

    out = build_report(root, tmp_path / "r.html")
    page = assert_no_live_markup(out.read_text())
    assert list(page.cards) == keys[:4]
    assert all(len(srcs) == 1 and decodes(srcs[0]) for srcs in page.cards.values())
    assert page.counts["status:ok"] == 4 and page.counts["vec_source:fused"] == 2 and page.totals["rows"] == 5
    assert page.counts["fallback:truncated"] == 2 and page.stats_counts["fallback:truncated"] == 2
    html = out.read_text()
    assert "models/tiny-llama" in html
    assert 'data-retention="vec_fused" data-kept="4" data-total="4"' in html  # "Eiffel Tower" and "0" or "1"


def test_report_of_captions_and_of_images_only(tmp_path):
    """A root with only captions joins the alt-text from images/; with no stage at all, the input is shown."""
    root = tmp_path / "root"
    keys = ["a1", "a2", "a3"]
    write_tar(
        root / "images" / "00000.tar",
        [m for k in keys[:2] for m in sample_members(k, jpeg_bytes(), alt=f"Big Ben {k}")],
    )
    write_img2dataset_parquet(root / "images" / "00000.parquet", [
        {"key": k, "caption": f"Big Ben {k}", "status": "success" if k != "a3" else "failed_to_download",
         "error_message": "HTTP 500" if k == "a3" else None} for k in keys])  # fmt: skip
    data = load_report_data(str(root), thumbnails=False)
    assert data.stage == "images" and data.counts("status") == Counter({"ok": 2, "download_failed": 1})
    assert [r["error"] for r in data.failed_rows] == ["HTTP 500"]

    caps = [
        {"key": k, "shard": "00000", "status": "ok", "vlm_caption": "a clock tower", "model": "m", "prompt_id": "p"}
        for k in keys[:2]
    ]
    caps += [{"key": "a3", "shard": "00000", "status": "download_failed", "error": "HTTP 500"}]
    write_stage(
        root, "caption", "00000", caps, schemas.CAPTIONS, {"n_rows": 3, "statuses": {"ok": 2, "download_failed": 1}}
    )
    data = load_report_data(str(root), n_samples=5)
    assert data.stage == "caption" and [r["alt_text"] for r in data.rows] == ["Big Ben a1", "Big Ben a2", "Big Ben a3"]
    assert [r["url"] for r in data.rows][0] == "http://x/a1" and len(data.thumbnails) == 2
    assert [(m.step, m.model, m.note) for m in data.models] == [("caption", "m", "2 rows (Parquet)")]
    page = assert_no_live_markup(render_html(data))
    assert list(page.cards) == ["a1", "a2"] and page.stats_counts["status:ok"] == 2


def test_empty_and_old_layout_roots_are_refused_with_a_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="no done marker"):
        load_report_data(str(tmp_path))
    old = tmp_path / "old"
    (old / "vecap").mkdir(parents=True)
    (old / "vecap" / "00000_stats.json").write_text("{}")
    (old / "vecap" / "00000.parquet").write_bytes(b"")
    with pytest.raises(LegacyLayoutError, match=re.escape(f"vecap migrate {old}")):
        build_report(old)
    with pytest.raises(LegacyLayoutError):
        inspect_path(old / "vecap")


HOSTILE_ALT = {0: SCRIPT_TAG, 1: JS_URL, 2: IMG_TAG, 4: "</textarea></title><svg onload=alert(1)>"}


def test_hostile_values_never_become_markup(tmp_path):
    """Keys, errors, model names, statuses, alt-text and model outputs carrying markup stay text."""
    root = tmp_path / "root"
    hostile_keys = {(0, 0): SCRIPT_TAG, (0, 1): JS_URL, (0, 3): IMG_TAG}  # (0, 3) failed: in the failed table
    vecap_root(root, alt_of=lambda s, i: HOSTILE_ALT.get(i) if s == 0 else None,
               key_of=lambda s, i: hostile_keys.get((s, i)))  # fmt: skip
    layout = Layout(str(root))
    path = layout.parquet("write", "00001")
    rows = pq.read_table(path).to_pylist()
    for i, row in enumerate(rows):  # model outputs, errors, provenance, statuses of shard 1
        row.update(vec_caption=HOSTILE[i % 3] + " caption", vlm_caption=f"{IMG_TAG} a bus", caption_model=SCRIPT_TAG,
                   fuse_model=JS_URL, url=JS_URL, q_note=IMG_TAG)  # fmt: skip
        if row["status"] != "ok":
            row.update(status=SCRIPT_TAG, error=IMG_TAG)
        elif row["vec_source"] in ("vlm", "alt"):
            row.update(reason=SCRIPT_TAG, error=SCRIPT_TAG * 10)  # a hostile fallback reason and a long detail
    write_stage(root, "write", "00001", rows, schemas.VECAP, {"n_rows": 8, "statuses": {SCRIPT_TAG: 2, "ok": 6}})
    Path(layout.marker("fuse", "00001")).write_text(json.dumps({"fallbacks": {IMG_TAG: 3}}))
    Path(layout.run_file("write")).write_text(json.dumps({
        "fingerprints": {"caption": {"model": SCRIPT_TAG, "prompt_id": IMG_TAG, "prompt_sha256": JS_URL},
                         "fuse": {"model": JS_URL, "prompt_id": SCRIPT_TAG}},
        "finished_at": IMG_TAG, "versions": {SCRIPT_TAG: JS_URL}}))  # fmt: skip

    html = build_report(root, n_samples=48).read_text()
    page = assert_no_live_markup(html)
    assert "<script>alert" not in html and "<img src=x" not in html and "<svg onload" not in html
    # The hostile values are on the page, as text and inside attributes, unchanged once parsed.
    text = "".join(page.text)
    for value in (SCRIPT_TAG, IMG_TAG, JS_URL, "</textarea></title><svg onload=alert(1)>"):
        assert value in text, value
    assert SCRIPT_TAG in page.cards and JS_URL in page.cards and IMG_TAG in page.failed
    assert all(srcs and decodes(srcs[0]) for key, srcs in page.cards.items() if key != "1000007")
    assert page.counts[f"status:{SCRIPT_TAG}"] == 2 and page.stats_counts[f"status:{SCRIPT_TAG}"] == 2
    assert page.stats_counts[f"fallback:{IMG_TAG}"] == 3 and page.counts[f"vecap/q_note:{IMG_TAG}"] == 8
    assert page.counts["vecap/q_note:null"] == 8  # shard 00000 has no q_note column: null there
    assert ("tr", "data-model-step", "caption") in page.attrs and "VeCap report: root" in html


def test_inspect_reuses_the_report_data(tmp_path):
    """``vecap inspect`` on each kind of path of the layout: shard Parquet, tar, marker, stage folders, root."""
    root = tmp_path / "root"
    vecap_root(root)
    (root / "vecap" / "00002.parquet").write_bytes((root / "vecap" / "00000.parquet").read_bytes())  # not done
    layout = Layout(str(root))

    text = inspect_path(layout.parquet("write", "00000"), n_rows=2)
    assert "8 rows" in text and "status: ok=6, download_failed=2" in text and "0000000" in text
    assert inspect_path(layout.tar("00000")) == (
        f"{layout.tar('00000')}: 6 keys; members by extension: jpg=1, json=6, png=3, txt=6, webp=2"
    )
    assert json.loads(inspect_path(layout.marker("write", "00001")))["statuses"] == {"ok": 6, "download_failed": 2}

    text = inspect_path(root / "vecap")
    assert text.startswith(f"{layout.stage('write')}: 2 done shard(s) (markers in vecap/_done/), 3 Parquet file(s)")
    assert "not done (no marker): 00002" in text and "statuses (markers): ok=12, download_failed=4" in text
    assert inspect_path(str(root / "vecap" / "_done") + "/") == text
    assert "fallbacks (markers): lost_entities=2, no_vlm=2" in inspect_path(root / "fused")

    (root / "clip" / "00009.tar").write_bytes(b"")
    text = inspect_path(root / "clip")
    assert (
        "3 tar(s)" in text and "sizes.json: 11 samples in 2 tar(s)" in text and "not in sizes.json: 00009.tar" in text
    )

    text = inspect_path(root)
    assert text.startswith(f"{root}: rows of vecap/ (2 shard(s)): 16, 12 ok") and "vecap/: 2 done shard(s)" in text
    assert "fallbacks (fused markers): lost_entities=2, no_vlm=2" in text and "caption model: models/tiny-llava" in text
    with pytest.raises(FileNotFoundError):
        inspect_path(root / "nothing")


@pytest.mark.slow
def test_report_of_a_whole_demo_run(pipeline_root, tmp_path):
    """The report of a real ``vecap run`` of the demo recipe (the session's shared run, conftest's
    ``pipeline_root``): its counts are the Parquet's, its sample count is clip/sizes.json's, every card
    shows a decodable thumbnail, and nothing in the run's own values becomes markup."""
    out = build_report(pipeline_root, tmp_path / "run.html", n_samples=12)
    html = out.read_text(encoding="utf-8")
    page = assert_no_live_markup(html)
    table = pq.read_table(pipeline_root / "vecap").to_pylist()
    ok = sorted(r["key"] for r in table if r["status"] == "ok")
    sizes = json.loads((pipeline_root / "clip" / "sizes.json").read_text())
    assert ok and len(ok) == sum(sizes.values())
    assert list(page.cards) == ok[:12]
    assert all(len(srcs) == 1 and max(decodes(srcs[0])) <= 160 for srcs in page.cards.values())
    assert page.totals["rows"] == len(table) and page.totals["ok"] == len(ok) == page.counts["status:ok"]
    for column in ("status", "vec_source", "txt_source"):
        expected = Counter("null" if r[column] is None else r[column] for r in table)
        shown = {k.split(":", 1)[1]: v for k, v in page.counts.items() if k.startswith(column + ":")}
        assert shown == dict(expected), column
    assert f"{sum(sizes.values())} in {len(sizes)} tar(s) (clip/sizes.json)" in html


def test_report_of_a_uri_root(tmp_path):
    """A root behind fsspec (``memory://`` standing in for ``s3://``): read and written through Storage."""
    import fsspec

    local = tmp_path / "root"
    rows = vecap_root(local)
    fs = fsspec.filesystem("memory")
    fs.put(str(local), "/vecap-test-root", recursive=True)
    try:
        out = build_report("memory://vecap-test-root", n_samples=4)
        assert out == "memory://vecap-test-root/report.html"
        page = assert_no_live_markup(fs.cat_file("/vecap-test-root/report.html").decode())
        assert len(page.cards) == 4 and all(page.cards.values()) and page.totals["rows"] == len(rows)
        assert "2 done shard(s)" in inspect_path("memory://vecap-test-root/vecap")
    finally:
        fs.rm("/vecap-test-root", recursive=True)


# --- q_* distributions and rejection reasons, against pandas on the same files ------------
QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
FOLDERS = {"caption": "captions", "fuse": "fused"}


def rejected_in_parquet(step: str, df) -> dict[str, list[tuple[str, str]]]:
    """Rejected rows by reason, from the Parquet with pandas: (shard, key) of each.

    captions/: status caption_rejected; fused/: a fallback (vec_source vlm/alt, or no_text) whose
    reason is one of the validator's (vecap.validation.FUSE_REASONS), not an engine failure or a missing source.
    """
    reason = df["reason"].fillna("unknown")
    if step == "caption":
        mask = df["status"] == vocab.CAPTION_REJECTED
    else:
        mask = (df["vec_source"].isin(["vlm", "alt"]) | (df["status"] == vocab.NO_TEXT)) & reason.isin(
            validation.FUSE_REASONS
        )
    out: dict[str, list[tuple[str, str]]] = {}
    for r, shard, key in zip(reason[mask], df["shard"][mask], df["key"][mask], strict=True):
        out.setdefault(r, []).append((shard, key))
    return out


def stage_frame(root: Path, step: str):
    """A stage's rows with pandas, file by file (``pd.read_parquet(folder)`` takes the first file's columns)."""
    import pandas as pd

    files = sorted((root / FOLDERS[step]).glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def assert_quality_is_the_parquets(root: Path, page: Page, data: ReportData, steps=("caption", "fuse")) -> None:
    """Every q_* column of each stage's Parquet is on the page, with pandas' quantiles; rejection counts are pandas'."""
    import pandas as pd

    assert [sq.step for sq in data.stage_quality if sq.step in FOLDERS] == list(steps)
    for step in steps:
        df = stage_frame(root, step)
        q_names = [c for c in df.columns if c.startswith("q_")]
        assert q_names, step
        assert sorted(c for st, c in (q.split(":", 1) for q in page.quality) if st == step) == sorted(q_names)
        n_numeric = 0
        for name in q_names:
            column = df[name]
            if not pd.api.types.is_numeric_dtype(column) or column.isna().all():
                assert not any(k.startswith(f"{step}:{name}:") for k in page.quantiles), name
                continue
            n_numeric += 1
            for label, p in QUANTILES.items():
                # float32 columns: pandas interpolates in float32, the report in float64
                assert page.quantiles[f"{step}:{name}:{label}"] == pytest.approx(
                    float(column.quantile(p)), rel=1e-6, abs=1e-6
                ), (name, label)
        assert n_numeric, step
        expected = rejected_in_parquet(step, df)
        assert page.rejections == {**{k: v for k, v in page.rejections.items() if not k.startswith(step + ":")},
                                   **{f"{step}:{r}": len(rows) for r, rows in expected.items()}}  # fmt: skip
        sq = next(sq for sq in data.stage_quality if sq.step == step)
        assert sq.rejection_counts() == Counter({r: len(rows) for r, rows in expected.items()})
        for reason, rows in expected.items():  # the examples: the first rows of that reason in example_rank order
            picks = sorted(rows, key=lambda sk: example_rank(*sk))[:3]
            shown = [e.split(":", 2)[2] for e in page.examples if e.startswith(f"{step}:{reason}:")]
            assert shown == [key for _, key in picks], (step, reason)


def test_quality_and_rejections_of_caption_and_fuse_stages(tmp_path):
    """Hand-built captions/ and fused/ shards: quantiles, nulls, a column missing from one shard, every kind of
    fallback."""
    import pandas as pd

    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    reasons = [("refusal", "I'm sorry"), ("repetition", "'bridge' x12"), ("refusal", None), ("empty", None),
               ("boilerplate", "The image shows.")]  # (reason, error) of the rejected captions  # fmt: skip
    alts = {}
    for s, shard in enumerate(("00000", "00001")):
        caps = []
        for i in range(9):
            key = f"{s}{i:06d}"
            alts[key] = IMG_TAG if i == 1 else f"Golden Gate Bridge {i}"
            rejected = i % 2 == 1
            caps.append({
                "key": key, "shard": shard,
                "status": "download_failed" if i == 8 else "caption_rejected" if rejected else "ok",
                "reason": "download_failed" if i == 8 else reasons[(i + s) % 5][0] if rejected else None,
                "error": "HTTP 404" if i == 8 else reasons[(i + s) % 5][1] if rejected else None,
                "vlm_caption": None if i == 8 else (SCRIPT_TAG if i == 3 else f"a red bridge {i} " * (i + 1)),
                "q_repetition": None if i == 8 else round(0.11 * i * (s + 1), 3),
                "q_words": None if i == 8 else 3 * i + s,
                "q_lang_out": None if i == 8 else ["en", "fr", "ja"][i % 3],
                **({"q_only_here": 0.5 * i} if s == 1 else {}),
            })  # fmt: skip
        write_stage(
            root,
            "caption",
            shard,
            caps,
            schemas.CAPTIONS,
            {"n_rows": 9, "statuses": dict(Counter(c["status"] for c in caps))},
        )
        write_img2dataset_parquet(
            root / "images" / f"{shard}.parquet", [{"key": c["key"], "caption": alts[c["key"]]} for c in caps]
        )
        fused = []
        for i in range(9):
            key = f"{s}{i:06d}"
            reason, error, source = [
                (None, None, "fused"), ("lost_entities", "kept 0 of 3", "vlm"), ("invented", "1999", "alt"),
                ("no_vlm_caption", None, "alt"), ("model_error", "boom", "vlm"), ("lost_entities", None, "vlm"),
                ("caption_failed", "model_error", "alt"), ("empty", None, None),
                ("download_failed", "HTTP 404", None)][i]  # fmt: skip
            fused.append({
                "key": key, "shard": shard, "status": {7: "no_text", 8: "download_failed"}.get(i, "ok"),
                "reason": reason, "error": error,
                "alt_text": alts[key], "vlm_caption": "a red bridge", "vec_source": source,
                "vec_caption": {"vlm": "a red bridge", "alt": alts[key]}.get(source, "fused text" if source else None),
                "q_entity_recall": None if i in (3, 8) else i / 8, "q_novel": i % 3, "q_lang_out": "en",
            })  # fmt: skip
        write_stage(root, "fuse", shard, fused, schemas.FUSED, {"n_rows": 9, "fallbacks": {}})

    data = load_report_data(str(root), thumbnails=False)
    caption = next(sq for sq in data.stage_quality if sq.step == "caption")
    assert caption.rejection_counts() == Counter({"refusal": 3, "repetition": 2, "empty": 2, "boilerplate": 1})
    assert next(sq for sq in data.stage_quality if sq.step == "fuse").rejection_counts() == Counter(
        {"lost_entities": 4, "invented": 2, "empty": 2})  # not no_vlm_caption, model_error, caption_failed  # fmt: skip
    only = next(c for c in caption.columns if c.name == "q_only_here")
    assert only.n_null == 9 and only.quantiles["p50"] == pytest.approx(pd.Series([0.5 * i for i in range(9)]).median())
    refusal = next(r for r in caption.rejections if r.reason == "refusal")
    assert len(refusal.examples) == 3 and {e.detail for e in refusal.examples} <= {"I'm sorry", ""}
    assert all(e.alt_text == alts[e.key] for e in refusal.examples)  # joined from images/
    assert all(e.text.startswith(("a red bridge", SCRIPT_TAG)) for r in caption.rejections for e in r.examples)

    html = render_html(data)
    page = assert_no_live_markup(html)
    assert_quality_is_the_parquets(root, page, data)

    def quality_section(page_html: str) -> str:
        return page_html.split("<h2>Samples")[0].split("<h2>Quality")[1]

    # the same examples on every report
    assert quality_section(render_html(load_report_data(str(root), thumbnails=False))) == quality_section(html)
    text = inspect_path(root)
    assert "captions/ q_* columns (18 rows):" in text
    assert "rejected by reason: refusal=3, empty=2, repetition=2, boilerplate=1" in text
    assert "rejected by reason (rows): lost_entities=4, empty=2, invented=2" in inspect_path(root / "fused")


def test_quality_and_rejections_of_a_pipeline_run(pipeline_root, tmp_path):
    """A real run's captions/ and fused/: the page's quantiles and rejection counts are pandas' on the same files."""
    out = build_report(pipeline_root, tmp_path / "report.html", n_samples=4)
    page = assert_no_live_markup(out.read_text())
    data = load_report_data(str(pipeline_root), n_samples=0, thumbnails=False)
    assert_quality_is_the_parquets(pipeline_root, page, data)
    caption_reasons = rejected_in_parquet("caption", stage_frame(pipeline_root, "caption"))
    assert set(caption_reasons) <= set(validation.CAPTION_REASONS)  # every rejection names one of the checks
    text = inspect_path(pipeline_root)
    for sq in data.stage_quality:
        if sq.step in FOLDERS:
            assert f"{sq.folder}/ q_* columns ({sq.n_rows} rows):" in text
