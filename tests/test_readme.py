"""The README's snippets that read outputs run, as written, against a real run's outputs.

Every ```python block runs (the README's paths say data/sample: the test runs them in a
folder where data/sample is a pipeline root), and every `vecap inspect|report|status|plan`
line of its ```bash blocks exits 0 with output (a plan from a GPU benchmark's file excepted). A snippet that does
not run fails here.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
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


def _run_snippet(code: str, label: str) -> tuple[dict, list[tuple[str, object]]]:
    """Run a snippet as written; each top-level expression's value (what a notebook shows) is recorded."""
    tree = ast.parse(code)
    for i, node in enumerate(tree.body):
        call = node.value if isinstance(node, ast.Expr) else None
        if call is not None and not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print"):
            source = ast.Constant(ast.get_source_segment(code, node))
            show = ast.Call(ast.Name("_vecap_show", ast.Load()), [source, call], [])
            tree.body[i] = ast.copy_location(ast.Expr(show), node)
    shown: list[tuple[str, object]] = []
    namespace = {"__name__": "__readme__", "_vecap_show": lambda src, value: shown.append((src, value))}
    exec(compile(ast.fix_missing_locations(tree), label, "exec"), namespace)  # noqa: S102
    return namespace, shown


def _column_counts(folder: Path, column: str) -> dict:
    values = pq.read_table(folder, columns=[column]).column(column).to_pylist()
    return dict(Counter(v for v in values if v is not None))


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_snippet_runs(index, pipeline_root, tmp_path, monkeypatch, capsys):
    """Each snippet runs and produces what it says: every table it reads holds all the stage's shards,
    each value it shows is non-empty, each ``x.column.value_counts()`` equals the folder's counts,
    and the webdataset snippet prints a sample of the CLIP shards whose txt is one of its captions."""
    import pandas as pd

    monkeypatch.chdir(_in_sample_dir(tmp_path, pipeline_root))
    code = blocks("python")[index]
    namespace, shown = _run_snippet(code, f"README.md python block {index}")
    printed = capsys.readouterr().out
    assert shown or printed.strip(), "the snippet shows nothing"
    for src, value in shown:
        assert value is not None and (not hasattr(value, "__len__") or len(value) > 0), src

    # name = pd.read_parquet("data/sample/<folder>"): the whole stage, every shard's rows
    read = dict(re.findall(r'^(\w+) = pd\.read_parquet\("data/sample/(\w+)"\)', code, flags=re.M))
    for name, folder in read.items():
        frame = namespace[name]
        assert isinstance(frame, pd.DataFrame)
        assert len(frame) == pq.read_table(pipeline_root / folder, columns=["key"]).num_rows > 0, name
        assert set(frame["shard"]) == {p.stem for p in (pipeline_root / folder).glob("*.parquet")}, name
    for src, value in shown:
        match = re.fullmatch(r"(\w+)\.(\w+)\.value_counts\(\)", src)
        if match and match.group(1) in read:
            assert value.to_dict() == _column_counts(pipeline_root / read[match.group(1)], match.group(2)), src
        if src.startswith("captions.caption_source"):
            assert set(value.index) <= {"computed", "duplicate", "cache"} and "computed" in value.index

    if "pick_caption" in code:
        sample = namespace["sample"]
        meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
        captions = {(meta.get(f) or "").strip() for f in ("alt_text", "vec_caption")} - {""}
        assert sample["txt"] in captions, (sample["txt"], captions)
        # the tar keeps the input shard's order (img2dataset's, not the keys'): the first member's key
        with tarfile.open(pipeline_root / "clip" / "00000.tar") as tar:
            first = tar.getmembers()[0].name.split(".", 1)[0]
        ok = pq.read_table(pipeline_root / "vecap" / "00000.parquet").to_pandas().query("status == 'ok'").key
        assert first in set(ok)
        assert sample["__key__"] == first  # the first sample of the first tar
        image = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
        assert image.mode == "RGB" and min(image.size) > 0
        assert printed == f"{sample['__key__']} {sample['txt']}\n"


def _commands(block: str) -> list[str]:
    """A bash block's commands, continuation lines joined, comments dropped."""
    return [c.split(" #", 1)[0].strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_inspect_report_status_and_plan_lines_run(pipeline_root, tmp_path):
    work = _in_sample_dir(tmp_path, pipeline_root)
    lines = [
        line
        for block in blocks("bash")
        for line in _commands(block)
        if line.startswith(("vecap inspect", "vecap report", "vecap status", "vecap plan"))
        and "--measured" not in line
        and "s3://" not in line
    ]
    assert lines
    for line in lines:
        argv = shlex.split(line)
        proc = subprocess.run(
            [sys.executable, "-m", "vecap.cli", *argv[1:]], cwd=work, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0 and proc.stdout.strip(), (line, proc.stderr[-2000:])
