#!/usr/bin/env python
"""The node checks train.sh runs before `python -m paddle.distributed.launch` (trainer/launch/node_checks.py):
a bad setup fails once, here, with one clear message, instead of N times in N worker logs (or as a hang).

    python scripts/preflight.py [LAUNCH FLAGS] -- [TRAIN FLAGS]     exit 0: go, 1: a problem (printed), 2: usage

LAUNCH FLAGS are trainer.launch.node_checks.LaunchArguments (`preflight.py --help` lists them), TRAIN FLAGS
train.py's (`preflight.py -- --help`). What needs the running job (output_dir shared by every node, the same data
and checkpoint on every rank, a rank that dies) is checked inside the job: trainer/launch/rank_checks.py.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

USAGE = "usage: preflight.py [LAUNCH FLAGS] -- [TRAIN FLAGS]"


def main(argv: Optional[List[str]] = None) -> int:
    omp_threads = os.environ.get("OMP_NUM_THREADS")  # before paddle's import sets it to 1 when unset
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        if argv in (["--help"], ["-h"]):
            print(USAGE)
        else:
            print(USAGE, file=sys.stderr)
            return 2
    from sd.config import parse_args
    from trainer.launch.node_checks import Finding, LaunchArguments, node_preflight

    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        (launch,) = parse_args([LaunchArguments], argv[:cut])
    except ValueError as e:  # LaunchArguments' own checks: they name the flag
        findings = [Finding("error", f"launch flags: {e}")]
    else:
        findings = node_preflight(launch, argv[cut + 1:], omp_threads)
    for f in findings:
        print(f"[preflight] {'ok' if f.level == 'ok' else f.level.upper()}: {f.message}",
              file=sys.stderr if f.level != "ok" else sys.stdout, flush=True)
    errors = sum(f.level == "error" for f in findings)
    if errors:
        print(f"[preflight] {errors} problem(s): not launching", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
