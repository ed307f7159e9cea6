"""The crop-box resample alone: trainer/loader/resample.py against Pillow's resize on the same box, per resolution.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_resample.py [--resolutions 128 256 384 512] \
        [--interpolation lanczos] [--blocks 0 16 32] [--num_images 24] [--rounds 7]

For each resolution R: photo-like JPEGs (bench_loader.natural_jpeg) with sides drawn from [2R, 3.5R] (the
loader benchmark's 512-900 px at R = 256), draft-decoded and crop-planned by the loader's ImageTransform.
Both sides produce the float32 [3, R, R] crop in [-1, 1] that the loader emits:
- pillow: Image.resize(box=...) in 8-bit, then uint8 -> float32 normalise (the loader's path before
  resample.py);
- ours: resample_crop, straight to the normalised float crop, once per --blocks value (0 = the default
  choice of num_blocks; other values are outputs per block, to choose that default).
CPU ms per crop, best of --rounds, rounds interleaved.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from typing import List

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench_loader import natural_jpeg  # a sibling script: bench/ is on sys.path when run  # noqa: E402
from trainer.loader.config import DataArguments  # noqa: E402
from trainer.loader.resample import PILLOW_FILTERS, num_blocks, resample_crop  # noqa: E402
from trainer.loader.transforms import ImageTransform, open_image  # noqa: E402


def crops(data: DataArguments, n: int, seed: int) -> List[tuple]:
    """(decoded image, box in its pixels) pairs, as the loader configured by `data` would resample them."""
    rng = np.random.default_rng(seed)
    tf = ImageTransform(data)
    resolution = data.resolution
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(2 * resolution, int(3.5 * resolution) + 1, 2))
        img = open_image(natural_jpeg(w, h, rng))
        plan = tf.plan(w, h, np.random.default_rng(i))
        decoded = tf.decode(img)
        out.append((decoded, tf.crop_box(decoded.size, (w, h), plan)))
    return out


def pillow_crop(img: Image.Image, box, r: int, kind: str, out: np.ndarray) -> None:
    chw = np.asarray(img.resize((r, r), PILLOW_FILTERS[kind], box=box), dtype=np.uint8).transpose(2, 0, 1)
    np.multiply(chw, np.float32(1.0 / 127.5), out=out, dtype=np.float32)
    out -= np.float32(1.0)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description="crop-box resample: resample.py vs Pillow")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 384, 512])
    p.add_argument("--interpolation", default="lanczos", choices=sorted(PILLOW_FILTERS))
    p.add_argument("--blocks", type=int, nargs="+", default=[0], help="outputs per block; 0 = default")
    p.add_argument("--num_images", type=int, default=24)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("command: OMP_NUM_THREADS=%s %s %s" % (os.environ.get("OMP_NUM_THREADS", "<unset>"), sys.executable,
                                                 " ".join(shlex.quote(a) for a in sys.argv)))
    with tempfile.TemporaryDirectory() as tmp:
        # DataArguments checks that its file list exists; the transform never reads it.
        file_list = os.path.join(tmp, "unused.filelist.list")
        open(file_list, "w").close()
        settings = [DataArguments(file_list, resolution=r, interpolation=args.interpolation)
                    for r in args.resolutions]
    for r, setting in zip(args.resolutions, settings):
        data = crops(setting, args.num_images, args.seed)
        out = np.empty((3, r, r), np.float32)
        runs: dict = {"pillow": lambda: [pillow_crop(img, box, r, args.interpolation, out) for img, box in data]}
        for b in args.blocks:
            runs[f"ours, {r // num_blocks(r, b)} a block"] = (lambda b: lambda: [
                resample_crop(img, box, r, args.interpolation, out=out, block=b) for img, box in data])(b)
        best = {k: np.inf for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                c0 = time.process_time()
                fn()
                best[k] = min(best[k], time.process_time() - c0)
        ms = {k: 1000 * v / len(data) for k, v in best.items()}
        line = ", ".join(f"{k} {v:.3f} ({ms['pillow'] / v:.2f}x)" for k, v in ms.items() if k != "pillow")
        print(f"{r} px {args.interpolation}, CPU ms/crop: pillow {ms['pillow']:.3f}; {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
