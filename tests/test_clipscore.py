"""Optional CLIPScore (vecap.clipscore): the scorer on a tiny random CLIP, and the write stage's columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def reference_scores(model_dir: Path, images: list, texts: list[str], negate_text: bool = False) -> list[float]:
    """100 * max(cos, 0) of CLIPModel's own ``image_embeds`` and ``text_embeds`` (its forward pass, one
    pair at a time, no padding), computed here with transformers alone; ``negate_text`` flips the text
    embedding (every cosine changes sign, to reach the clamp)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for image, text in zip(images, texts, strict=True):
            inputs = processor(
                text=[text],
                images=[image.convert("RGB")],
                return_tensors="pt",
                truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
            )
            res = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
            )
            text_embeds = -res.text_embeds if negate_text else res.text_embeds
            cos = torch.nn.functional.cosine_similarity(res.image_embeds, text_embeds).item()
            out.append(100.0 * max(cos, 0.0))
    return out


def _negated_text_tower(tiny_clip: Path, out: Path) -> Path:
    """A copy of the model whose text projection is negated: each cosine of the original, sign flipped."""
    import shutil

    import torch
    from transformers import CLIPModel

    shutil.copytree(tiny_clip, out)
    model = CLIPModel.from_pretrained(tiny_clip)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(out)
    return out


TEXTS = ["a red car parked on a city street", "Tower Bridge in London, 2019", "a cat " * 200]  # the last: truncated


def test_scores_are_100_max_cos_of_the_models_own_embeddings(tiny_clip: Path, tmp_path: Path) -> None:
    from vecap.clipscore import ClipScorer

    images = _images()
    pairs = [(im, t) for im in images for t in TEXTS]  # every image with every text: 9 rows
    expect = reference_scores(tiny_clip, [im for im, _ in pairs], [t for _, t in pairs])
    got = ClipScorer(str(tiny_clip), batch_size=4).scores([im for im, _ in pairs], {"t": [t for _, t in pairs]})["t"]
    assert got == pytest.approx(expect, abs=1e-3)
    assert len({round(v, 3) for v in expect}) > 4  # the rows really differ
    # The clamp: with the text tower negated every cosine changes sign; what was positive scores 0,
    # what was clamped to 0 now scores its |cos|.
    flipped = _negated_text_tower(tiny_clip, tmp_path / "negated")
    negative = ClipScorer(str(flipped)).scores([im for im, _ in pairs], {"t": [t for _, t in pairs]})["t"]
    assert negative == pytest.approx(
        reference_scores(tiny_clip, [im for im, _ in pairs], [t for _, t in pairs], negate_text=True), abs=1e-3
    )
    assert all(n == 0.0 for n, e in zip(negative, expect, strict=True) if e > 1e-3) and 0.0 in negative


