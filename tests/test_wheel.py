"""The package is the library: a wheel built from the repo holds vecap with its prompts, recipes and
report template as package data, and nothing else of the repository (no bench, tests, demo data)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_library_and_its_package_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("vecap-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vecap/prompts/caption/concise.yaml", "vecap/prompts/fuse/vecap.yaml", "vecap/recipes/demo.yaml",
            "vecap/recipes/gpu.yaml", "vecap/pipeline.py", "vecap/demo/tiny_models.py"} <= names
    assert any(n.startswith("vecap/report/templates/") for n in names)
    tops = {n.split("/", 1)[0] for n in names}
    assert all(t == "vecap" or t.endswith(".dist-info") for t in tops), tops  # no bench/, tests/, docs/
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vecap = vecap.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()
