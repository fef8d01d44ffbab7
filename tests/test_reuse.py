"""Caption each image once (vecap.reuse): identical images within a run, a caption cache across runs.

The corpus is `vecap sample-data --duplicates 0.3` (a real img2dataset download from loopback):
30% of its images are byte-identical copies under other URLs and alt-texts. One real vLLM run of
the whole pipeline over it, with a cache, is shared by the tests that read its outputs; the
engine's own request counters (in the shards' markers) say what reached the VLM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import stage_output

from vecap import vocab
from vecap.pipeline import build_stages, run
from vecap.reuse import CACHE, COMPUTED, DUPLICATE, CaptionCache, resolve
from vecap.storage import Storage

N_IMAGES, SHARD_SIZE, DUPLICATES = 20, 8, 0.3


@pytest.fixture(scope="module")
def dup_images(tmp_path_factory) -> Path:
    """The corpus, made as a user makes it: `vecap sample-data --duplicates 0.3`."""
    root = tmp_path_factory.mktemp("dups")
    cmd = ["sample-data", "--root", str(root), "--n-images", str(N_IMAGES), "--shard-size", str(SHARD_SIZE)]
    subprocess.run(
        [sys.executable, "-m", "vecap.cli", *cmd, "--duplicates", str(DUPLICATES)], check=True, capture_output=True
    )
    return root / "images"


def _inputs(images: Path) -> pd.DataFrame:
    df = pd.concat([pd.read_parquet(p) for p in sorted(images.glob("*.parquet"))], ignore_index=True)
    return df[df["status"] == "success"]


def _requests(root: Path, stage: str) -> int:
    """What the engine actors counted (every marker's engine counters, summed)."""
    out = stage_output(root, stage)
    return int(sum(m.get("engine", {}).get(f"{stage}_requests", 0) for m in out.markers().values()))


@pytest.fixture(scope="module")
def dup_run(dup_images, tiny_models, ray_local, tmp_path_factory):
    """One real run (vLLM) of caption → fuse → write over the corpus with duplicates, with a cache."""
    from vecap.config import load_config

    base = tmp_path_factory.mktemp("duprun")
    root, cache = base / "root", base / "cache"
    shutil.copytree(dup_images, root / "images")
    models = [f"caption.model={tiny_models['llava']}", f"fuse.model={tiny_models['llama']}"]
    cfg = load_config("demo", [f"root={root}", *models, f"caption.cache={cache}"])
    run(cfg, progress=False)
    return root, cache, cfg


def test_sample_data_repeats_the_chosen_share_of_images(dup_images):
    ok = _inputs(dup_images)
    images = ok[ok["url"].str.contains(r"\.(?:jpg|png|webp)", regex=True)]
    assert len(images) - images["sha256"].nunique() == round(DUPLICATES * N_IMAGES)
    for _, copies in images.groupby("sha256"):
        assert copies["url"].nunique() == len(copies)  # the same bytes under other URLs
        if len(copies) > 1:
            assert copies["caption"].nunique() > 1 or copies["caption"].isna().all()


def test_each_image_reaches_the_vlm_once(dup_run, dup_images):
    root, _, _ = dup_run
    captions = pd.read_parquet(root / "captions")
    fused, vecap = pd.read_parquet(root / "fused"), pd.read_parquet(root / "vecap")
    keys = set(pd.concat([pd.read_parquet(p) for p in dup_images.glob("*.parquet")])["key"])
    for df in (captions, fused, vecap):  # every key has its row, once
        assert sorted(df["key"]) == sorted(keys)

    # Images that reached the VLM: rows whose image could be decoded, once per distinct sha256.
    seen = captions[~captions["status"].isin(vocab.IMAGE_FAILURES)]
    assert _requests(root, "caption") == seen["sha256"].nunique()
    dups = captions[captions["caption_source"] == DUPLICATE]
    assert len(dups) == len(seen) - seen["sha256"].nunique() > 0
    assert set(captions["caption_source"]) == {COMPUTED, DUPLICATE}

    by_key = captions.set_index("key")
    for _, d in dups.iterrows():
        copies = seen[seen["sha256"] == d["sha256"]].sort_values(["shard", "key"])
        first = copies.iloc[0]
        assert d["caption_from"] == first["key"] != d["key"] and d["caption_from_shard"] == first["shard"]
        assert by_key.loc[first["key"], "caption_source"] == COMPUTED
        for col in ("status", "vlm_caption", "finish_reason", "seed"):
            assert d[col] == first[col], col
        assert d["n_output_tokens"] == 0  # no engine time of its own

    # The fusion runs per sample (the alt-texts differ): duplicates are fused with their own alt-text.
    f = fused.set_index("key")
    assert _requests(root, "fuse") == int(fused["finish_reason"].notna().sum())
    fused_dups = [k for k in dups["key"] if pd.notna(f.loc[k, "finish_reason"])]
    assert fused_dups, "no duplicate reached the LLM"
    for k in fused_dups:
        assert f.loc[k, "vlm_caption"] == by_key.loc[by_key.loc[k, "caption_from"], "vlm_caption"]

    stats = {s: m["caption_sources"] for s, m in stage_output(root, "caption").markers().items()}
    assert sum(s.get(DUPLICATE, 0) for s in stats.values()) == len(dups)
    from vecap.inspect import inspect_path

    assert f"duplicate={len(dups)}" in inspect_path(root / "captions")  # `vecap inspect` shows the sources too
    reuse_plans = root / "captions" / "_reuse"
    assert not reuse_plans.exists() or not any(reuse_plans.iterdir())  # the run's reuse plan is removed at its end


def test_a_second_run_takes_cached_captions_without_the_vlm(dup_run, sample_images, demo_config, tmp_path):
    """An overlapping corpus (the plain sample set shares most images with the one with copies):
    no engine call for a cached image, and exactly one for each image the cache lacks."""
    first_root, cache, _ = dup_run
    root = tmp_path / "second"
    shutil.copytree(sample_images, root / "images")
    run(demo_config(root, f"caption.cache={cache}"), ["caption"], progress=False)

    before = pd.read_parquet(first_root / "captions")
    cached = before[(before["caption_source"] == COMPUTED) & before["status"].isin([vocab.OK, vocab.CAPTION_REJECTED])]
    captions = pd.read_parquet(root / "captions")
    seen = captions[~captions["status"].isin(vocab.IMAGE_FAILURES)]
    hits = seen[seen["sha256"].isin(set(cached["sha256"]))]
    assert len(hits) > 0 and len(hits) < len(seen)  # overlapping, not identical
    # Once per image the cache lacks; the hand-made bad shard's Parquet has no sha256: once per row.
    missing = seen[~seen["sha256"].isin(set(cached["sha256"]))]
    assert _requests(root, "caption") == missing["sha256"].nunique() + missing["sha256"].isna().sum()
    assert (hits["caption_source"] == CACHE).all()
    src = cached.drop_duplicates("sha256").set_index("sha256")
    for _, h in hits.iterrows():
        assert h["vlm_caption"] == src.loc[h["sha256"], "vlm_caption"]
        assert h["caption_from"] == src.loc[h["sha256"], "key"]
    assert not (seen[~seen["sha256"].isin(set(cached["sha256"]))]["caption_source"] == CACHE).any()


def test_a_cache_made_with_other_settings_is_not_used(dup_run, dup_images, demo_config, tmp_path):
    _, cache, cfg = dup_run
    made = build_stages(cfg, ["caption"])["caption"].cache
    assert made is not None and made.files()
    other = build_stages(demo_config(tmp_path, f"caption.cache={cache}", "caption.prompt=detailed"), ["caption"])[
        "caption"
    ].cache
    assert other.folder != made.folder and other.files() == []
    assert json.loads(Path(made.folder, "_fingerprint.json").read_text())["prompt_id"] == cfg.caption.prompt

    # Another backend (the dry run's) is another fingerprint: every image goes to its engine.
    root = tmp_path / "dry"
    shutil.copytree(dup_images, root / "images")
    run(demo_config(root, f"caption.cache={cache}", "caption.dedup=false"), ["caption"], progress=False, dry_run=True)
    captions = pd.read_parquet(root / "_dry_run" / "captions")
    seen = captions[~captions["status"].isin(vocab.IMAGE_FAILURES)]
    assert set(seen["caption_source"]) == {COMPUTED}
    assert _requests(root / "_dry_run", "caption") == len(seen)


_WRITER = """
import sys, pyarrow as pa
from vecap.reuse import CaptionCache
cache = CaptionCache(sys.argv[1], {"model": "m"})
rows = [{"key": f"{i:09d}", "status": "ok", "sha256": f"{i:064x}", "vlm_caption": "x" * 400,
         "caption_source": "computed"} for i in range(20000)]
table = pa.Table.from_pylist(rows)
print("ready", flush=True)
n = 0
while True:
    cache.add(table, f"{n:05d}")
    n += 1
"""


def test_a_kill_during_a_cache_update_leaves_a_readable_cache(tmp_path, dup_images, ray_local):
    location = tmp_path / "cache"
    for delay in (0.3, 0.9, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(location)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    cache = CaptionCache(str(location), {"model": "m"})
    files = cache.files()
    assert files, "the writer never finished a file"
    leftovers = [n for n in os.listdir(cache.folder) if n.startswith(".")]
    for f in files:  # every entry file is whole; a killed write is a hidden temporary, never an entry
        assert pq.read_table(f).num_rows == 20000
    assert len(os.listdir(cache.folder)) == len(files) + len(leftovers) + 1  # + _fingerprint.json

    # And a run's resolution reads it as it is.
    out = resolve(
        ["00000", "00001"],
        str(dup_images),
        Storage.for_path(str(dup_images)),
        str(tmp_path / "reuse"),
        dedup=True,
        cache=cache,
    )
    assert out.n_cache == 0 and out.n_duplicate >= 1


def test_a_cache_entry_from_before_the_reason_column_reads_its_reason_off_the_error():
    from vecap.reuse import entry_reason

    assert entry_reason({"status": vocab.CAPTION_REJECTED, "error": "refusal: sorry, I can't"}) == {
        "reason": "refusal",
        "error": "sorry, I can't",
    }
    assert entry_reason({"status": vocab.CAPTION_REJECTED, "error": "truncated"}) == {
        "reason": "truncated",
        "error": None,
    }
    assert entry_reason({"status": vocab.OK, "error": None}) == {"reason": None, "error": None}
    # a current entry is taken as written, even where its detail looks like a reason
    assert entry_reason({"status": vocab.CAPTION_REJECTED, "reason": "echo", "error": "refusal: x"}) == {
        "reason": "echo",
        "error": "refusal: x",
    }


def test_legacy_errors_split_only_at_a_known_reason():
    from vecap.outputs import split_legacy_error

    # an exception's text is a model error's detail, not a reason
    assert split_legacy_error(vocab.MODEL_ERROR, "TypeError: bad input", rejected=False) == (
        vocab.MODEL_ERROR,
        "TypeError: bad input",
    )
    assert split_legacy_error(vocab.MODEL_ERROR, "model_error: duplicate of 1", rejected=False) == (
        vocab.MODEL_ERROR,
        "duplicate of 1",
    )
    assert split_legacy_error(vocab.NO_TEXT, "neither alt-text nor VeC caption has text", rejected=True) == (
        vocab.NO_TEXT,
        "neither alt-text nor VeC caption has text",
    )
    assert split_legacy_error(vocab.OK, "caption_failed: model_error", rejected=True) == (
        "caption_failed",
        "model_error",
    )
    assert split_legacy_error(vocab.IMAGE_TOO_LARGE, "9 bytes > limit 8", rejected=False) == (
        vocab.IMAGE_TOO_LARGE,
        "9 bytes > limit 8",
    )
