"""The config refactor kept every entry point's command line: each flag an entry accepted before it (recorded in
tests/golden/entry_flags.json from each entry's --help) is still accepted, read back from the entry's own --help."""
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import PY, ROOT

GOLDEN = os.path.join(ROOT, "tests", "golden", "entry_flags.json")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def help_flags(entry: str) -> set:
    argv = entry.split() + ["--help"]
    proc = subprocess.run([PY, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{entry} --help failed:\n{proc.stderr[-2000:]}"
    return set(FLAG.findall(proc.stdout))


@pytest.mark.smoke
def test_every_entry_still_accepts_every_flag_it_accepted():
    with open(GOLDEN, encoding="utf-8") as f:
        entries = json.load(f)["entries"]
    with ThreadPoolExecutor(2) as pool:
        found = dict(zip(entries, pool.map(help_flags, entries)))
    missing = {entry: sorted(set(flags) - found[entry]) for entry, flags in entries.items()
               if set(flags) - found[entry]}
    assert not missing, f"flags no longer accepted: {missing}"
