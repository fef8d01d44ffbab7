"""What reaches the models: duplicate input keys through the whole pipeline (one row per key in every
stage folder, one sample per key in the tars), and captions that depend on the image."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from helpers import jpeg_bytes, png_bytes, sample_members, stage_output, write_img2dataset_parquet, write_tar

from vecap import vocab
from vecap.layout import STAGES
from vecap.pipeline import run

pytestmark = pytest.mark.slow


def _picture(seed: int) -> bytes:
    """A 64x48 JPEG with a few shapes: distinct seeds, distinct pictures."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (64, 48), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, 40)), int(rng.integers(0, 30))
        draw.rectangle(
            (x0, y0, x0 + int(rng.integers(8, 24)), y0 + int(rng.integers(8, 18))),
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _duplicates_root(root):
    """Shard 00000: key ..01 twice (apart, the second copy another picture and alt-text), ..03 the same
    bytes as ..00 under another key, ..04 two image members, ..05 the same member twice; the input
    Parquet lists ..01 twice and a failed download ..06."""
    first, second, same = _picture(1), _picture(2), _picture(0)
    members = (
        sample_members("0000000", same, alt="Nike Air Max 90 in Paris")
        + sample_members("0000001", first, alt="Kyoto temple gate, 2019")
        + sample_members("0000002", _picture(3), alt="Le Creuset pot on a stove")
        + sample_members("0000001", second, alt="a second copy that must not win")
        + sample_members("0000003", same, alt="Nike Air Max 90 in Paris")
        + [("0000004.jpg", jpeg_bytes()), ("0000004.png", png_bytes()), ("0000004.txt", b"two images")]
        + [("0000005.jpg", _picture(5)), ("0000005.jpg", _picture(6)), ("0000005.txt", b"one image twice")]
        + sample_members("0000007", _picture(7), alt="Golden Gate Bridge at dusk")
    )
    write_tar(root / "images" / "00000.tar", members)
    # the Parquet lists what the tar holds, in the tar's order (both copies of ..01)
    rows = [{"key": name.split(".")[0], "caption": data.decode()} for name, data in members if name.endswith(".txt")]
    rows.append({"key": "0000006", "caption": "gone", "status": "failed_to_download", "error_message": "HTTP 404"})
    write_img2dataset_parquet(root / "images" / "00000.parquet", rows)
    return {"first": first, "second": second}


def test_duplicate_keys_give_one_row_per_key_in_every_stage_and_one_sample_in_the_tars(demo_config, tmp_path):
    root = tmp_path / "dups"
    pictures = _duplicates_root(root)
    result = run(demo_config(root), progress=False)
    assert not result.failed
    keys = {f"000000{i}" for i in range(8)}
    for step in STAGES:
        rows = stage_output(root, step).read_table("00000").to_pylist()
        counts = Counter(r["key"] for r in rows)
        assert set(counts) == keys and set(counts.values()) == {1}, (step, counts)
        stats = stage_output(root, step).read_stats("00000")
        assert stats["n_rows"] == len(keys)
    import pandas as pd

    for folder in ("captions", "fused", "vecap"):
        assert sorted(pd.read_parquet(root / folder).key) == sorted(keys)

    captions = {r["key"]: r for r in stage_output(root, "caption").read_table("00000").to_pylist()}
    assert captions["0000004"]["status"] == captions["0000005"]["status"] == vocab.DUPLICATE_KEY
    assert captions["0000006"]["status"] == vocab.DOWNLOAD_FAILED
    assert all(captions[k]["status"] == vocab.OK for k in ("0000000", "0000001", "0000002", "0000003", "0000007"))
    report = stage_output(root, "caption").read_stats("00000")["read_report"]
    assert report["dropped_duplicate_keys"] == ["0000001"]  # the later copy is counted, never written
    # The same picture under two keys: the same caption (greedy decoding sees the image, not the key).
    assert captions["0000000"]["vlm_caption"] == captions["0000003"]["vlm_caption"]

    fused = {r["key"]: r for r in stage_output(root, "fuse").read_table("00000").to_pylist()}
    assert fused["0000001"]["alt_text"] == "Kyoto temple gate, 2019"  # the first copy's alt-text

    vec = {r["key"]: r for r in stage_output(root, "write").read_table("00000").to_pylist()}
    with tarfile.open(root / "clip" / "00000.tar") as tar:
        names = [m.name for m in tar.getmembers()]
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert len(names) == len(set(names))  # no member twice
    in_tar = Counter(n.split(".", 1)[0] for n in names if n.endswith(".txt"))
    ok = {k for k, r in vec.items() if r["status"] == vocab.OK}
    assert set(in_tar) == ok and set(in_tar.values()) == {1}
    assert "0000001" in ok and members[f"0000001.{vec['0000001']['image_ext']}"] == pictures["first"]
    assert json.loads(members["0000001.json"])["alt_text"] == "Kyoto temple gate, 2019"
    assert json.loads((root / "clip" / "sizes.json").read_text()) == {"00000.tar": len(ok)}


def test_read_alt_texts_agrees_with_the_reader_on_duplicate_keys(tmp_path):
    """`vecap fuse` joins alt-texts from the input Parquet, `vecap run` from the tar: with a key listed
    twice both must pick the same copy, or the staged and streamed runs differ."""
    from vecap.reader import ShardReader, read_alt_texts

    _duplicates_root(tmp_path)
    images = str(tmp_path / "images")
    first = {}
    for s in ShardReader(images, "00000"):
        first.setdefault(s.key, s.alt_text)
    joined = read_alt_texts(images, "00000")
    assert joined["0000001"]["alt_text"] == first["0000001"]


def test_captions_depend_on_the_image(pipeline_root):
    """The tiny VLM has random weights, so its wording means nothing; but greedy decoding of the same
    prompt gives a different caption for most different pictures, which only happens if the pixels
    reach the model. Distinct pictures (by sha256 of the original bytes) → mostly distinct captions."""
    import pandas as pd

    vec = pd.read_parquet(pipeline_root / "vecap")
    captions = pd.read_parquet(pipeline_root / "captions")
    ok = (
        captions[captions.status.isin([vocab.OK, vocab.CAPTION_REJECTED])]
        .drop(columns="sha256")
        .merge(vec[["key", "sha256"]].dropna(), on="key")
    )
    pictures = ok.groupby("sha256").vlm_caption.first()
    assert len(pictures) >= 10
    distinct = pictures.nunique()
    assert distinct / len(pictures) >= 0.5, pictures.tolist()