def test_tiny_clip_build_is_reused(tiny_clip: Path) -> None:
    from transformers import CLIPModel

    stamp = (tiny_clip / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_clip(tiny_clip.parent) == tiny_clip
    assert (tiny_clip / "model.safetensors").stat().st_mtime_ns == stamp
    loaded: Any = CLIPModel.from_pretrained(tiny_clip, output_loading_info=True)
    info = loaded[1]
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_scores(tiny_clip: Path) -> None:
    from vecap.clipscore import ClipScorer, get_scorer

    scorer = get_scorer(str(tiny_clip))
    assert get_scorer(str(tiny_clip)) is scorer  # one model per process and device
    images = _images()
    same = "a red car parked on a city street"
    texts: dict[str, list[str | None]] = {
        "alt": [same, same, same],
        "vlm": ["a dog on a beach", None, "  "],
        "vec": ["a cat " * 200, "a blue bottle in a kitchen", None],  # the first is truncated to 77 tokens
    }
    out = scorer.scores(images, texts)
    assert set(out) == set(texts) and all(len(v) == 3 for v in out.values())
    assert out["vlm"][1] is None and out["vlm"][2] is None and out["vec"][2] is None
    for name, values in out.items():
        for v, t in zip(values, texts[name], strict=True):
            assert (v is None) == (t is None or not t.strip())
            if v is not None:
                assert isinstance(v, float) and 0.0 <= v <= 100.0
    # the same text scores differently against different images
    assert len({round(v, 5) for v in out["alt"] if v is not None}) == 3
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
def test_pipeline_clip_scores(make_root, demo_config, tiny_clip: Path, monkeypatch) -> None:
    import tarfile

    from conftest import BAD_SHARD

    from vecap.clipscore import ClipScorer, get_scorer
    from vecap.images import prepare_image
    from vecap.layout import Layout
    from vecap.pipeline import build_stages, run
    from vecap.planning import ConfigMismatch
    from vecap.stages.write import WriteStage, write_shard
    from vecap.storage import Storage
    from vecap.validation import clean_alt_text

    root = make_root()
    shards = ["00000", BAD_SHARD]
    run(demo_config(root, f"write.clip_model={tiny_clip}"), shards=shards, progress=False)
    table = pq.read_table(root / "vecap").to_pandas()
    assert len(table) > 0 and (table["status"] == "ok").sum() > 0 and (table["status"] != "ok").sum() > 0
    n_scored = 0
    for row in table.itertuples():
        texts = {"alt": clean_alt_text(row.alt_text), "vlm_caption": row.vlm_caption, "vec_caption": row.vec_caption}
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

    # Each score is 100 * max(cos, 0) of the model's own embeddings, computed here with transformers
    # alone, of the row's image as the write stage scores it (decoded no larger than the CLIP input)
    # and each of its texts: a few ok rows of each shard (the bad-images shard has CMYK, 16-bit, EXIF...).
    def write_stage(*overrides: str) -> WriteStage:
        stage = build_stages(demo_config(root, f"write.clip_model={tiny_clip}", *overrides), ["write"])["write"]
        assert isinstance(stage, WriteStage)
        return stage

    stage = write_stage()
    ref_images: list = []
    ref_texts: list[str] = []
    ref_got: list[float] = []
    for shard in shards:
        with tarfile.open(root / "clip" / f"{shard}.tar") as tar:
            members = {m.name: f.read() for m in tar.getmembers() if (f := tar.extractfile(m)) is not None}
        for row in table[(table.status == "ok") & (table.shard == shard)].head(3).itertuples():
            data = members[f"{row.key}.{row.image_ext}"]
            image = prepare_image(
                data, get_scorer(str(tiny_clip)).image_size, stage.max_image_pixels, stage.max_image_bytes
            ).to_pil()
            row_texts = {
                "clip_score_alt": clean_alt_text(row.alt_text),
                "clip_score_vlm": row.vlm_caption,
                "clip_score_vec": row.vec_caption,
            }
            for column, text in row_texts.items():
                if isinstance(text, str) and text.strip():
                    ref_images.append(image)
                    ref_texts.append(text)
                    ref_got.append(getattr(row, column))
    assert len(ref_got) >= 6
    assert ref_got == pytest.approx(reference_scores(tiny_clip, ref_images, ref_texts), abs=1e-3)

    # write.clip_batch_size: the scorer is called with batches of that size (and the remainder),
    # and the scores do not depend on it.
    seen: list[tuple[int, int]] = []
    scores = ClipScorer.scores

    def spy(self: ClipScorer, images: list, texts: dict) -> dict:
        seen.append((len(images), self.batch_size))
        return scores(self, images, texts)

    monkeypatch.setattr(ClipScorer, "scores", spy)
    by_key = table.set_index("key")
    n_scored = int(table[list(CLIP_COLUMNS)].notna().any(axis=1).sum())
    for size in (1, 3):
        stage = write_stage(f"write.clip_batch_size={size}")
        assert stage.clip_batch_size == size
        seen.clear()
        for shard in shards:
            write_shard(Storage.for_path(str(root)), Layout(str(root)), shard, stage)
        assert seen and all(n <= size and batch == size for n, batch in seen), (size, seen)
        assert sum(n for n, _ in seen) == n_scored and max(n for n, _ in seen) == size
        again = pq.read_table(root / "vecap").to_pandas().set_index("key").loc[by_key.index]
        for column in CLIP_COLUMNS:
            expect = pytest.approx(by_key[column].tolist(), abs=1e-3, nan_ok=True)
            assert again[column].tolist() == expect, (size, column)
    monkeypatch.undo()

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
    import dataclasses

    from vecap.config import PipelineConfig
    from vecap.stages.write import WriteStage

    stage = WriteStage.from_config(PipelineConfig(root="r"))  # the recipe schema's defaults
    assert stage.fingerprint() == {
        "mix": "random",
        "p_vec": 0.5,
        "seed": 0,
        "image_exts": ["jpg", "png", "webp"],
        "max_image_bytes": 32 << 20,
        "alt_text": {"clean": "vecap.validation", "max_words": 64},
    }
    assert dataclasses.replace(stage, clip_model="m").fingerprint()["clip_model"] == "m"
