#!/usr/bin/env bash
# Create .venv, install requirements.txt and the recipe's own packages (editable, from pyproject.toml).
# Idempotent: when requirements.txt and pyproject.toml match the hash stamp, it returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] installing requirements.txt into $VENV (about 90 s on a fresh machine)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
# The project itself, editable: entry points, tests and benchmarks import data_tools/trainer/sd from this tree.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
