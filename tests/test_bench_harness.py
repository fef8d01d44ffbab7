"""The benchmark package's entry point starts, and its harness computes what it reports (pure, fast)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import harness  # noqa: E402
from bench.harness import Harness, Target  # noqa: E402


def test_python_m_bench_help():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--sections" in proc.stdout and "driver" in proc.stdout


def test_unknown_section_is_refused():
    from bench.__main__ import parse_args

    assert parse_args(["--sections", "io,driver"]).sections == ["io", "driver"]
    with pytest.raises(SystemExit):
        parse_args(["--sections", "io,nope"])


def test_median_ignores_missing_values():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([4.0, 1.0, None, 2.0, 3.0]) == 2.5
    assert harness.median([None]) is None and harness.median([]) is None


def test_ratio():
    assert harness.ratio(3.0, 2.0) == 1.5
    assert harness.ratio(None, 2.0) is None and harness.ratio(1.0, None) is None
    assert harness.ratio(1.0, 0.0) is None  # no ratio rather than infinity


def test_alternating_order():
    assert harness.alternating(0, ["a", "b", "c"]) == ["a", "b", "c"]
    assert harness.alternating(1, ["a", "b", "c"]) == ["c", "b", "a"]
    assert harness.alternating(2, ["a", "b"]) == ["a", "b"]


def test_targets_and_rows():
    at_least = Target(">=", 0.9)
    assert at_least.met(0.9) and not at_least.met(0.89) and at_least.met(None) is None
    assert str(at_least) == "≥ 0.9" and str(Target("<=", 1.3)) == "≤ 1.3"
    h = Harness({"x": 10})
    row = h.add("x", "stage / engine", "images/s", 9.0, 10.0, at_least)
    assert row.ratio == pytest.approx(0.9) and row.met is True
    assert h.add("x", "info", "s", 1.0, None).ratio is None
    within_5_points = Target(">=", -0.05, "difference")  # A at most 5 points below B
    assert str(within_5_points) == "A−B ≥ -0.05"
    assert h.add("x", "busy", "fraction", 0.76, 0.80, within_5_points).met is True
    assert h.add("x", "busy", "fraction", 0.74, 0.80, within_5_points).met is False
    assert h.add("x", "busy", "fraction", None, 0.80, within_5_points).met is None


def test_compare_alternates_sides_and_keeps_rep_order():
    calls: list[str] = []
    h = Harness({"s": 60}, reps=3)
    out = h.compare("s", {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or len(calls)})
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert out == {"a": [1, 4, 5], "b": [2, 3, 6]}


def test_repetitions_stop_at_the_budget():
    h = Harness({"first": 0.0, "s": 0.05}, reps=5)
    done = []
    for rep in h.repetitions("s"):
        done.append(rep)
        time.sleep(0.03)  # the second would end after the section's deadline
    assert done == [0] and "s" in h.cut
    # unused time of earlier sections passes on: a later section's deadline is the sum so far
    assert h.deadline("s") == pytest.approx(h.t_start + 0.05)


def test_section_failure_is_recorded_and_write_renders_both_files(tmp_path):
    h = Harness({"ok": 10, "bad": 10})
    h.section("ok", lambda: {"value": 1.0})
    h.section("bad", lambda: 1 / 0)
    h.add("ok", "a / b", "s", 2.0, 1.0, Target("<=", 1.3))
    h.table("runs", ["n", "s"], [[1, 0.5]])
    md = h.write(tmp_path, "results", "t")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["ok"] == {"value": 1.0} and "ZeroDivisionError" in doc["bad"]["error"]
    assert doc["verdicts"] == {"a / b": False} and doc["rows"][0]["ratio"] == 2.0
    text = md.read_text()
    assert "| a / b | s | 2.00 | 1.00 | 2.00 | ≤ 1.3 | **no** |" in text
    assert "**runs**" in text and "Sections that failed" in text
    assert h.failed() == ["bad"]


def test_the_benchmark_modules_import_one_another_without_a_cycle():
    """Lazy imports inside functions count too: a cycle there is still one (bench.engines and bench.profile had one)."""
    import ast

    bench = Path(__file__).resolve().parents[1] / "bench"
    graph = {
        p.stem: {
            n.module.split(".")[1]
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.ImportFrom)
            and n.module
            and n.module.startswith("bench.")
            # (a module run as __main__ that imports itself by name, for Ray to unpickle its functions)
            and n.module.split(".")[1] != p.stem
        }
        for p in bench.glob("*.py")
    }
    assert len(graph) > 10 and graph["engines"] >= {"profile", "workload"}  # the graph is the real one

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, {m})] == []
