#!/usr/bin/env python
"""Build a laion400m-format pretraining dataset from jsonl files of {"caption": ..., "image": "path"} lines, or
from img2dataset's output (--input_format webdataset: its tar shards; parquet: its metadata beside image folders).

    python create_pretraining_data.py --input_path data/*.jsonl --output_path OUT [--save_gzip_file]
    python create_pretraining_data.py --input_format webdataset --input_path laion_shards/ --output_path OUT \
        --max_punsafe 0.1 --max_pwatermark 0.5 --min_aesthetic 5 --max_aspect_ratio 2 --dedup

writes OUT/laion400m_format_data/NAME/part-XXXXXX[.gz], OUT/filelist/NAME.filelist[.list], OUT/NAME.manifest.json
and OUT/NAME.rejects.jsonl (NAME: --output_name, default custom_dataset). The flags: data_tools/create_config.py (`--help` lists them). Design, sharding, resume and
exit codes: data_tools/create_data.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from typing import List, Optional

from data_tools.create_config import CreateDataArguments, CreateDataRun, resolve
from data_tools.create_data import CREATED_BY, RejectRatioExceeded, merge_shards, run, summary
from data_tools.create_outputs import CreateDataError
from sd.config import parse_args, to_jsonable


def merge(cfg: CreateDataRun) -> int:
    t0 = time.monotonic()
    try:
        m = merge_shards(cfg.output_path, cfg.output_name, cfg.num_shards, cfg.num_repeat,
                         {"created_by": CREATED_BY + " --merge_shards", "arguments": to_jsonable(cfg),
                          "duration_s": 0.0})
    except (CreateDataError, OSError, ValueError) as e:  # ValueError: a shard manifest of another format
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {cfg.num_shards} shards in {time.monotonic() - t0:.1f} s: {m['records_written']} records "
          f"in {len(m['parts'])} parts, {m['records_rejected']} rejected; filelist {m['filelist']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        # exit_on_error=False: a value of the wrong type is one line below, not a screen of usage
        (args,) = parse_args([CreateDataArguments], argv, description=__doc__, exit_on_error=False,
                             usage="create_pretraining_data.py --input_path JSONL|TAR|PARQUET|DIR... --output_path DIR "
                                   "[flags] (--help lists them)",
                             formatter_class=argparse.RawDescriptionHelpFormatter)  # argparse's errors exit 2
    except (ValueError, FileNotFoundError, argparse.ArgumentError) as e:
        # a value __post_init__ refuses, an unknown flag, no such .json, a value argparse cannot convert
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = resolve(args)
        if cfg.merge_shards:
            return merge(cfg)
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
