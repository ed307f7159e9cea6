#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: unit, smoke and end-to-end tiers.
#   bash scripts/test.sh            everything
#   bash scripts/test.sh -m unit    one tier (pytest arguments pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
