"""Optional CLIPScore (vecap.clipscore): the scorer on a tiny random CLIP, and the write stage's columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vecap.demo.tiny_models import build_tiny_clip

CLIP_COLUMNS = {"clip_score_alt": "alt", "clip_score_vlm": "vlm_caption", "clip_score_vec": "vec_caption"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _images():
    from PIL import Image

    red = Image.new("RGB", (64, 48), (220, 20, 20))
    noise = Image.effect_noise((40, 70), 80).convert("RGB")
    grad = Image.linear_gradient("L").resize((50, 50)).convert("RGB")
    return [red, noise, grad]


def test_tiny_clip_build_is_reused(tiny_clip: Path) -> None:
    from transformers import CLIPModel

    stamp = (tiny_clip / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_clip(tiny_clip.parent) == tiny_clip
    assert (tiny_clip / "model.safetensors").stat().st_mtime_ns == stamp
    _, info = CLIPModel.from_pretrained(tiny_clip, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_scores(tiny_clip: Path) -> None:
    from vecap.clipscore import ClipScorer, get_scorer

    scorer = get_scorer(str(tiny_clip))
    assert get_scorer(str(tiny_clip)) is scorer  # one model per process and device
    images = _images()
    same = "a red car parked on a city street"
    texts = {
        "alt": [same, same, same],
        "vlm": ["a dog on a beach", None, "  "],
        "vec": ["a cat " * 200, "a blue bottle in a kitchen", None],  # the first is truncated to 77 tokens
    }
    out = scorer.scores(images, texts)
    assert set(out) == set(texts) and all(len(v) == 3 for v in out.values())
    assert out["vlm"][1] is None and out["vlm"][2] is None and out["vec"][2] is None
    for name, values in out.items():
        for v, t in zip(values, texts[name]):
            assert (v is None) == (t is None or not t.strip())
            if v is not None:
                assert isinstance(v, float) and 0.0 <= v <= 100.0
    # the same text scores differently against different images
    assert len({round(v, 5) for v in out["alt"]}) == 3
    # deterministic: again, in other batch sizes, and with a fresh model load
    assert scorer.scores(images, texts) == out
    small = ClipScorer(str(tiny_clip), batch_size=1)
    again = small.scores(images, texts)
    for name in out:
        assert again[name] == pytest.approx(out[name], abs=1e-3)
    # a missing image gives None for every text; no texts at all is fine
    missing = scorer.scores([images[0], None], {"alt": [same, same]})
    assert missing["alt"][1] is None and missing["alt"][0] == pytest.approx(out["alt"][0], abs=1e-3)
    assert scorer.scores([], {"alt": []}) == {"alt": []}
    with pytest.raises(ValueError):
        scorer.scores(images, {"alt": [same]})


@pytest.mark.slow
def test_pipeline_clip_scores(make_root, demo_config, tiny_clip: Path) -> None:
    from conftest import BAD_SHARD

    from vecap.fusion import light_clean
    from vecap.pipeline import ConfigMismatch, run

    root = make_root()
    shards = ["00000", BAD_SHARD]
    run(demo_config(root, f"write.clip_model={tiny_clip}"), shards=shards, progress=False)
    table = pq.read_table(root / "vecap").to_pandas()
    assert len(table) > 0 and (table["status"] == "ok").sum() > 0 and (table["status"] != "ok").sum() > 0
    n_scored = 0
    for row in table.itertuples():
        texts = {"alt": light_clean(row.alt_text), "vlm_caption": row.vlm_caption, "vec_caption": row.vec_caption}
        for column, source in CLIP_COLUMNS.items():
            value = getattr(row, column)
            text = texts[source]
            expect = row.status == "ok" and isinstance(text, str) and bool(text.strip())
            assert (value == value and value is not None) == expect, (row.key, row.status, column, text, value)
            n_scored += expect
    assert n_scored > 0
    schema = pq.read_schema(next((root / "vecap").glob("*.parquet")))
    assert all(str(schema.field(c).type) == "float" for c in CLIP_COLUMNS)
    marker = (root / "vecap" / "_done" / "00000.json").read_text()
    assert str(tiny_clip) in marker  # the model is in the write fingerprint

    # The same root without clip_model: another write fingerprint, so the committed shards refuse
    # a plain rerun; --overwrite redoes them, with the columns null.
    tars = {p.name: p.read_bytes() for p in (root / "clip").glob("*.tar")}
    with pytest.raises(ConfigMismatch):
        run(demo_config(root), ["write"], shards=shards, progress=False)
    run(demo_config(root), ["write"], shards=shards, overwrite=True, progress=False)
    plain = pq.read_table(root / "vecap").to_pandas()
    assert len(plain) == len(table)
    for column in CLIP_COLUMNS:
        assert plain[column].isna().all()
    assert "clip_model" not in (root / "vecap" / "_done" / "00000.json").read_text()
    # the scores never reach the tars: same bytes with and without
    assert {p.name: p.read_bytes() for p in (root / "clip").glob("*.tar")} == tars


def test_fingerprint_unchanged_without_clip() -> None:
    from vecap.stages.write import WriteStage

    assert WriteStage().fingerprint() == {
        "mix": "random", "p_vec": 0.5, "seed": 0, "image_exts": ["jpg", "png", "webp"], "max_image_bytes": 32 << 20,
    }
    assert WriteStage(clip_model="m").fingerprint()["clip_model"] == "m"
