#!/usr/bin/env bash
# Create .venv and install requirements.txt. Idempotent: when the installed set already matches
# requirements.txt (hash stamp), it returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] installing requirements.txt into $VENV (about 90 s on a fresh machine)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
echo "$want" > "$stamp"
echo "[setup] done"
