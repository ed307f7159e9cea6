"""Look at what training will see: draw samples through the training dataset class and write them out.

    python data_tools/inspect_data.py --file_list F [--data_format laion400m|laion_aes] --resolution 256 \
        --num_samples 16 --output_dir D [--caption_dropout_prob 0.1] [--seed 42] [--tokenizer PATH]

Writes D/grid.png (the de-normalised training crops, row-major in sample order) and D/samples.jsonl (one
line per sample, same order: caption as trained, raw caption, source filelist, part path, 1-based line,
epoch, and input_ids when a tokenizer is given), then prints the skip counters as JSON. Batch size 1 and a
single in-process worker (logical worker 0 of rank 0), so the samples are the first ones rank 0's first
worker would train on with the same flags.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_tools.part_format import DATA_FORMATS  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file_list", required=True, help="a .filelist.list")
    p.add_argument("--data_format", choices=DATA_FORMATS, default=None,
                   help="default: each source's manifest, else laion400m")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--caption_dropout_prob", type=float, default=0.1,
                   help="as in training (default 0.1); 0 shows every caption")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokenizer", default=None, help="a CLIPTokenizer folder; adds input_ids to samples.jsonl")
    p.add_argument("--interpolation", default="lanczos", choices=["lanczos", "bicubic", "bilinear", "nearest"])
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--random_flip", action="store_true")
    p.add_argument("--min_image_size", type=int, default=0)
    p.add_argument("--shuffle_buffer_size", type=int, default=256)
    p.add_argument("--model_max_length", type=int, default=77)
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error(f"--num_samples must be >= 1, got {args.num_samples}")
    return args


def to_uint8(pixel_values: np.ndarray) -> np.ndarray:
    """[3, R, R] in [-1, 1] -> [R, R, 3] uint8, the inverse of the loader's normalisation."""
    return np.clip((pixel_values.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def make_grid(images: List[np.ndarray], pad: int = 2) -> Image.Image:
    """Images ([R, R, 3] uint8) in a near-square grid, row-major, on white."""
    r = images[0].shape[0]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = np.full((rows * (r + pad) + pad, cols * (r + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        y, x = pad + (i // cols) * (r + pad), pad + (i % cols) * (r + pad)
        grid[y:y + r, x:x + r] = img
    return Image.fromarray(grid, "RGB")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Imported here: paddle is slow to import and `--help` should not pay for it.
    from trainer.loader.text_image_dataset import LoaderConfig, TextImageDataset

    tokenizer = None
    if args.tokenizer:
        from paddlenlp.transformers import CLIPTokenizer

        if not os.path.isdir(args.tokenizer):
            raise FileNotFoundError(f"--tokenizer folder not found: {args.tokenizer}")
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    cfg = LoaderConfig(args.file_list, resolution=args.resolution, data_format=args.data_format,
                       interpolation=args.interpolation, center_crop=args.center_crop,
                       random_flip=args.random_flip, min_image_size=args.min_image_size,
                       caption_dropout_prob=args.caption_dropout_prob,
                       model_max_length=args.model_max_length,
                       shuffle_buffer_size=args.shuffle_buffer_size, seed=args.seed)
    ds = TextImageDataset(cfg, tokenizer, batch_size=1, rank=0, world_size=1, num_workers=0)
    print(ds.describe())
    stream = ds.open_stream(0)
    samples = [stream.next_sample() for _ in range(args.num_samples)]

    os.makedirs(args.output_dir, exist_ok=True)
    make_grid([to_uint8(s.pixel_values) for s in samples]).save(os.path.join(args.output_dir, "grid.png"))
    ids = ds.tokenize([s.caption for s in samples]) if tokenizer is not None else None
    with open(os.path.join(args.output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            src, epoch, _, line = s.ref
            rec = {"index": i, "caption": s.caption, "raw_caption": s.raw_caption,
                   "caption_dropped": s.caption == "" and s.raw_caption != "",
                   "source": ds.sources[src].filelist, "part": s.part_path, "line": line + 1, "epoch": epoch}
            if ids is not None:
                rec["input_ids"] = ids[i].tolist()
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {args.num_samples} samples to {args.output_dir}/grid.png and samples.jsonl")
    print("skipped records: " + json.dumps(dict(sorted(stream.skips.counts.items()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
