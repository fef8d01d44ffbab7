"""Stage 2 with the real vLLM engine (CPU build) on a tiny random Llama, over real captions."""

from __future__ import annotations

import shutil

import pytest
from helpers import marker_path, stage_output

from vecap import schemas, vocab
from vecap.pipeline import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def captioned(sample_images, tmp_path_factory, tiny_models, ray_local):
    from vecap.config import load_config

    root = tmp_path_factory.mktemp("captioned")
    shutil.copytree(sample_images, root / "images")
    cfg = load_config("demo", [f"root={root}", f"caption.model={tiny_models['llava']}"])
    run(cfg, ["caption"], progress=False)
    return root


def test_fuse_stage_with_vllm(captioned, tmp_path, demo_config):
    root = tmp_path / "root"
    shutil.copytree(captioned, root)
    cfg = demo_config(root, "fuse.actors=2", "fuse.batch_size=8")
    result = run(cfg, ["fuse"], progress=False)
    captions, fused = stage_output(root, "caption"), stage_output(root, "fuse")
    assert fused.done() == captions.done()
    assert result.tallies["fuse"].shards == len(captions.done())
    sources = set()
    for shard in sorted(fused.done()):
        c = {r["key"]: r for r in captions.read_table(shard).to_pylist()}
        table = fused.read_table(shard)
        assert table.schema.equals(schemas.FUSED)
        rows = table.to_pylist()
        assert sorted(r["key"] for r in rows) == sorted(c)  # one row per key
        for r in rows:
            assert r["model"] == cfg.fuse.model and r["prompt_id"] == "vecap" and len(r["prompt_sha256"]) == 64
            if c[r["key"]]["status"] in vocab.IMAGE_FAILURES:
                assert r["status"] == c[r["key"]]["status"] and r["vec_caption"] is None
                continue
            assert r["status"] in (vocab.OK, vocab.NO_TEXT)
            assert r["vlm_caption"] == c[r["key"]]["vlm_caption"]
            if r["status"] == vocab.OK:
                assert r["vec_source"] in vocab.VEC_SOURCES and r["vec_caption"]
                sources.add(r["vec_source"])
                if r["vec_source"] != "fused":
                    assert r["reason"] in fusion_reasons()
                else:
                    assert r["reason"] is None and r["error"] is None
                if r["vec_source"] == "fused" or r["reason"] in ("truncated", "refusal", "echo", "garbage"):
                    assert r["n_output_tokens"] > 0 and r["seed"] is not None  # the LLM was called
        stats = fused.read_stats(shard)
        fallbacks = sum(1 for r in rows if r["vec_source"] in ("vlm", "alt"))
        assert sum(stats["fallbacks"].values()) == fallbacks + stats["statuses"].get(vocab.NO_TEXT, 0)
        assert stats["fingerprint"]["model"] == cfg.fuse.model
    assert sources <= {"fused", "vlm", "alt"} and "vlm" in sources  # random weights: fallbacks happen
    # the empty alt-text of the sample data settles without an LLM call
    all_rows = [r for s in fused.done() for r in fused.read_table(s).to_pylist()]
    assert any(r["reason"] == "no_alt_text" and r["n_output_tokens"] is None for r in all_rows)

    # Rerun determinism and single-shard resume.
    victim = sorted(fused.done())[0]
    before = {s: marker_path(root, "fuse", s).read_bytes() for s in fused.done()}
    old = fused.read_table(victim)
    marker_path(root, "fuse", victim).unlink()
    again = run(cfg, ["fuse"], progress=False)
    assert again.tallies["fuse"].shards == 1
    assert fused.read_table(victim).equals(old)
    assert all(marker_path(root, "fuse", s).read_bytes() == before[s] for s in before if s != victim)


def fusion_reasons():
    from vecap.fusion import REASONS

    return set(REASONS) | {"no_alt_text", "no_vlm_caption"}


def test_fuse_without_captions_says_what_to_run(make_root, demo_config):
    root = make_root()
    from vecap.config import ConfigError

    with pytest.raises(ConfigError, match="vecap caption"):
        run(demo_config(root), ["fuse"], progress=False)


def test_retry_failed_redoes_only_failed_rows(captioned, tmp_path, demo_config):
    """Rows whose model call failed are redone alone; the rest of the shard is kept as committed."""
    root = tmp_path / "root"
    shutil.copytree(captioned, root)
    captions = stage_output(root, "caption")
    shard = sorted(captions.done())[0]
    rows = captions.read_table(shard).to_pylist()
    ok_keys = [r["key"] for r in rows if r["status"] == vocab.OK][:2]
    for r in rows:
        if r["key"] in ok_keys:
            r.update(
                status=vocab.MODEL_ERROR, reason=vocab.MODEL_ERROR, error="RuntimeError: simulated", vlm_caption=None
            )
    stats = captions.read_stats(shard)
    captions.commit(shard, schemas.table(rows, schemas.CAPTIONS), stats)
    fused = stage_output(root, "fuse")
    fused.commit(shard, schemas.table([], schemas.FUSED), {"n_rows": 0})  # built from the old rows

    cfg = demo_config(root)
    result = run(cfg, ["caption"], retry_failed=True, progress=False)
    assert result.tallies["caption"].shards == 1
    after = {r["key"]: r for r in captions.read_table(shard).to_pylist()}
    assert len(after) == len(rows)
    for r in rows:
        if r["key"] in ok_keys:
            assert after[r["key"]]["status"] == vocab.OK and after[r["key"]]["vlm_caption"]
        else:
            assert after[r["key"]] == r  # untouched
    assert not fused.is_done(shard)  # derived from the old captions: invalidated
    again = run(cfg, ["caption"], retry_failed=True, progress=False)
    assert again.tallies["caption"].shards == 0  # nothing failed any more
