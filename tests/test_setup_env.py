"""The set-up on a machine that is not this one: ``scripts/setup_env.sh``'s resolution step and checks.

The resolution step (``--print-pip-args``) runs with the machine's pip configuration hidden
(``PIP_CONFIG_FILE=/dev/null``, an empty home and config folders, no ``PIP_*`` index variables),
as on a user's fresh machine: the lock's torch CPU build is not on the configured indexes, so
PyTorch's CPU index is given to pip, and the set-up says so. Where a configured source has it (a
find-links folder, as on this machine) nothing is added. Only the decision is tested: nothing is
downloaded from PyTorch's index. The Python check refuses an interpreter the lock is not for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "setup_env.sh"
LOCK = REPO / "requirements" / "cpu.lock"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_pin() -> str:
    return next(line.strip() for line in LOCK.read_text().splitlines() if line.startswith("torch=="))


def supported() -> list[str]:
    (line,) = [x for x in LOCK.read_text().splitlines() if x.startswith("# requires-python:")]
    return line.split(":", 1)[1].split()


def hidden_pip_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without the machine's pip configuration; no venv for the script."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "PIP_FIND_LINKS",
            "PIP_INDEX_URL",
            "PIP_EXTRA_INDEX_URL",
            "PIP_NO_INDEX",
            "PIP_CONSTRAINT",
            "PIP_CONFIG_FILE",
        )
    }
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True, exist_ok=True)
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # pip then reads no configuration file at all
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CONFIG_DIRS=str(home / ".config"),
        PIP_RETRIES="0",
        PIP_DEFAULT_TIMEOUT="20",  # offline, the probe fails fast (and decides the same)
        PYTHON=sys.executable,
        VECAP_VENV=str(tmp_path / "no-venv"),
    )
    env.update(extra)
    return env


def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_the_lock_pins_a_cpu_torch_and_names_its_python():
    assert re.fullmatch(r"torch==[0-9.]+\+cpu", torch_pin())
    assert supported() == [f"{sys.version_info.major}.{sys.version_info.minor}"]  # what .venv was made with


def test_without_the_machines_pip_configuration_the_pytorch_cpu_index_is_added(tmp_path):
    proc = run_script("--print-pip-args", env=hidden_pip_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--extra-index-url", TORCH_CPU_INDEX]
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert notes == [
        f"setup: {torch_pin()} is not on the configured package indexes: adding PyTorch's CPU index ({TORCH_CPU_INDEX})"
    ]


def test_no_index_at_all_still_decides_for_the_pytorch_index(tmp_path):
    """Offline (no index reachable): the probe finds nothing, the decision is the same."""
    proc = run_script("--print-pip-args", env=hidden_pip_env(tmp_path, PIP_NO_INDEX="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--extra-index-url", TORCH_CPU_INDEX]


def _fake_wheel(folder: Path, pin: str) -> Path:
    """A wheel file named and labelled as the pinned torch (metadata only): what a find-links folder holds."""
    version = pin.split("==", 1)[1]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_a_configured_source_that_has_the_pinned_torch_adds_nothing(tmp_path):
    """As on this machine (a find-links folder with the CPU wheel): pip is given no extra index."""
    links = tmp_path / "wheels"
    _fake_wheel(links, torch_pin())
    proc = run_script("--print-pip-args", env=hidden_pip_env(tmp_path, PIP_FIND_LINKS=str(links), PIP_NO_INDEX="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and "adding" not in proc.stderr


def _fake_python(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("option", ["--check-python", "--print-pip-args"])
def test_an_unsupported_python_is_refused_naming_the_supported_versions(tmp_path, option):
    env = hidden_pip_env(tmp_path, PYTHON=str(_fake_python(tmp_path / "bin" / "python3.9", "3.9")))
    proc = run_script(option, env=env)
    assert proc.returncode != 0 and proc.stdout == ""
    message = proc.stderr.strip()
    assert message.startswith("setup: Python 3.9 (") and "is not supported" in message
    assert f"for Python {' '.join(supported())} only" in message and f"PYTHON=python{supported()[0]}" in message


def test_a_venv_made_with_an_unsupported_python_is_refused(tmp_path):
    venv = tmp_path / "venv"
    _fake_python(venv / "bin" / "python", "3.13")
    proc = run_script("--check-python", env=hidden_pip_env(tmp_path, VECAP_VENV=str(venv)))
    assert proc.returncode != 0
    assert "Python 3.13" in proc.stderr and f"remove {venv}" in proc.stderr


def test_the_supported_python_passes_and_a_bad_option_is_a_usage_error(tmp_path):
    proc = run_script("--check-python", env=hidden_pip_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"setup: Python {sys.version.split()[0]} is supported")
    proc = run_script("--no-such-option", env=hidden_pip_env(tmp_path))
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_a_missing_test_dependency_fails_in_ci_and_skips_elsewhere(monkeypatch):
    """What the S3 tests use instead of importorskip: under ``CI=true`` no feature's test may skip."""
    from helpers import MOTO_WHY, import_or_skip

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="vecap_no_such_module cannot be imported in CI"):
        import_or_skip("vecap_no_such_module", MOTO_WHY)
    for value in ("", "false", "0"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception):
            import_or_skip("vecap_no_such_module", MOTO_WHY)
    monkeypatch.setenv("CI", "true")
    assert import_or_skip("moto.server", MOTO_WHY).ThreadedMotoServer  # the test extra, as make setup installs it


def test_the_set_up_installs_the_build_tools_the_wheel_test_uses():
    """tests/test_wheel.py builds without build isolation: pyproject's SPDX license string needs setuptools >= 77."""
    import setuptools

    assert int(setuptools.__version__.split(".")[0]) >= 77, setuptools.__version__
    assert '"setuptools>=77"' in SCRIPT.read_text()
