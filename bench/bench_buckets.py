"""Loader throughput per worker with aspect-ratio buckets against square crops, in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_buckets.py [--resolution 256] [--num_images 24] \
        [--samples 480] [--batch_size 8] [--rounds 7]

Data: bench_loader.py's photo-like JPEGs (512-900 px on each side, so aspect ratios from about 0.57 to 1.76, 100+
KB each) in one gzipped part. Both pipelines are TextImageDataset's batch iterator in-process (one worker), same
data, seed and shuffle buffer; one crops squares of --resolution, the other uses --aspect_ratio_buckets
--resolution (the default list: 192x320, 256x256, 320x192 at 256), so every batch is one bucket's and each image
keeps more of its frame. Rates are samples per CPU-second of this process (CPU time rather than wall time so that
other jobs on the machine skew the ratio less), best of --rounds, rounds interleaved. The target (issue 17) is
buckets >= 0.9x square.

What differs per sample: the bucket choice from the header size (exact fractions), and the bucket's crop (its
area is at most the square's: 61,440 px for 192x320 against 65,536); per batch: records wait in their bucket's
list until it holds a batch.
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from typing import List

import numpy as np

# the script's folder is on sys.path when run as a script
from bench_loader import loader_bench_parser, print_command, timed, write_dataset


def main(argv: List[str] = None) -> int:
    args = loader_bench_parser("loader samples/s per worker, aspect-ratio buckets vs square crops",
                               rounds=7).parse_args(argv)
    print_command()
    from trainer.loader.config import DataArguments
    from trainer.loader.text_image_dataset import TextImageDataset

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fl = write_dataset(tmp, args.num_images, args.seed)
        print(f"data written in {time.perf_counter() - t0:.1f}s")
        common = dict(resolution=args.resolution, buffer_size=8, caption_dropout_prob=0.1)
        square = iter(TextImageDataset(DataArguments(fl, **common), None, args.batch_size, seed=42))
        bucketed = TextImageDataset(DataArguments(fl, aspect_ratio_buckets=str(args.resolution), **common), None,
                                    args.batch_size, seed=42)
        print("buckets:", " ".join(f"{w}x{h}" for w, h in bucketed.buckets))
        buckets = iter(bucketed)
        next(square), next(buckets)  # warm-up: imports, first decode
        n = max(1, args.samples // args.batch_size)
        samples = n * args.batch_size
        shapes: Counter = Counter()

        def run_buckets() -> None:
            for _ in range(n):
                shapes[tuple(next(buckets)["pixel_values"].shape[2:])] += 1

        best = {"square": (np.inf, np.inf), "buckets": (np.inf, np.inf)}
        for _ in range(args.rounds):  # interleaved rounds: a load spike hits both pipelines alike
            best["square"] = min(best["square"], timed(lambda: [next(square) for _ in range(n)]))
            best["buckets"] = min(best["buckets"], timed(run_buckets))
    rate = {k: (samples / cpu, samples / wall) for k, (cpu, wall) in best.items()}
    for k, (cpu_rate, wall_rate) in rate.items():
        print(f"{k:>8}: {cpu_rate:7.1f} samples/s per worker (CPU time), {wall_rate:7.1f} samples/s wall")
    print("batches per bucket (HxW):", dict(sorted(shapes.items())))
    ratio = rate["buckets"][0] / rate["square"][0]
    print(f"ratio buckets/square: {ratio:.2f}x per worker (CPU time), {rate['buckets'][1] / rate['square'][1]:.2f}x "
          f"wall; target >= 0.9x: {'met' if ratio >= 0.9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
