"""The README's snippets that read outputs run, as written, against a real run's outputs.

Every ```python block runs (the README's paths say data/sample: the test runs them in a
folder where data/sample is a pipeline root), and every `vecap inspect|report|status|plan`
line of its ```bash blocks exits 0 with output (a plan from a GPU benchmark's file excepted). A snippet that does not run fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.slow


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _in_sample_dir(tmp_path: Path, pipeline_root: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(pipeline_root)
    return tmp_path


def test_readme_has_the_output_snippets():
    assert len(blocks("python")) >= 2
    assert any("pd.read_parquet" in b for b in blocks("python"))
    assert any("pick_caption" in b for b in blocks("python"))
    assert any("vecap inspect" in b for b in blocks("bash"))


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_snippet_runs(index, pipeline_root, tmp_path, monkeypatch):
    monkeypatch.chdir(_in_sample_dir(tmp_path, pipeline_root))
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102


def _commands(block: str) -> list[str]:
    """A bash block's commands, continuation lines joined, comments dropped."""
    return [c.split(" #", 1)[0].strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_inspect_report_status_and_plan_lines_run(pipeline_root, tmp_path):
    work = _in_sample_dir(tmp_path, pipeline_root)
    lines = [
        line
        for block in blocks("bash")
        for line in _commands(block)
        if line.startswith(("vecap inspect", "vecap report", "vecap status", "vecap plan")) and "--measured" not in line and "s3://" not in line
    ]
    assert lines
    for line in lines:
        argv = shlex.split(line)
        proc = subprocess.run([sys.executable, "-m", "vecap.cli", *argv[1:]], cwd=work, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip(), (line, proc.stderr[-2000:])
