"""Benchmark create_pretraining_data.py's img2dataset inputs, and check the filters' counts exactly.

    python bench/bench_ingest.py [--records N] [--scale S] [--num_workers W] [--rounds R] [--work_dir DIR]

Input: N synthetic img2dataset-shaped records (data_tools/synthetic_img2dataset.py: photo-like JPEGs of SHAPES x S
pixels, known scores, duplicates, failed downloads), written once as webdataset tars, as img2dataset's `files`
layout (SHARD.parquet + SHARD/KEY.jpg) and as this tool's jsonl + image files, all with the same image bytes.

1. Throughput: the real CLI on each input (no filters), R rounds in alternating order; records/s is the successful
   records over the run's own duration (the manifest's duration_s: no interpreter start-up), median of the rounds.
2. Filters: one run per input with every filter and --dedup on; the manifest's counts must equal
   synthetic_img2dataset.expected_counts (the records' known values under README's rules) exactly, or the bench
   fails. Its records/s shows the cost of --dedup (a sha256 of every image) next to the plain run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from data_tools.synthetic_img2dataset import (expected_counts, synthetic_records, write_files, write_jsonl,
                                              write_webdataset)
from sd.paths import REPO_ROOT as ROOT

ENTRY = os.path.join(ROOT, "create_pretraining_data.py")
FILTERS = {"max_pwatermark": 0.9, "max_punsafe": 0.45, "min_aesthetic": 4.0, "min_similarity": 0.2,
           "max_aspect_ratio": 2.5, "min_image_size": 32}


def prepare(work_dir: str, n: int, scale: int) -> Dict[str, List[str]]:
    recs, images = synthetic_records(n, per_shard=1000, scale=scale), {}
    inputs = {"webdataset": write_webdataset(recs, os.path.join(work_dir, "wds"), images=images),
              "parquet": write_files(recs, os.path.join(work_dir, "files"), images=images),
              "jsonl": [write_jsonl(recs, os.path.join(work_dir, "jsonl"), images=images)]}
    sizes = sorted(len(b) for b in images.values())
    print(f"input: {n} records ({sum(r.success for r in recs)} downloaded, {len(images)} distinct JPEGs of "
          f"{sizes[0] // 1024}-{sizes[-1] // 1024} KB, mean {sum(sizes) // len(sizes) // 1024} KB)", flush=True)
    return inputs


def run(fmt: str, paths: List[str], out: str, workers: int, extra: List[str]) -> dict:
    cmd = [sys.executable, ENTRY, "--input_path", *paths, "--output_path", out, "--overwrite", "--input_format", fmt,
           "--num_workers", str(workers), "--per_part_file_num", "1000", "--save_gzip_file", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "custom_dataset.manifest.json")) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--scale", type=int, default=4, help="image sides are synthetic_img2dataset.SHAPES x this")
    ap.add_argument("--num_workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work_dir", default=os.path.join("/tmp", "bench_ingest"))
    args = ap.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    t0 = time.perf_counter()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    inputs = prepare(args.work_dir, args.records, args.scale)
    recs = synthetic_records(args.records, per_shard=1000, scale=args.scale)
    order = list(inputs)
    rates: Dict[str, List[float]] = {fmt: [] for fmt in order}
    for r in range(args.rounds):
        for fmt in (order if r % 2 == 0 else order[::-1]):
            m = run(fmt, inputs[fmt], os.path.join(args.work_dir, f"out_{fmt}"), args.num_workers, [])
            downloaded = m["input_records"] - m["rejects_by_reason"].get("download_failed", 0)
            rates[fmt].append(downloaded / m["duration_s"])
    flags = [a for k, v in FILTERS.items() for a in (f"--{k}", str(v))] + ["--dedup"]
    print(f"{'input':<42}{'records/s (median of ' + str(args.rounds) + ')':>26}{'with filters + dedup':>22}")
    filtered = {}
    for fmt in order:
        m = run(fmt, inputs[fmt], os.path.join(args.work_dir, f"out_{fmt}"), args.num_workers, flags)
        written, rejects = expected_counts(recs, fmt, dedup=True, **FILTERS)
        got = (m["records_written"], m["rejects_by_reason"])
        if got != (written, rejects):
            raise SystemExit(f"{fmt}: filtered counts {got} != expected {(written, rejects)}")
        filtered[fmt] = got
        downloaded = m["input_records"] - m["rejects_by_reason"].get("download_failed", 0)
        label = {"webdataset": "webdataset tars", "parquet": "parquet + image files (img2dataset files)",
                 "jsonl": "jsonl + image files"}[fmt]
        print(f"{label:<42}{statistics.median(rates[fmt]):>26.1f}{downloaded / m['duration_s']:>22.1f}")
    med = {fmt: statistics.median(v) for fmt, v in rates.items()}
    print(f"tars / jsonl+files: {med['webdataset'] / med['jsonl']:.2f}x; parquet+files / jsonl+files: "
          f"{med['parquet'] / med['jsonl']:.2f}x (--num_workers {args.num_workers}, {os.cpu_count()} CPUs)")
    for fmt, (written, rejects) in filtered.items():
        print(f"filtered counts exact ({fmt}): {written} written, rejects {rejects}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
