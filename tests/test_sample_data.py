"""Sample data and `download` through the real img2dataset against a loopback server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from vecap.demo.sample_data import N_MISSING, NOT_AN_IMAGE_FILE, make_sample_data, serve_folder  # noqa: E402
from vecap.download import download, resolve_img2dataset_options  # noqa: E402
from vecap.images import sniff_image_format  # noqa: E402

N_IMAGES, SHARD_SIZE = 24, 8
N_ROWS = N_IMAGES + 1 + N_MISSING  # images, the HTML page, the 404s


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    return make_sample_data(root, n_images=N_IMAGES, shard_size=SHARD_SIZE)


def _stems(images: Path) -> list[str]:
    return sorted(p.stem for p in images.glob("*.tar"))


def _tar_members(images: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """shard -> key -> ext -> bytes."""
    out: dict[str, dict[str, dict[str, bytes]]] = {}
    for stem in _stems(images):
        samples: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(images / f"{stem}.tar") as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                f = tar.extractfile(m)
                assert f is not None
                samples[key][ext] = f.read()
        out[stem] = dict(samples)
    return out


def _rows(images: Path) -> dict[str, list[dict]]:
    return {stem: pq.read_table(images / f"{stem}.parquet").to_pylist() for stem in _stems(images)}


def _sources(sample: Path) -> dict[str, dict]:
    """url -> the generated row (caption, file, format, mode, size)."""
    rows = pq.read_table(sample.parent / "sample_src" / "urls.parquet").to_pylist()
    return {r["url"]: r for r in rows}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_shard_files(sample: Path) -> None:
    stems = _stems(sample)
    assert stems == [f"{i:05d}" for i in range(-(-N_ROWS // SHARD_SIZE))]
    expected = {f"{s}{suffix}" for s in stems for suffix in (".tar", ".parquet", "_stats.json")}
    assert {p.name for p in sample.iterdir()} == expected  # no _tmp, nothing half-written
    assert not [p for p in sample.parent.iterdir() if p.name.startswith(".")]  # temp build dir gone
    stats = [json.loads((sample / f"{s}_stats.json").read_text()) for s in stems]
    assert sum(s["count"] for s in stats) == N_ROWS
    assert sum(s["successes"] for s in stats) == N_IMAGES + 1
    assert sum(s["failed_to_download"] for s in stats) == N_MISSING


def test_failed_rows_for_404(sample: Path) -> None:
    failed = [r for rows in _rows(sample).values() for r in rows if r["status"] != "success"]
    assert len(failed) == N_MISSING
    assert {r["status"] for r in failed} == {"failed_to_download"}
    assert all("404" in r["error_message"] and "/missing_" in r["url"] for r in failed)


def test_tar_keys_match_parquet(sample: Path) -> None:
    members, rows = _tar_members(sample), _rows(sample)
    all_keys: list[str] = []
    for stem, samples in members.items():
        ok = {r["key"] for r in rows[stem] if r["status"] == "success"}
        assert set(samples) == ok
        assert len(rows[stem]) <= SHARD_SIZE
        assert all(k.startswith(stem) for k in samples)  # key = shard id + index in shard
        all_keys += [r["key"] for r in rows[stem]]
    assert len(all_keys) == len(set(all_keys)) == N_ROWS


def test_member_extensions_and_formats(sample: Path) -> None:
    """img2dataset names every image `.jpg` when it keeps the original bytes; the bytes tell the format."""
    sources = _sources(sample)
    rows = {r["key"]: r for rs in _rows(sample).values() for r in rs}
    sniffed = set()
    for samples in _tar_members(sample).values():
        for key, parts in samples.items():
            assert set(parts) == {"jpg", "txt", "json"}
            fmt = sniff_image_format(parts["jpg"])
            src = sources[rows[key]["url"]]
            assert fmt == (None if src["format"] == "html" else {"jpeg": "jpg"}.get(src["format"], src["format"]))
            sniffed.add(fmt)
    assert sniffed == {"jpg", "png", "webp", None}


def test_alt_texts_match_generated_captions(sample: Path) -> None:
    sources = _sources(sample)
    rows = {r["key"]: r for rs in _rows(sample).values() for r in rs}
    seen = []
    for samples in _tar_members(sample).values():
        for key, parts in samples.items():
            meta = json.loads(parts["json"])
            assert meta["key"] == key and meta["url"] == rows[key]["url"]
            expected = sources[meta["url"]]["caption"]
            assert parts["txt"].decode("utf-8") == expected == meta["caption"] == rows[key]["caption"]
            seen.append(expected)
    # the web's mess arrives untouched
    assert "" in seen
    assert any(len(t) > 2000 for t in seen)
    assert any("&amp;" in t and "&#39;" in t for t in seen)
    assert any("<b>" in t for t in seen)
    assert any("\n" in t and t.startswith("  ") for t in seen)
    assert any("🌉" in t for t in seen) and any("東京" in t for t in seen)
    assert any("ignore the above" in t for t in seen)


def test_original_bytes_kept(sample: Path) -> None:
    from PIL import Image

    src_dir = sample.parent / "sample_src"
    sources = _sources(sample)
    rows = {r["key"]: r for rs in _rows(sample).values() for r in rs}
    checked = {}
    for samples in _tar_members(sample).values():
        for key, parts in samples.items():
            src = sources[rows[key]["url"]]
            source_bytes = (src_dir / src["file"]).read_bytes()
            assert _sha(parts["jpg"]) == _sha(source_bytes) == rows[key]["sha256"]
            assert json.loads(parts["json"])["sha256"] == rows[key]["sha256"]
            checked[src["file"]] = parts["jpg"]
    with Image.open(io.BytesIO(checked["large_3000x2000.jpg"])) as im:
        assert im.size == (3000, 2000)
    with Image.open(io.BytesIO(checked["cmyk.jpg"])) as im:
        assert im.mode == "CMYK"
    for name, mode in (("rgba.png", "RGBA"), ("gray.jpg", "L"), ("palette.png", "P"), ("rgba.webp", "RGBA")):
        with Image.open(io.BytesIO(checked[name])) as im:
            assert im.mode == mode, name
    assert checked[NOT_AN_IMAGE_FILE].startswith(b"<html>")


def test_existing_sample_is_reused(sample: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in sample.iterdir()}
    assert make_sample_data(sample.parent, n_images=N_IMAGES, shard_size=SHARD_SIZE) == sample
    assert {p.name: p.stat().st_mtime_ns for p in sample.iterdir()} == before


def test_refuses_foreign_images_dir(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_sample_data(tmp_path, n_images=2, shard_size=2)


def test_download_csv(sample: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A user's csv with an extra column, through `download` against a loopback server;
    img2dataset's own output (its main and worker processes) lands in a log beside the folder."""
    src = sample.parent / "sample_src"
    files = ["cmyk.jpg", "rgba.png", "rgba.webp"]
    with serve_folder(src) as base:
        lines = ["url,caption,source_id"]
        lines += [f'{base}/{name},"alt, with comma {i}",id{i}' for i, name in enumerate(files)]
        lines.append(f"{base}/nope.jpg,gone,id9")
        url_list = tmp_path / "urls.csv"
        url_list.write_text("\n".join(lines) + "\n")
        out = download(
            url_list,
            tmp_path / "images",
            processes_count=1,
            thread_count=2,
            number_sample_per_shard=10,
            save_additional_columns=["source_id"],
        )
    assert out == tmp_path / "images"
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    terminal = capfd.readouterr()
    library_log = (tmp_path / "images.img2dataset.log").read_text()
    for line in ("Starting the downloading", "worker  - success"):  # printed by img2dataset's main and worker processes
        assert line in library_log
        assert line not in terminal.out + terminal.err
    assert "download: 4sample" in terminal.err  # our bar: 4 URLs in one shard (a csv: no total known up front)
    rows = {r["source_id"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    assert rows["id9"]["status"] == "failed_to_download"
    with tarfile.open(out / "00000.tar") as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    for i, name in enumerate(files):
        row = rows[f"id{i}"]
        assert row["status"] == "success"
        assert data[f"{row['key']}.jpg"] == (src / name).read_bytes()
        assert data[f"{row['key']}.txt"].decode() == f"alt, with comma {i}"
        assert json.loads(data[f"{row['key']}.json"])["source_id"] == f"id{i}"


def test_download_rejects_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "urls.xlsx"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="input format"):
        download(bad, tmp_path / "out")
    good = tmp_path / "urls.csv"
    good.write_text("link,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    with pytest.raises(ValueError, match="unknown input_format"):
        download(good, tmp_path / "out", input_format="xlsx")
    with pytest.raises(ValueError, match="not found"):
        download(tmp_path / "missing.parquet", tmp_path / "out")
    with pytest.raises(ValueError, match=r"\['url'\] not found"):
        download(good, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_options_keep_original_bytes_unless_decoding_is_asked() -> None:
    assert resolve_img2dataset_options()["disable_all_reencoding"] is True
    opts = resolve_img2dataset_options(resize_mode="center_crop", image_size=224)
    assert opts["disable_all_reencoding"] is False and opts["resize_mode"] == "center_crop"
    opts = resolve_img2dataset_options(min_image_size=64, disable_all_reencoding=True)
    assert opts["disable_all_reencoding"] is True
    assert resolve_img2dataset_options(timeout=3)["timeout"] == 3


def test_sniff_image_format() -> None:
    assert sniff_image_format(b"\xff\xd8\xff\xe0rest") == "jpg"
    assert sniff_image_format(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_image_format(b"<html>") is None
    assert sniff_image_format(b"") is None


def test_sources_are_deterministic(tmp_path: Path) -> None:
    from vecap.demo.sample_data import _write_sources

    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = _write_sources(tmp_path / name, n_images=12, seed=3)
        runs.append((rows, {p.name: _sha(p.read_bytes()) for p in (tmp_path / name).iterdir()}))
    assert runs[0] == runs[1]
