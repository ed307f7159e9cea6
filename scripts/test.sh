#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: unit, smoke and end-to-end tiers.
#   bash scripts/test.sh            everything
#   bash scripts/test.sh -m unit    one tier (pytest arguments pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The CLIP merge list ships in open-clip-torch's wheel (no torch needed): the tokenizer-rebuild test uses it.
if ! ls .cache/open_clip_torch-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download -q --no-deps open-clip-torch==3.3.0 -d .cache \
    || echo "[test] could not download open-clip-torch: the tokenizer rebuild test will skip"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
