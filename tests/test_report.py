"""The HTML report: cards with embedded thumbnails, counts equal to the Parquet's, escaped captions,
and roots that stop at an earlier stage (fused/ only) still render."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
from helpers import jpeg_bytes, png_bytes, sample_members, write_img2dataset_parquet, write_tar

from vecap import schemas
from vecap.report import build_report
from vecap.writer import StageDir

XSS = "<script>alert(1)</script> & \"quotes\" in Paris"
VOID = {"img", "meta", "br", "hr", "input", "link"}


class _Page(HTMLParser):
    """Collects cards (data-key → thumbnail srcs), count cells and checks that tags are balanced."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.failed: list[str] = []
        self.stack: list[str] = []
        self.unbalanced: list[str] = []
        self._card: str | None = None
        self._count: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "article" and "data-key" in a:
            self._card = a["data-key"]
            self.cards[self._card] = []
        if tag == "img" and self._card is not None:
            self.cards[self._card].append(a["src"])
        if "data-count" in a:
            self._count = a["data-count"]
        if "data-failed-key" in a:
            self.failed.append(a["data-failed-key"])

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
        if self._count is not None:
            self.counts[self._count] = int(data)
            self._count = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.unbalanced and page.stack == [], (page.unbalanced, page.stack)
    return page


def _decodes(uri: str) -> tuple[int, int]:
    from PIL import Image

    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):], validate=True))) as im:
        assert im.format == "JPEG"
        im.load()
        return im.size


def _webp_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 160, 90)).save(buf, format="WEBP")
    return buf.getvalue()


def _vecap_root(root: Path) -> list[dict]:
    """Two vecap-stage shards written by hand: ok rows of three image formats, failures, one XSS caption."""
    images = [("jpg", jpeg_bytes(size=(400, 300))), ("png", png_bytes(size=(64, 200), mode="RGBA", color=(0, 0, 255, 90))),
              ("webp", _webp_bytes())]  # fmt: skip
    vec_sources = ["fused", "fused", "vlm", "alt"]
    stage = StageDir(root / "vecap")
    all_rows = []
    for s, shard in enumerate(("00000", "00001")):
        rows, members = [], []
        for i in range(8):
            key = f"{s}{i:06d}"
            ext, data = images[i % 3]
            failed = i in (3, 6)
            vec_source = None if failed else vec_sources[i % 4]
            alt = XSS if (s, i) == (1, 2) else f"Tower Bridge in London, {2000 + i} edition of sample {i}"
            vec = f"A red bus near Tower Bridge, London, {2000 + i}" if vec_source == "fused" else "a bus on a bridge"
            row = {
                "key": key, "shard": shard, "url": f"http://x/{key}", "alt_text": alt,
                "vlm_caption": "a bus on a bridge", "vec_caption": None if failed else vec,
                "vec_source": vec_source, "txt": None if failed else (alt if i % 2 else vec),
                "txt_source": None if failed else ("alt" if i % 2 else "vec"),
                "image_ext": None if failed else ext, "width": None if failed else 10, "height": None if failed else 10,
                "status": "download_failed" if failed else "ok",
                "error": "HTTP 404" if failed else ({"vlm": "lost_entities", "alt": "no_vlm"}.get(vec_source)),
                "caption_model": "models/tiny-llava", "caption_prompt_id": "concise",
                "fuse_model": "models/tiny-llama", "fuse_prompt_id": "vecap",
            }  # fmt: skip
            rows.append(row)
            if not failed and key != "1000007":  # 1000007: ok row whose image is lost → card without image
                members += [(f"{key}.{ext}", data), (f"{key}.txt", row["txt"].encode()), (f"{key}.json", b"{}")]
        tmp = write_tar(stage.temp_path(f"{shard}.tar"), members)
        stage.commit(shard, {"n_rows": len(rows)}, schemas.table(rows, schemas.VECAP), schemas.VECAP,
                     extra_files={f"{shard}.tar": tmp})  # fmt: skip
        all_rows += rows
    stage.write_json("_run.json", {"fingerprints": {"caption": {"model": "models/tiny-llava", "prompt_id": "concise"},
                                                    "fuse": {"model": "models/tiny-llama", "prompt_id": "vecap"}}})  # fmt: skip
    return all_rows


