#!/usr/bin/env bash
# Build .venv with the CPU stack (idempotent): pinned by requirements/cpu.lock,
# then repair what the CPU wheels break (scripts/repair_cpu_wheels.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.vecap-setup
want=$(cat requirements/cpu.lock pyproject.toml scripts/repair_cpu_wheels.py | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
# (the machine's pip configuration lists local indexes; their "is ignored" warnings are noise)
quiet() { { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
$VENV/bin/python -m pip install -q --upgrade "pip>=24" 2>&1 | quiet
# pip (not uv): torch 2.13.0+cpu is found through this machine's pip configuration.
# PYTHONWARNINGS: setuptools' "Editable installation" notice (a UserWarning) on every install.
PYTHONWARNINGS=ignore::UserWarning $VENV/bin/python -m pip install -q -c requirements/cpu.lock -e ".[cpu,test]" 2>&1 | quiet
$VENV/bin/python scripts/repair_cpu_wheels.py
echo "$want" > "$STAMP"
echo "environment ready: $VENV"
