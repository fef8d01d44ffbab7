"""Typed recipes: unknown or mistyped keys are errors that name the key; --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from vecap.config import PIPELINES_DIR, ConfigError, load_config, resolve_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("recipe", sorted(REPO.joinpath("pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.caption.model and cfg.fuse.model
    assert not cfg.caption.trust_remote_code and not cfg.fuse.trust_remote_code


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("caption:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'caption\.batch_sise'"):
        load_config(path)


def test_unknown_top_level_section_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("captoin:\n  model: x\n")
    with pytest.raises(ConfigError, match=r"unknown key 'captoin'"):
        load_config(path)


def test_mistyped_value_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fuse:\n  actors: many\n")
    with pytest.raises(ConfigError, match=r"bad value for 'fuse\.actors'"):
        load_config(path)


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match=r"'write\.mix'"):
        load_config(None, ["write.mix=sometimes"])


def test_set_overrides_are_typed_and_validated():
    cfg = load_config("demo", ["caption.batch_size=3", "write.p_vec=0.25", "root=/tmp/x"])
    assert cfg.caption.batch_size == 3 and cfg.write.p_vec == 0.25 and cfg.root == "/tmp/x"
    with pytest.raises(ConfigError, match=r"unknown key 'caption\.nope'"):
        load_config("demo", ["caption.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["caption.batch_size"])


def test_set_takes_text_as_typed_where_the_schema_wants_a_string():
    cfg = load_config(
        "demo",
        [
            "ray.env.VLLM_ENABLE_V1_MULTIPROCESSING=1",
            "caption.env.VERSION=1.10",
            "fuse.env.FLAG=true",
            "caption.model=7",
            "ray.address=null",
        ],
    )
    assert cfg.ray.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert cfg.caption.env == {"VERSION": "1.10"} and cfg.fuse.env["FLAG"] == "true"
    assert cfg.caption.model == "7" and cfg.ray.address is None
    # elsewhere values stay YAML: numbers where the schema wants numbers, any type in free-form sections
    cfg = load_config("demo", ["seed=5", "caption.engine.max_model_len=2048", "storage_options.anon=true"])
    assert cfg.seed == 5 and cfg.caption.engine["max_model_len"] == 2048 and cfg.storage_options["anon"] is True
    with pytest.raises(ConfigError, match=r"bad value for 'seed'"):
        load_config("demo", ["seed=many"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_recipes_resolve_by_name_or_path(tmp_path):
    assert resolve_recipe("gpu") == PIPELINES_DIR / "gpu.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed: 3\n")
    assert load_config(mine).seed == 3
    with pytest.raises(ConfigError, match="packaged recipes: demo, gpu"):
        load_config("nope")