def test_report_of_a_vecap_root(tmp_path):
    root = tmp_path / "root"
    rows = _vecap_root(root)
    out = build_report(root, n_samples=9)
    assert out == root / "report.html"
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external resource
    page = _parse(out)

    ok_keys = sorted(r["key"] for r in rows if r["status"] == "ok")
    assert list(page.cards) == ok_keys[:9]  # n_samples honoured, sorted across shards; 1000002 is the XSS one
    for key, srcs in page.cards.items():
        assert len(srcs) == 1, key
        assert max(_decodes(srcs[0])) <= 160

    table = [r for s in ("00000", "00001") for r in pq.read_table(root / "vecap" / f"{s}.parquet").to_pylist()]
    for column in ("status", "vec_source", "txt_source"):
        expected = Counter("null" if r[column] is None else r[column] for r in table)
        shown = {k.split(":", 1)[1]: v for k, v in page.counts.items() if k.startswith(column + ":")}
        assert shown == dict(expected), column
    assert {k: v for k, v in page.counts.items() if k.startswith("fallback:")} == {
        "fallback:lost_entities": 2, "fallback:no_vlm": 2}  # fmt: skip
    assert page.failed == sorted(r["key"] for r in rows if r["status"] != "ok")
    assert "models/tiny-llava" in html and "concise" in html and "random-weight" in html
    assert html.count('data-hist="') == 3 and 'data-retention="vec_fused"' in html

    # All samples: the XSS caption's card is escaped too, and the image-less card renders without an <img>.
    out2 = build_report(root, tmp_path / "all.html", n_samples=48)
    page2 = _parse(out2)
    assert list(page2.cards) == ok_keys
    assert page2.cards["1000007"] == [] and all(page2.cards[k] for k in ok_keys if k != "1000007")
    assert "<script" not in out2.read_text().lower()


def test_report_of_a_root_with_only_fused(tmp_path):
    root = tmp_path / "root"
    images = root / "images"
    images.mkdir(parents=True)
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
         "vec_source": "fused" if i < 2 else "vlm", "error": None if i < 2 else "truncated",
         "model": "models/tiny-llama", "prompt_id": "vecap"}
        for i, k in enumerate(keys)
    ]  # fmt: skip
    fused[4].update(vec_caption=None, vec_source=None, error="HTTP 404")
    StageDir(root / "fused").commit("00000", {"fallbacks": {"truncated": 2}, "statuses": {"ok": 4}},
                                    schemas.table(fused, schemas.FUSED), schemas.FUSED)  # fmt: skip

    out = build_report(root, tmp_path / "r.html")
    page = _parse(out)
    assert list(page.cards) == keys[:4]
    assert all(len(srcs) == 1 and _decodes(srcs[0]) for srcs in page.cards.values())
    assert page.counts["status:ok"] == 4 and page.counts["vec_source:fused"] == 2
    assert page.counts["fallback:truncated"] == 2
    html = out.read_text()
    assert 'data-stats-count="fallback:truncated">2<' in html and "models/tiny-llama" in html
    assert 'data-retention="vec_fused" data-kept="6" data-total="6"' in html  # eiffel, tower, 0|1


def test_report_of_the_sample_root_if_built(tmp_path):
    """The repository's demo root, when ``make sample`` has been run (skipped otherwise)."""
    import pytest

    root = Path(__file__).resolve().parent.parent / "data" / "sample"
    if not StageDir(root / "vecap").done():
        pytest.skip("data/sample/vecap not built")
    out = build_report(root, tmp_path / "sample.html", n_samples=12)
    page = _parse(out)
    assert len(page.cards) == 12 and all(page.cards.values())
    sizes = json.loads((root / "vecap" / "sizes.json").read_text())
    assert page.counts["status:ok"] == sum(sizes.values())
