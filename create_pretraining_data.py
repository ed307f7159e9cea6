#!/usr/bin/env python
"""Build a laion400m-format pretraining dataset from jsonl files of {"caption": ..., "image": "path"} lines.

    python create_pretraining_data.py --input_path data/*.jsonl --output_path OUT [--save_gzip_file]

writes OUT/laion400m_format_data/part-XXXXXX[.gz], OUT/filelist/NAME.filelist[.list], OUT/NAME.manifest.json and
OUT/NAME.rejects.jsonl. Design, sharding, resume and exit codes: data_tools/create_data.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import fields
from typing import List, Optional

from data_tools.create_data import CREATED_BY, CreateConfig, RejectRatioExceeded, run, summary
from data_tools.create_outputs import CreateDataError, merge_shards
from data_tools.image_check import DEFAULT_MAX_IMAGE_PIXELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # The reference's flags, same names and defaults.
    a("--input_path", nargs="+", default=[], help="jsonl file(s) and/or glob(s); globs expand sorted")
    a("--output_path", required=True, help="output folder")
    a("--output_name", default="custom_dataset", help="name of the filelist, manifest and rejects files")
    a("--caption_key", default="caption", help="jsonl key of the caption")
    a("--image_key", default="image", help="jsonl key of the image path")
    a("--per_part_file_num", type=int, default=1000, help="input records per part file")
    a("--save_gzip_file", action="store_true", help="gzip the parts (part-XXXXXX.gz)")
    a("--num_repeat", type=int, default=1, help="times the part list is repeated in the filelist")
    # Beyond the reference.
    a("--num_workers", type=int, default=os.cpu_count() or 1, help="decode processes (0: none, in-process)")
    a("--gzip_level", type=int, default=6, help="zlib-style level 0-9 (ISA-L uses 0-3: level // 3)")
    a("--image_root", default=None, help="folder image paths resolve against (default: each jsonl's folder)")
    a("--allow_outside_root", action="store_true", help="accept image paths that resolve outside the root")
    a("--allow_empty_caption", action="store_true", help="keep records whose caption is blank")
    a("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="reject larger images (w*h)")
    a("--min_image_size", type=int, default=0, help="reject images whose shorter side is smaller")
    a("--max_side", type=int, default=None, help="downscale larger images to this longer side (JPEG re-encode)")
    a("--jpeg_quality", type=int, default=95, help="JPEG quality of --max_side re-encodes")
    a("--resume", action="store_true", help="complete an interrupted run, keeping its verified parts")
    a("--overwrite", action="store_true", help="replace an existing output of this name")
    a("--num_shards", type=int, default=1, help="split the work over this many runs (machines)")
    a("--shard_id", type=int, default=0, help="which shard this run does, 0..num_shards-1")
    a("--merge_shards", action="store_true", help="combine the finished shards into NAME's filelist/manifest")
    a("--max_reject_ratio", type=float, default=1.0, help="fail (exit 3) when more records are rejected")
    a("--progress_interval", type=float, default=2.0, help="seconds between progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge_shards:
        if args.num_shards < 2:
            parser.error("--merge_shards needs --num_shards >= 2")
        t0 = time.monotonic()
        try:
            m = merge_shards(os.path.abspath(args.output_path), args.output_name, args.num_shards, args.num_repeat,
                             {"created_by": CREATED_BY + " --merge_shards", "arguments": vars(args),
                              "duration_s": 0.0})
        except (CreateDataError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"merged {args.num_shards} shards in {time.monotonic() - t0:.1f} s: {m['records_written']} records "
              f"in {len(m['parts'])} parts, {m['records_rejected']} rejected; filelist {m['filelist']}")
        return 0
    if not args.input_path:
        parser.error("--input_path is required (unless --merge_shards)")
    names = {f.name for f in fields(CreateConfig)}
    cfg = CreateConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        result = run(cfg)
    except RejectRatioExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (CreateDataError, OSError) as e:  # OSError: unreadable input, unwritable output, full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool as e:
        print(f"error: a worker process died ({e}); out of memory? rerun with --resume", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
