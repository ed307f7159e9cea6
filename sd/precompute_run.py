"""The run of precompute_latents.py: output folder, ranks, progress, and rank 0's filelists, rejects and manifest.

The stage's config and encoding are sd/precompute.py; the format is data_tools/latent_format.py.

Ownership of the output, as the data tool's: a latent dataset NAME owns OUT/latents/NAME/ (shard files only),
OUT/filelist/NAME.filelist[.list], OUT/NAME.manifest.json (format sd_latents), OUT/NAME.rejects.jsonl and
OUT/NAME.precompute_config.json. An existing dataset stops the run unless --resume (verified shards are kept:
same part bytes and sha256, same dependencies) or --overwrite (its files are removed first). A file in the shards
folder that is not a shard, or a NAME.manifest.json of image parts, stops the run and nothing is deleted. The
filelists and manifest are removed first and written last, so a half-made dataset is never listed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Callable, List, Optional

from data_tools import latent_format as lf
from data_tools.fileio import atomic_writer, write_json_atomic, write_text_atomic
from data_tools.filelists import read_manifest
from sd.config import format_config, parse_args, save_config, to_jsonable
from sd.precompute import CREATED_BY, Encoder, PrecomputeArguments, PrecomputeRun, encode_shard, resolve, resumable
from trainer.loader.transforms import ImageTransform

logger = logging.getLogger("sd")
OWN_SUFFIXES = (".filelist", ".filelist.list", ".manifest.json", ".rejects.jsonl", ".precompute_config.json")


def existing_outputs(run: PrecomputeRun) -> List[str]:
    """This dataset's files already on disk. Raises ValueError for files it does not own where it would write."""
    manifest = run.out(".manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            if not lf.is_latent_manifest(json.load(f)):
                raise ValueError(f"{manifest} is the manifest of an image dataset: choose another --output_name")
    found = [p for p in map(run.out, OWN_SUFFIXES) if os.path.exists(p)]
    if os.path.isdir(run.shards_dir):
        names = sorted(os.listdir(run.shards_dir))
        foreign = [n for n in names if lf.shard_index(n) is None]
        if foreign:
            raise ValueError(f"{run.shards_dir} holds files this tool did not write ({', '.join(foreign[:3])}): "
                             "move them away or choose another --output_name; nothing was deleted")
        found += [os.path.join(run.shards_dir, n) for n in names]
    return found


def prepare_output(run: PrecomputeRun, rank: int, barrier: Callable[[], None]) -> None:
    """Every rank checks (the same answer everywhere), all ranks meet, then rank 0 deletes and writes: without the
    meeting a slow rank would see rank 0's fresh config file and take it for an existing dataset. The caller
    synchronises after."""
    found = existing_outputs(run)
    if found and not (run.args.resume or run.args.overwrite):
        raise ValueError(f"latent dataset {run.args.output_name!r} already exists in {run.output_path} "
                         f"({len(found)} files): pass --resume to complete it or --overwrite to replace it")
    barrier()
    if rank != 0:
        return
    for path in found:
        keep = run.args.resume and lf.shard_index(os.path.basename(path)) is not None and path.endswith(".safetensors")
        if not keep:
            os.remove(path)
    os.makedirs(run.shards_dir, exist_ok=True)
    os.makedirs(os.path.dirname(run.out(".filelist")), exist_ok=True)
    save_config(run.out(".precompute_config.json"), run)


class Progress:
    """One line per rank every --progress_interval seconds: shards, records, records/s, ETA."""

    def __init__(self, run: PrecomputeRun, rank: int, world: int, mine: List[int]):
        self.rank, self.world, self.mine, self.interval = rank, world, mine, run.args.progress_interval
        counts = {}
        if run.source_manifest:  # the data tool's per-part counts give a record-based ETA
            counts = {p["path"]: p["records"] for p in read_manifest(run.source_manifest).get("parts", [])}
        self.expected = [counts.get(run.distinct_parts[i]) for i in mine]
        self.t0 = self.last = time.monotonic()
        self.done = self.records = 0

    def shard_done(self, records: int, encoded: bool) -> None:
        self.done += 1
        self.records += records if encoded else 0
        now = time.monotonic()
        if now - self.last >= self.interval or self.done == len(self.mine):
            self.last = now
            rate = self.records / max(now - self.t0, 1e-9)
            left = self.expected[self.done:]
            if None not in left and rate > 0:
                eta = sum(left) / rate
            else:  # by shards
                eta = (now - self.t0) / self.done * (len(self.mine) - self.done)
            logger.info("precompute rank %d/%d: shard %d/%d, %d records, %.1f records/s, ETA %.0f s", self.rank,
                        self.world, self.done, len(self.mine), self.records, rate, eta)


def run_rank(run: PrecomputeRun, rank: int, world: int) -> List[dict]:
    """This rank's shards: part i for i % world == rank, each resumed when verified, else encoded."""
    mine = [i for i in range(len(run.distinct_parts)) if i % world == rank]
    progress = Progress(run, rank, world, mine)
    if not mine:
        logger.info("precompute rank %d/%d: no part to encode (%d parts for %d ranks)", rank, world,
                    len(run.distinct_parts), world)
    entries, enc, transform = [], None, ImageTransform(run.data)
    threads = run.args.dataloader_num_workers
    with ThreadPoolExecutor(threads) if threads else _no_pool() as pool:
        for i in mine:
            entry = resumable(run, i) if run.args.resume else None
            resumed = entry is not None
            if not resumed:
                enc = enc or Encoder(run)  # loaded on first use: a rank without work never loads the models
                entry = encode_shard(run, enc, transform, i, pool)
            entries.append(entry)
            progress.shard_done(entry["records"], encoded=not resumed)
    return entries


class _no_pool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def finish(run: PrecomputeRun, entries: List[dict], duration: float, world: int) -> dict:
    """Rank 0: rejects, filelists (shards in the input filelist's part order, repeats kept; empty shards are in
    the manifest, not the filelist) and the manifest, written last."""
    entries = sorted(entries, key=lambda e: e["index"])
    if [e["index"] for e in entries] != list(range(1, len(run.distinct_parts) + 1)):
        raise RuntimeError(f"shards missing from the gathered results: {len(entries)} of {len(run.distinct_parts)}")
    rejects = [dict(r, part=e["source_part"]) for e in entries for r in e["rejects"]]
    with atomic_writer(run.out(".rejects.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    shard_of = {e["source_part"]: e for e in entries}
    listed = [shard_of[p]["path"] for p in run.parts if shard_of[p]["records"]]
    records = sum(e["records"] for e in entries)
    if not records:
        raise RuntimeError(f"no record of {run.filelist} could be encoded: see {run.out('.rejects.jsonl')}")
    source = {"file_list": run.file_list, "filelist": run.filelist, "data_format": run.data_format,
              "manifest": run.source_manifest}
    if run.source_manifest:  # the input's own rejects, carried over
        m = read_manifest(run.source_manifest)
        source.update({k: m.get(k) for k in ("records_written", "records_rejected", "rejects_by_reason",
                                             "rejects_file")})
    total_bytes = sum(e["bytes"] for e in entries)
    manifest = {
        "format": lf.LATENT_FORMAT, "data_format": lf.LATENT_FORMAT, "format_version": lf.FORMAT_VERSION,
        "created_by": CREATED_BY, "arguments": to_jsonable(run.args), "dependencies": run.dependencies,
        "dependencies_sha256": lf.dependencies_digest(run.dependencies), "records": records,
        "records_rejected": len(rejects), "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "rejects_file": run.out(".rejects.jsonl"), "source": source, "bytes": total_bytes,
        "bytes_per_record": total_bytes / records, "filelist": run.out(".filelist"),
        "file_list": run.out(".filelist.list"),
        "shards": [{k: v for k, v in e.items() if k != "rejects"} for e in entries],
        "run": {"world_size": world, "duration_s": round(duration, 3)},
    }
    write_text_atomic(run.out(".filelist"), "".join(p + "\n" for p in listed))
    write_text_atomic(run.out(".filelist.list"), run.out(".filelist") + "\n")
    write_json_atomic(run.out(".manifest.json"), manifest)
    return manifest


def precompute(run: PrecomputeRun) -> Optional[dict]:
    """The whole stage in this process (a rank of a launch, or alone). Returns the manifest on rank 0."""
    import paddle.distributed as dist

    from trainer.launch.rank_checks import rank_preflight

    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if world > 1:
        dist.init_parallel_env()
    rank = dist.get_rank() if world > 1 else 0
    os.makedirs(run.output_path, exist_ok=True)
    # training's launch checks: shared output folder, the same input on every rank, the rank watchdog
    guard = rank_preflight(SimpleNamespace(output_dir=run.output_path, dataloader_num_workers=0),
                           run.data, None)
    barrier = dist.barrier if world > 1 else (lambda: None)
    prepare_output(run, rank, barrier)
    barrier()
    t0 = time.monotonic()
    entries = run_rank(run, rank, world)
    gathered: List[List[dict]] = []
    if world > 1:
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    manifest = finish(run, [e for g in gathered for e in g], time.monotonic() - t0, world) if rank == 0 else None
    guard.finish()
    return manifest


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] %(message)s")
    try:
        (args,) = parse_args([PrecomputeArguments], argv, description=__doc__, exit_on_error=False,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        run = resolve(args)
    except (ValueError, FileNotFoundError, argparse.ArgumentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("resolved config:\n%s", format_config(run))
    for notice in run.notices:
        logger.warning("PRECOMPUTE: %s", notice)
    try:
        manifest = precompute(run)
    except ValueError as e:  # an output this run may not touch: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    if manifest is not None:
        logger.info("done: %d records in %d shards (%.0f bytes/record), %d rejected; file list %s",
                    manifest["records"], len(manifest["shards"]), manifest["bytes_per_record"],
                    manifest["records_rejected"], manifest["file_list"])
    return 0
