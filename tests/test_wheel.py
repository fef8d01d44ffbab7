"""The package is the library: a wheel built from the repo holds vecap with its recipes, prompts and report
template as package data, and nothing else of the repository (no bench, tests, demo data).

The recipes and prompts live at the repository's top level (``pipelines/``, ``prompts/``) and are mapped into
the package as ``vecap.pipelines`` and ``vecap.prompts``: ``-c demo``, ``-c gpu``, recipe paths and the
prompts must be found from an installed wheel outside any checkout, from the editable install (what
``make setup`` makes) and from a source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: where vecap, its recipes and its prompts were found, and what they hold.
PROBE = r"""
import json, sys
from importlib.resources import files
from pathlib import Path

if "--uninstalled" in sys.argv:  # a source tree on sys.path: without the editable install's finder
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import vecap
from vecap.config import load_config, packaged_recipes, resolve_recipe
from vecap.prompting import list_prompts, load_prompt

def found(name):
    try:
        return str(files(f"vecap.{name}"))
    except ModuleNotFoundError:
        return None

print(json.dumps({
    "vecap": str(Path(vecap.__file__).parent),
    "files": {name: found(name) for name in ("pipelines", "prompts")},
    "recipes": packaged_recipes(),
    "demo": str(resolve_recipe("demo")),
    "gpu": str(resolve_recipe("gpu")),
    "models": [load_config(name).caption.model for name in ("demo", "gpu")],
    "paths": {arg: load_config(arg).seed for arg in sys.argv[1:] if arg.endswith(".yaml")},
    "prompts": {stage: list_prompts(stage) for stage in ("caption", "fuse")},
    "prompt_ids": [load_prompt("caption", "concise").id, load_prompt("fuse", "vecap").id],
}))
"""


def _probe(cwd: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["recipes"] == ["demo", "gpu", "qwen2vl-gpu"]
    assert out["models"][1] == "llava-hf/llava-1.5-7b-hf"
    assert out["prompts"] == {"caption": ["concise", "detailed"], "fuse": ["capsfusion", "vecap"]}
    assert out["prompt_ids"] == ["concise", "vecap"]
    return out


def _plan_gpu(cwd: Path, config: str, env: dict[str, str] | None = None) -> None:
    """The command line itself, with a recipe by name or path (``vecap plan`` needs no Ray)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vecap.cli", "plan", "--config", config, "--images", "1000000"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU-hours" in proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the source tree (git's files, tracked or not ignored): setuptools builds in the
    tree it is given, and a build/ left in the checkout would carry files the checkout no longer has."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # (a file deleted but not yet committed is listed too)
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("vecap-*.whl"))


def test_wheel_holds_the_library_and_its_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "vecap/prompts/caption/concise.yaml",
        "vecap/prompts/fuse/vecap.yaml",
        "vecap/pipelines/demo.yaml",
        "vecap/pipelines/gpu.yaml",
        "vecap/pipelines/qwen2vl-gpu.yaml",
        "vecap/prompting.py",
        "vecap/pipeline.py",
        "vecap/demo/tiny_models.py",
    } <= names
    assert any(n.startswith("vecap/report/templates/") for n in names)
    # pyproject.toml lists the packages: every module of vecap/ and every file of the data folders is shipped.
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "vecap").rglob("*.py")}
    data = {
        "vecap/" + p.relative_to(REPO).as_posix()
        for folder in ("pipelines", "prompts")
        for p in (REPO / folder).rglob("*")
        if p.suffix in (".yaml", ".py")
    }
    assert source | data <= names, sorted((source | data) - names)
    tops = {n.split("/", 1)[0] for n in names}
    assert all(t == "vecap" or t.endswith(".dist-info") for t in tops), tops  # no bench/, tests/, docs/
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vecap = vecap.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_finds_recipes_and_prompts_outside_any_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mine = elsewhere / "mine.yaml"
    mine.write_text("seed: 7\n")
    env = {"PYTHONPATH": str(site)}  # ahead of the environment's own (editable) vecap
    out = _probe(elsewhere, str(mine), env=env)
    installed = site / "vecap"
    assert out["vecap"] == str(installed)
    assert out["files"] == {"pipelines": str(installed / "pipelines"), "prompts": str(installed / "prompts")}
    assert out["demo"] == str(installed / "pipelines" / "demo.yaml")
    assert out["gpu"] == str(installed / "pipelines" / "gpu.yaml")
    assert out["paths"] == {str(mine): 7}
    _plan_gpu(elsewhere, "gpu", env=env)


def test_editable_install_maps_the_top_level_folders(tmp_path):
    # (not metadata.distribution: from the checkout it may find the build's vecap.egg-info first)
    urls = [json.loads(d.read_text("direct_url.json") or "{}") for d in metadata.distributions(name="vecap")]
    if not any(u.get("dir_info", {}).get("editable") and u.get("url") == REPO.as_uri() for u in urls):
        pytest.skip("vecap is not installed from this checkout in editable mode here (make setup does that)")
    out = _probe(tmp_path)  # outside the checkout: only the install's finder knows the folders
    assert out["vecap"] == str(REPO / "vecap")
    assert out["files"] == {"pipelines": str(REPO / "pipelines"), "prompts": str(REPO / "prompts")}
    assert out["demo"] == str(REPO / "pipelines" / "demo.yaml")
    _plan_gpu(tmp_path, "gpu")


def test_checkout_takes_recipe_paths_and_reads_its_folders_uninstalled():
    out = _probe(REPO, "pipelines/gpu.yaml", "pipelines/demo.yaml", "--uninstalled")
    assert out["vecap"] == str(REPO / "vecap")
    assert out["files"] == {"pipelines": None, "prompts": None}  # not importable: read from the tree
    assert out["gpu"] == str(REPO / "pipelines" / "gpu.yaml")
    assert out["paths"] == {"pipelines/gpu.yaml": 0, "pipelines/demo.yaml": 0}
    _plan_gpu(REPO, "pipelines/gpu.yaml")
