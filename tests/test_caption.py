"""Stage 1 with the real vLLM engine (CPU build) on a tiny random LLaVA, inside a real local Ray."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import BAD_SHARD, BAD_STATUSES, bad_images
from helpers import marker_path, stage_output

from vecap import schemas, vocab
from vecap.images import ImageRejected, prepare_image
from vecap.pipeline import run
from vecap.reader import ShardReader, list_shards
from vecap.validation import CAPTION_REASONS

pytestmark = pytest.mark.slow


def _input_keys(images) -> dict[str, set[str]]:
    return {s: {x.key for x in ShardReader(str(images), s)} for s in list_shards(str(images))}


def test_caption_stage_with_vllm_actor_pool(make_root, demo_config):
    root = make_root()
    cfg = demo_config(root, "caption.actors=2", "caption.batch_size=8")
    result = run(cfg, ["caption"], progress=False)
    captions = stage_output(root, "caption")
    expected = _input_keys(root / "images")
    assert captions.done() == set(expected)
    assert result.tallies["caption"].shards == len(expected)
    for shard, keys in expected.items():
        table = captions.read_table(shard)
        assert table.schema.equals(schemas.CAPTIONS)
        rows = table.to_pylist()
        assert sorted(r["key"] for r in rows) == sorted(keys)  # every input key exactly once
        for r in rows:
            assert r["status"] and r["shard"] == shard
            assert r["model"] == cfg.caption.model and r["prompt_id"] == "concise"
            assert len(r["prompt_sha256"]) == 64 and len(r["params_sha256"]) == 64
            if r["status"] == vocab.OK:
                assert r["vlm_caption"] and r["n_output_tokens"] > 0 and r["finish_reason"] in ("stop", "length")
                assert r["reason"] is None
            elif r["status"] == vocab.CAPTION_REJECTED:
                assert r["reason"] in CAPTION_REASONS and r["vlm_caption"] is not None  # kept for inspection, not used
                assert not (r["error"] or "").startswith(f"{r['reason']}:")  # the detail alone
            else:
                assert r["reason"] == r["status"] and r["error"] and not r["vlm_caption"]
        stats = captions.read_stats(shard)
        assert stats["n_rows"] == len(keys) and sum(stats["statuses"].values()) == len(keys)
    all_rows = {r["key"]: r for s in expected for r in captions.read_table(s).to_pylist()}
    # failed downloads from img2dataset are rows too, with their status
    assert any(r["status"] == vocab.DOWNLOAD_FAILED for r in all_rows.values())
    # bad images: their statuses, and the rest of their shard captioned anyway; the GIF decodes but is a
    # format the CLIP tar will not take, settled when it is read
    read_statuses = {**BAD_STATUSES, "9900004": vocab.UNSUPPORTED_FORMAT}
    for key, status in read_statuses.items():
        assert all_rows[key]["status"] == status, (key, all_rows[key])
    for key in set(bad_images()) - set(read_statuses):
        assert all_rows[key]["status"] == vocab.OK, (key, all_rows[key])

    # Rerun: nothing to do, nothing rewritten.
    before = {s: marker_path(root, "caption", s).read_bytes() for s in expected}
    again = run(cfg, ["caption"], progress=False)
    assert again.tallies["caption"].shards == 0 and again.tallies["caption"].skipped_shards == len(expected)
    assert {s: marker_path(root, "caption", s).read_bytes() for s in expected} == before

    # Delete one done marker: only that shard reruns, and gives identical content.
    victim = sorted(expected)[1]
    old_table = captions.read_table(victim)
    marker_path(root, "caption", victim).unlink()
    resumed = run(cfg, ["caption"], progress=False)
    assert resumed.tallies["caption"].shards == 1
    assert captions.read_table(victim).equals(old_table)
    for s in set(expected) - {victim}:
        assert marker_path(root, "caption", s).read_bytes() == before[s]


def test_same_inputs_same_parquet_in_a_fresh_root(make_root, demo_config, pipeline_root):
    """Determinism across runs (greedy): a caption-only run with two actors and batches of 4 writes
    the Parquet of the whole demo run (one actor, batches of 16, fusing beside it)."""
    a = make_root("a")
    run(
        demo_config(a, "caption.actors=2", "caption.batch_size=4"),
        ["caption"],
        shards=[BAD_SHARD, "00000"],
        progress=False,
    )
    for shard in (BAD_SHARD, "00000"):
        ta = pq.read_table(a / "captions" / f"{shard}.parquet")
        tb = pq.read_table(pipeline_root / "captions" / f"{shard}.parquet")
        assert ta.equals(tb)


def test_changed_prompt_is_refused_unless_overwrite(make_root, demo_config):
    """--overwrite --shards recomputes exactly the selected shards; the others keep their work."""
    from vecap.planning import ConfigMismatch

    root = make_root()
    run(demo_config(root), ["caption"], shards=["00000", "00001"], progress=False)
    kept = marker_path(root, "caption", "00001").read_bytes()
    with pytest.raises(ConfigMismatch, match="prompt"):
        run(demo_config(root, "caption.prompt=detailed"), ["caption"], shards=["00000"], progress=False)
    result = run(
        demo_config(root, "caption.prompt=detailed"), ["caption"], shards=["00000"], overwrite=True, progress=False
    )
    assert result.tallies["caption"].shards == 1
    assert set(pq.read_table(root / "captions" / "00000.parquet").column("prompt_id").to_pylist()) == {"detailed"}
    assert marker_path(root, "caption", "00001").read_bytes() == kept  # not selected: not invalidated


@pytest.mark.parametrize(
    "key,status", [(k, v) for k, v in BAD_STATUSES.items()] + [("9900004", "ok"), ("9900005", "ok"), ("9900006", "ok")]
)
def test_prepare_image_statuses(key, status):
    data = bad_images()[key]
    if status == "ok":
        img = prepare_image(data, 32, 64_000_000, 1 << 20)
        assert len(img.pixels) == img.width * img.height * 3
    else:
        with pytest.raises(ImageRejected) as err:
            prepare_image(data, 32, 64_000_000, 1 << 20)
        assert err.value.status == status


def test_prepare_image_normalises_modes_orientation_and_size():
    images = bad_images()
    rotated = prepare_image(images["9900009"], 336, 10**8, 1 << 24)
    assert (rotated.width, rotated.height) == (30, 60)  # EXIF orientation applied
    big = prepare_image(images["9900010"], 336, 10**8, 1 << 24)
    assert min(big.width, big.height) == 336 and (big.orig_width, big.orig_height) == (1200, 900)
    rgba = prepare_image(images["9900007"], 336, 10**8, 1 << 24).to_pil()
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    sixteen = prepare_image(images["9900005"], 336, 10**8, 1 << 24).to_pil()
    assert max(sixteen.getextrema()[0]) > 100  # scaled down from 16 bits, not clipped to 255
    with pytest.raises(ImageRejected, match="bytes"):
        prepare_image(images["9900010"], 336, 10**8, 100)
