"""A changed recipe never mixes into committed shards: every fingerprint field is refused without
``--overwrite``; with it, the changed stage and every later stage of exactly the selected shards
are invalidated (and, in one real run, recomputed), nothing else is touched, and ``clip/sizes.json``
always lists exactly the tars present.

Most cases need no model: the markers are written by hand with the fingerprints the stages of the
original recipe compute, and the check is :func:`vecap.planning.invalidate_stale` (or ``run``, which
refuses before it starts Ray). One real run checks the recompute end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import jpeg_bytes, sample_members, stage_output, write_img2dataset_parquet, write_tar

from vecap import schemas, vocab
from vecap.config import load_config
from vecap.layout import STAGES, Layout
from vecap.pipeline import build_stages, run
from vecap.planning import ConfigMismatch, invalidate_stale
from vecap.storage import Storage

SHARDS = ("00000", "00001", "00002")
BASE = ["caption.model=models/tiny-llava", "fuse.model=models/tiny-llama"]
SCHEMAS = {"caption": schemas.CAPTIONS, "fuse": schemas.FUSED, "write": schemas.VECAP}

# override → the fingerprint key the refusal must name (stage, key)
FINGERPRINT_FIELDS = [
    ("caption.model=models/other-vlm", "caption", "model"),
    ("caption.prompt=detailed", "caption", "prompt_id"),
    ("caption.max_new_tokens=7", "caption", "params_sha256"),
    ("caption.temperature=0.7", "caption", "params_sha256"),
    ("caption.top_p=0.9", "caption", "params_sha256"),
    ("caption.dtype=bfloat16", "caption", "params_sha256"),
    ("caption.backend=hf", "caption", "params_sha256"),
    ("caption.engine={max_model_len: 256}", "caption", "params_sha256"),
    ("caption.synthetic_lengths=[4, 8]", "caption", "params_sha256"),
    ("caption.validation.max_words=50", "caption", "checks_sha256"),
    ("caption.validation.skip=[]", "caption", "checks_sha256"),
    ("fuse.model=models/other-llm", "fuse", "model"),
    ("fuse.prompt=capsfusion", "fuse", "prompt_id"),
    ("fuse.max_new_tokens=7", "fuse", "params_sha256"),
    ("fuse.temperature=0.7", "fuse", "params_sha256"),
    ("fuse.top_p=0.9", "fuse", "params_sha256"),
    ("fuse.dtype=bfloat16", "fuse", "params_sha256"),
    ("fuse.engine={max_model_len: 1024}", "fuse", "params_sha256"),
    ("fuse.validation.min_entity_recall=0.9", "fuse", "checks_sha256"),
    ("fuse.validation.max_novel=3", "fuse", "checks_sha256"),
    ("write.mix=alt", "write", "mix"),
    ("write.p_vec=0.9", "write", "p_vec"),
    ("seed=1", "write", "seed"),
    ("write.image_exts=[jpg]", "caption", "image"),  # the formats are settled when the caption stage reads
]

# Settings that change how a run is executed, never what it writes: never a refusal.
OPERATIONAL = [
    "caption.actors=3",
    "caption.batch_size=5",
    "caption.cpus_per_actor=1",
    "caption.max_batches_in_flight=1",
    "caption.call_timeout_s=30",
    "fuse.actors=2",
    "fuse.batch_size=3",
    "fuse.request_concurrency=2",
    "max_inflight_shards=1",
    "ray.num_cpus=4",
    "faults.max_consecutive_fatal=2",
    "lease_ttl_s=30",
]


def _cfg(root: Path, *overrides: str):
    return load_config("demo", [f"root={root}", *BASE, *overrides])


def _fingerprints(cfg) -> dict[str, dict]:
    return {step: stage.fingerprint() for step, stage in build_stages(cfg, STAGES).items()}


def _written_root(root: Path, cfg) -> Path:
    """A root whose three stages are committed for SHARDS with ``cfg``'s fingerprints, by hand:
    input tars, one Parquet per stage and shard, markers, CLIP tars and sizes.json."""
    layout, storage = Layout(str(root)), Storage.for_path(str(root))
    prints = _fingerprints(cfg)
    for shard in SHARDS:
        key = f"{shard}0001"
        write_tar(root / "images" / f"{shard}.tar", sample_members(key, jpeg_bytes()))
        write_img2dataset_parquet(root / "images" / f"{shard}.parquet", [{"key": key, "caption": "an alt text"}])
        for step in STAGES:
            table = schemas.table([{"key": key, "shard": shard, "status": "ok"}], SCHEMAS[step])
            if step == "write":
                write_tar(Path(layout.tar(shard)), sample_members(key, jpeg_bytes()))
            stats = {"n_rows": 1, "n_samples": 1, "fingerprint": prints[step]}
            stage_output(root, step).commit(shard, table, stats)
    from vecap.outputs import write_sizes

    write_sizes(layout, storage)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every committed file of the root (markers, Parquet, tars, sizes.json), by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parts[len(root.parts)] in ("captions", "fused", "vecap", "clip") and p.name != "_run.json"
    }


def _files_of(step: str, shard: str) -> set[str]:
    folder = {"caption": "captions", "fuse": "fused", "write": "vecap"}[step]
    files = {f"{folder}/{shard}.parquet", f"{folder}/_done/{shard}.json"}
    return files | ({f"clip/{shard}.tar"} if step == "write" else set())


def assert_sizes_equal_tars(root: Path) -> None:
    sizes = json.loads((root / "clip" / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in (root / "clip").glob("*.tar")), sizes


@pytest.mark.parametrize("override,step,key", FINGERPRINT_FIELDS, ids=[f[0].split("=")[0] for f in FINGERPRINT_FIELDS])
def test_every_fingerprint_field_is_refused_then_overwritten_for_the_selected_shards_only(
    tmp_path, override, step, key
):
    root = _written_root(tmp_path / "root", _cfg(tmp_path / "root"))
    layout, storage = Layout(str(root)), Storage.for_path(str(root))
    changed = _cfg(root, override)
    before = _fingerprints(_cfg(root))
    after = _fingerprints(changed)
    changed_stages = {s for s in STAGES if before[s] != after[s]}
    # one stage's field; write.image_exts is also the caption stage's (other formats settled at read)
    assert changed_stages == ({step, "write"} if override.startswith("write.image_exts") else {step})
    assert before[step][key] != after[step][key]

    # Refused, by a real `run` (before any engine starts), naming the field; nothing touched.
    snapshot = _snapshot(root)
    steps = STAGES[STAGES.index(step) :]
    with pytest.raises(ConfigMismatch, match=rf"{key}.*--overwrite"):
        run(changed, steps, progress=False)
    with pytest.raises(ConfigMismatch, match=key):
        run(changed, steps, shards=["00001"], progress=False)
    assert _snapshot(root) == snapshot
    assert not (root / "_lease.json").exists()  # the refused run released the root

    # --overwrite --shards 00001: that shard's stage and every later stage go, nothing else.
    invalidate_stale(build_stages(changed, STAGES), layout, storage, {"00001"}, overwrite=True)
    gone = set().union(*(_files_of(s, "00001") for s in steps))
    now = _snapshot(root)
    assert set(snapshot) - set(now) - {"clip/sizes.json"} == gone
    assert {p: b for p, b in now.items() if p != "clip/sizes.json"} == {
        p: b for p, b in snapshot.items() if p not in gone and p != "clip/sizes.json"
    }
    assert_sizes_equal_tars(root)
    for s in STAGES:
        expected = set(SHARDS) - ({"00001"} if s in steps else set())
        assert stage_output(root, s).done() == expected

    # Without --shards: every remaining shard made with the old settings goes the same way.
    invalidate_stale(build_stages(changed, STAGES), layout, storage, None, overwrite=True)
    for s in STAGES:
        assert stage_output(root, s).done() == (set() if s in steps else set(SHARDS))
    assert_sizes_equal_tars(root)


@pytest.mark.parametrize("override", OPERATIONAL)
def test_operational_settings_are_not_part_of_the_fingerprint(tmp_path, override):
    root = _written_root(tmp_path / "root", _cfg(tmp_path / "root"))
    snapshot = _snapshot(root)
    changed = _cfg(root, override)
    assert _fingerprints(changed) == _fingerprints(_cfg(root))
    invalidate_stale(
        build_stages(changed, STAGES), Layout(str(root)), Storage.for_path(str(root)), None, overwrite=False
    )
    assert _snapshot(root) == snapshot


def test_a_new_shard_with_other_settings_is_refused_even_with_shards(tmp_path):
    """Committed 00000-00001 with the old prompt, a new shard 00002 selected: adding it with the new
    prompt would mix two prompts in captions/ — refused unless --overwrite."""
    root = _written_root(tmp_path / "root", _cfg(tmp_path / "root"))
    for step in STAGES:
        stage_output(root, step).invalidate("00002")
    with pytest.raises(ConfigMismatch):
        invalidate_stale(
            build_stages(_cfg(root, "caption.prompt=detailed"), ["caption"]),
            Layout(str(root)),
            Storage.for_path(str(root)),
            {"00002"},
            overwrite=False,
        )


@pytest.mark.parametrize(
    "overrides,step",
    [
        (["caption.image_size=64"], "caption"),  # the pixels the VLM sees
        (["caption.max_image_pixels=1000"], "caption"),  # which images become image_too_large
        (["caption.max_image_bytes=1000"], "caption"),
        (["fuse.max_alt_text_words=5"], "fuse"),  # the prompt the LLM sees
        (["caption.temperature=0.7", "seed=1"], "caption"),
    ],  # sampled decoding: the per-sample seeds
    ids=["image_size", "max_image_pixels", "max_image_bytes", "max_alt_text_words", "seed_when_sampling"],
)
def test_settings_that_change_outputs_are_in_the_fingerprint(tmp_path, overrides, step):
    base = _fingerprints(_cfg(tmp_path, *overrides[:-1] if len(overrides) > 1 else []))
    assert base[step] != _fingerprints(_cfg(tmp_path, *overrides))[step]


# --- one real run ----------------------------------------------------------------------------
@pytest.mark.slow
def test_overwrite_recomputes_the_stage_and_every_later_stage_of_exactly_those_shards(
    pipeline_root, tmp_path, demo_config
):
    """On a copy of a whole run: a changed caption setting with --overwrite --shards 00001
    recomputes captions, fused, vecap and the tar of 00001, and leaves every other shard's files
    byte for byte; first through `vecap caption` alone (its tar goes, sizes.json follows), then
    the rest of the shard through `vecap run --overwrite --shards 00001`."""
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    shards = sorted(stage_output(root, "write").done())
    assert "00001" in shards and len(shards) > 2
    snapshot = _snapshot(root)
    cfg = demo_config(root, "caption.max_new_tokens=12")
    with pytest.raises(ConfigMismatch, match="params_sha256"):
        run(cfg, progress=False)

    # `vecap caption --overwrite --shards 00001`: the captions are recomputed; fused/vecap/clip of
    # 00001 were built from the old captions and are invalidated, and sizes.json never lists the tar.
    result = run(cfg, ["caption"], shards=["00001"], overwrite=True, progress=False)
    assert result.tallies["caption"].shards == 1
    now = _snapshot(root)
    assert not any(p.startswith(("fused/", "vecap/", "clip/")) and "00001" in p for p in now)
    assert_sizes_equal_tars(root)
    assert "00001.tar" not in json.loads((root / "clip" / "sizes.json").read_text())
    old_params = json.loads(snapshot["captions/_done/00001.json"])["fingerprint"]["params_sha256"]
    new_stats = stage_output(root, "caption").read_stats("00001")
    assert new_stats["fingerprint"]["params_sha256"] != old_params
    rows = stage_output(root, "caption").read_table("00001").to_pylist()
    assert {r["params_sha256"] for r in rows} == {new_stats["fingerprint"]["params_sha256"]}
    assert max(r["n_output_tokens"] or 0 for r in rows) <= 12
    old = {r["key"]: r for r in stage_output(pipeline_root, "caption").read_table("00001").to_pylist()}
    assert sorted(old) == sorted(r["key"] for r in rows)
    assert any(r["vlm_caption"] != old[r["key"]]["vlm_caption"] for r in rows)  # really recomputed

    # `vecap run --overwrite --shards 00001`: the rest of 00001 only, from its new captions.
    result = run(cfg, shards=["00001"], overwrite=True, progress=False)
    assert (result.tallies["caption"].shards, result.tallies["fuse"].shards, result.tallies["write"].shards) == (
        0,
        1,
        1,
    )
    final = _snapshot(root)
    touched = {p for p in final if "00001" in p} | {"clip/sizes.json"}
    assert {p: b for p, b in final.items() if p not in touched} == {
        p: b for p, b in snapshot.items() if p not in touched
    }
    assert set(final) == set(snapshot)
    for step in STAGES:
        assert stage_output(root, step).done() == set(shards)
    fused = {r["key"]: r for r in stage_output(root, "fuse").read_table("00001").to_pylist()}
    captions = {r["key"]: r for r in rows}
    assert set(fused) == set(captions)
    for key, r in fused.items():  # the fused rows were built from the new captions
        if captions[key]["status"] == vocab.OK:
            assert r["vlm_caption"] == captions[key]["vlm_caption"]
    assert_sizes_equal_tars(root)
    sizes = json.loads((root / "clip" / "sizes.json").read_text())
    assert sizes["00001.tar"] == stage_output(root, "write").read_stats("00001")["n_samples"]
    with pytest.raises(ConfigMismatch):  # the other shards still hold the old captions
        run(cfg, progress=False)
