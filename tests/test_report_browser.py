"""The report in a real browser: headless Chromium loads ``report.html`` and we read the DOM it built.

The page's own probe script (``vecap/report/templates/probe.js``) writes onto ``<body>``: the
script errors and CSP violations it saw, how many thumbnails decoded, and which boxes are
wider than their room. A screenshot is saved under the test's tmp dir (and copied to
``$VECAP_SCREENSHOT_DIR`` when set). Without Chromium the test skips, except in CI (``$CI``),
where ``.ci/run`` installs it and its absence is a failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_report import HOSTILE, IMG_TAG, SCRIPT_TAG, vecap_root, write_stage

from vecap import schemas
from vecap.layout import Layout
from vecap.report import build_report, load_report_data

log = logging.getLogger(__name__)

CHROMIUM_TIMEOUT_S = 120
WIDE, NARROW = (1400, 2400), (420, 2400)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium not found in CI: .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("no chromium on PATH: install it with: apt-get install -y chromium")


def _run(chromium: str, tmp: Path, url: str, *args: str) -> str:
    """One headless Chromium run with a private profile; its stdout (the DOM for --dump-dom)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", *args, url]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Dom(HTMLParser):
    """``<body>``'s attributes, the cards, the shown totals and every script element of the dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.cards: list[str] = []
        self.scripts: list[dict] = []
        self.handlers: list[tuple[str, str]] = []
        self.totals: dict[str, str] = {}
        self._total: str | None = None
        self.quality_stages: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.handlers += [(tag, k) for k in a if k.lower().startswith("on")]
        if tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts.append(a)
        elif tag == "article" and "data-key" in a:
            self.cards.append(a["data-key"])
        elif tag == "span" and "data-total" in a:
            self._total = a["data-total"]
        if "data-quality-stage" in a:
            self.quality_stages.append(a["data-quality-stage"])

    def handle_data(self, data):
        if self._total is not None:
            self.totals[self._total] = data
            self._total = None


def _dom(chromium: str, tmp: Path, page: Path, size: tuple[int, int]) -> _Dom:
    dom = _Dom()
    dom.feed(_run(chromium, tmp, page.as_uri(), "--dump-dom", f"--window-size={size[0]},{size[1]}"))
    dom.close()
    return dom


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def _hostile_root(root: Path) -> int:
    """A write-stage root whose shard 1 carries hostile and very long values; returns its row count."""
    rows = vecap_root(root, alt_of=lambda s, i: HOSTILE[i % 3] if s == 0 and i < 3 else None)
    layout = Layout(str(root))
    shard = pq.read_table(layout.parquet("write", "00001")).to_pylist()
    long_reason = "lost_entities_" + "x" * 300  # one unbroken word, far wider than its card
    for i, row in enumerate(shard):
        row["q_clip_score"] = 0.1 * i
        row["vec_caption"] = (row["vec_caption"] or "") + " " + IMG_TAG
        if row["vec_source"] in ("vlm", "alt"):
            row["reason"] = long_reason if i % 2 else SCRIPT_TAG
            row["error"] = "x" * 300 if i % 2 else SCRIPT_TAG + " " + "y" * 200
        if row["status"] != "ok":
            row["status"], row["reason"], row["error"] = "image_undecodable_" + "z" * 120, "z" * 150, SCRIPT_TAG * 8
    write_stage(
        root, "write", "00001", shard, schemas.VECAP, {"n_rows": len(shard), "statuses": {"ok": 6, "x" * 150: 2}}
    )
    (Path(layout.marker("fuse", "00001"))).write_text(json.dumps({"fallbacks": {long_reason: 2}}))
    # captions/ and fused/ with q_* columns and rejected rows whose texts are long unbroken words
    caps, fused = [], []
    for i, row in enumerate(shard):
        rejected = i % 2 == 0
        caps.append({"key": row["key"], "shard": "00001", "status": "caption_rejected" if rejected else "ok",
                     "reason": "repetition" if rejected else None, "error": "w" * 250 if rejected else None,
                     "vlm_caption": ("v" * 400 + " ") * 2,
                     "q_repetition": 0.1 * i, "q_words": 3 * i,
                     "q_lang_out": "l" * 150 if i == 1 else "en"})  # fmt: skip
        fused.append({"key": row["key"], "shard": "00001", "status": "ok", "alt_text": IMG_TAG + "a" * 300,
                      "vlm_caption": "a bus", "vec_caption": "b" * 400 if rejected else "a bus, London",
                      "vec_source": "vlm" if rejected else "fused", "reason": long_reason if rejected else None,
                      "error": "x" * 300 if rejected else None,
                      "q_entity_recall": i / 8, "q_novel_terms": "|".join(["n" * 60] * 4),
                      "q_words": 2 * i})  # fmt: skip
    write_stage(root, "caption", "00001", caps, schemas.CAPTIONS, {"n_rows": len(caps)})
    write_stage(root, "fuse", "00001", fused, schemas.FUSED, {"n_rows": len(fused), "fallbacks": {long_reason: 4}})
    return len(rows)


def test_report_in_a_browser(chromium, tmp_path):
    root = tmp_path / "root"
    n_rows = _hostile_root(root)
    page = build_report(root, n_samples=48)
    data = load_report_data(str(root), n_samples=48)
    n_thumbs = len(data.thumbnails)
    assert n_thumbs == len(data.samples) - 1  # 1000007 has no image in the tar

    for size in (WIDE, NARROW):
        dom = _dom(chromium, tmp_path, page, size)
        assert dom.body.get("data-script-errors") == "", dom.body  # probe ran, nothing failed or was blocked
        assert dom.body.get("data-images-total") == dom.body.get("data-images-loaded") == str(n_thumbs), dom.body
        assert dom.body.get("data-overflowing") == "", (size, dom.body.get("data-overflowing"))
        assert dom.totals["rows"] == str(n_rows) and dom.totals["samples"] == str(len(data.samples))
        assert dom.cards == [r["key"] for r in data.samples]
        assert dom.scripts == [{"id": "vecap-probe"}] and dom.handlers == []  # no data became script
        assert dom.quality_stages == ["caption", "fuse", "write"]  # each stage's q_* section rendered

    shot = tmp_path / "report.png"
    _run(chromium, tmp_path, page.as_uri(), f"--screenshot={shot}", f"--window-size={WIDE[0]},{WIDE[1]}")
    assert _png_size(shot) == WIDE and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    log.info("screenshot: %s", shot)
    if os.environ.get("VECAP_SCREENSHOT_DIR"):
        target = Path(os.environ["VECAP_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "report.png")
        log.info("screenshot copied to %s", target / "report.png")
