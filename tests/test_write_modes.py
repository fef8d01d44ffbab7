"""`write.mix` modes read back as a trainer reads them: the write stage alone (no model) rewrites a
copy of a whole run with ``--overwrite``, and a webdataset loader reads every tar."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import stage_output

from vecap import vocab
from vecap.pipeline import run
from vecap.validation import clean_alt_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def written(pipeline_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes") / "root"
    shutil.copytree(pipeline_root, root)
    return root


def _read_back(root, sizes):
    import webdataset as wds

    urls = [str(root / "clip" / name) for name in sorted(sizes)]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("pilrgb")}


@pytest.mark.parametrize("mix", ["both", "alt", "vec"])
def test_write_mode_read_back_by_a_webdataset_loader(written, demo_config, mix):
    root = written
    fused = {
        r["key"]: r
        for s in sorted(stage_output(root, "fuse").done())
        for r in stage_output(root, "fuse").read_table(s).to_pylist()
    }
    result = run(demo_config(root, f"write.mix={mix}"), ["write"], overwrite=True, progress=False)
    write = stage_output(root, "write")
    assert result.tallies["write"].shards == len(write.done()) == len(stage_output(root, "fuse").done())
    rows = {r["key"]: r for s in sorted(write.done()) for r in write.read_table(s).to_pylist()}
    assert {write.read_stats(s)["fingerprint"]["mix"] for s in write.done()} == {mix}
    sizes = json.loads((root / "clip" / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in (root / "clip").glob("*.tar"))

    samples = _read_back(root, sizes)
    ok = {k for k, r in rows.items() if r["status"] == vocab.OK}
    assert set(samples) == ok and len(samples) == sum(sizes.values()) > 0
    sources = set()
    for key, sample in samples.items():
        f, row = fused[key], rows[key]
        # the alt-text side is the cleaned text the fusion saw; with none, the text is the VLM's fallback
        alt, vec = clean_alt_text(f["alt_text"]), (f["vec_caption"] or "").strip()
        vec_src = "vlm" if not alt and f["vec_source"] == "vlm" else "vec"
        want_vec = mix != "alt"
        expected = (vec or alt, vec_src if vec else "alt") if want_vec else (alt or vec, "alt" if alt else vec_src)
        assert (sample["txt"], row["txt_source"]) == expected, key
        assert sample["txt"] == row["txt"] and sample["txt"].strip()
        sources.add(row["txt_source"])
        image = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
        assert image.mode == "RGB" and image.size == (row["width"], row["height"])
        meta = sample["json"]
        assert meta["alt_text"] == f["alt_text"] and meta["vec_caption"] == f["vec_caption"]
        if mix == "both":  # both captions as members of their own, what a loader can draw from
            assert sample["alt.txt"] == (alt or row["txt"])
            assert sample["vec.txt"] == (f["vec_caption"] or row["txt"])
        else:
            assert "alt.txt" not in sample and "vec.txt" not in sample
    # The alt-texts of the sample include an empty one and a camera file name (no alt-text either): the
    # other caption stands in for them ("vlm" when that is the VLM caption the fusion fell back to).
    if mix == "alt":
        assert "alt" in sources and sources & {"vec", "vlm"} and sources <= {"alt", "vec", "vlm"}
    else:
        assert "vec" in sources and sources <= {"vec", "vlm"}
    counts = {}
    for s in write.done():
        for k, v in write.read_stats(s)["txt_sources"].items():
            counts[k] = counts.get(k, 0) + v
    assert counts == {src: sum(1 for k in ok if rows[k]["txt_source"] == src) for src in sources}
