"""create_pretraining_data.py: jsonl of {caption, image path}, or img2dataset's tars or parquet metadata ->
laion400m part files + filelists + manifest.

Configuration: data_tools/create_config.py (the flags, validated once, and the resolved run that run() takes).

Pipeline: the main process streams the input records (data_tools/ingest.iter_records: memory flat whatever the
input size; a line longer than --max_line_bytes is skipped in chunks, never held, and becomes a line_too_long
reject; a tar is read a member at a time) into batches of at most BATCH records, a bounded number of batches is in
flight in a process pool (`--num_workers`), and the results are consumed in submission order, so the output bytes
do not depend on the worker count. Workers parse, filter, fully decode and encode (data_tools/ingest.py,
image_check.py, filters.py); the main process decides duplicates and writes the parts.

Blocks: input record i (0-based over all input files, blank lines not counted) belongs to block
i // per_part_file_num, and block b is written to part b+1 (part_format.part_name) in the dataset's own folder
OUT/laion400m_format_data/NAME/. A part therefore holds the
accepted records of exactly one block of the input: fewer than per_part_file_num when some were rejected, and no
part at all when all were. This ties every part to a fixed input range, which is what makes resume and shards
simple: a finished block never needs redoing, and the part a block produces is the same in every kind of run.

Shards (`--num_shards N --shard_id K`): shard K does the blocks b with b % N == K. Round robin over blocks
because a streamed input's length is unknown up front, and it balances the shards. Every shard reads all the
input records (jsonl lines: cheap; tars: read through) but decodes images of its own blocks only. Shard files are
named NAME.shard-K-of-N.* (each shard is a complete dataset by itself) and part names are disjoint by
construction; the parts are byte-identical to those of an unsharded run. When all shards are done,
`--merge_shards` (same --output_path, --output_name, --num_shards) writes NAME.filelist, NAME.rejects.jsonl and
NAME.manifest.json exactly as an unsharded run would have. Shards must therefore write into one shared output
folder (or be copied into one).

Files of a run (RUN = NAME, or NAME.shard-K-of-N): OUT/laion400m_format_data/NAME/part-XXXXXX[.gz],
OUT/RUN.journal.jsonl (progress and the files the run wrote, see create_outputs.py), OUT/RUN.lock (held while it
runs), and, written last, OUT/RUN.rejects.jsonl, OUT/filelist/RUN.filelist[.list], OUT/RUN.manifest.json.

Dedup (--dedup, the rule and why shards agree: data_tools/filters.py): the main process checks each record's
image digest against those of the records before it, in record order, for every record of the input, this run's
or not (the workers hash the others' without decoding them).

Record-level failures stay record-level: whatever goes wrong reading, parsing or decoding one record (a line nested
10,000 deep, a 5,000-digit number, an image that makes a decoder raise anything) is a reject with its reason and
detail. Only the run's own inputs as files (unreadable) and outputs (unwritable, full disk: the error names the
file) are fatal. Exit codes: 0 done (rejects are not failures), 1 fatal error, 2 bad arguments,
3 --max_reject_ratio exceeded (rejects file written, filelist and manifest not).
"""
from __future__ import annotations

import heapq
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple

from data_tools.create_config import CreateDataRun
from data_tools.create_outputs import (DATA_FORMAT, JOURNAL_VERSION, BlockEntry, CreateDataError, Journal,
                                       RunPaths, dataset_lock, prepare_output, run_name, write_dataset_files,
                                       write_rejects_from_journal, writing)
from data_tools.fileio import atomic_writer, sha256_file
from data_tools.filters import DUPLICATE, DigestIndex, DigestIndexFull
from data_tools.image_check import apply_pixel_limit
from data_tools.ingest import Item, Outcome, Result, init_worker, iter_records, process_batch, worker_batch
from data_tools.filelists import read_manifest
from data_tools.part_format import FORMAT_VERSION, PartWriter, open_part_writer, part_name
from sd.config import to_jsonable
from trainer.loader.buckets import bucket_name

BATCH = 8  # records per pool task: amortises IPC; with 200 KB JPEGs a batch is ~2 MB of base64 in flight
CREATED_BY = "create_pretraining_data.py"


class RejectRatioExceeded(CreateDataError):
    pass


class BlockSink:
    """Consumes outcomes in input order; turns each finished block into a part plus a journal line."""

    def __init__(self, cfg: CreateDataRun, paths: RunPaths, journal: Journal, sources: Tuple[str, ...]):
        self.cfg, self.paths, self.journal, self.sources = cfg, paths, journal, sources
        self.entries: List[BlockEntry] = []
        self.block: Optional[int] = None
        self.processed = 0
        self._part: Optional[PartWriter] = None
        self._records = self._count = 0
        self._rejects: List[dict] = []
        self._buckets: Counter = Counter()

    def add(self, block: int, index: int, source: int, line: int, outcome: Outcome,
            bucket: Optional[str] = None) -> None:
        if block != self.block:
            self.finish_block()
            self.block = block
        self._count += 1
        self.processed += 1
        if isinstance(outcome, bytes):
            if self._part is None:  # opened lazily: a block whose records were all rejected leaves no file
                self.journal.intend(self._name())  # before the file exists: every file of ours is in the journal
                with writing(self._tmp()):
                    self._part = open_part_writer(self._tmp(), self.cfg.save_gzip_file, self.cfg.gzip_level)
            with writing(self._tmp()):
                self._part.write(outcome)
            self._records += 1
            if bucket is not None:
                self._buckets[bucket] += 1
        else:
            self._rejects.append({"index": index, "source": self.sources[source], "line": line,
                                  "reason": outcome[0], "detail": outcome[1]})

    def _name(self) -> str:
        return part_name(self.block + 1, self.cfg.save_gzip_file)

    def _tmp(self) -> str:
        return os.path.join(self.paths.part_dir, self._name() + ".tmp")

    def finish_block(self) -> None:
        if self.block is None:
            return
        name, size, digest = None, 0, None
        if self._part is not None:
            name = self._name()
            final = os.path.join(self.paths.part_dir, name)
            with writing(final):
                self._part.close()
                os.replace(self._tmp(), final)
            size, digest = os.path.getsize(final), sha256_file(final)
        counts = Counter(r["reason"] for r in self._rejects)
        entry = BlockEntry(self.block, self.block * self.cfg.per_part_file_num, self._count, self._records, name,
                           size, digest, counts, self._buckets)
        self.journal.append(entry, self._rejects)
        self.entries.append(entry)
        self.block, self._part, self._records, self._count, self._rejects = None, None, 0, 0, []
        self._buckets = Counter()


def _done(value: List[Result]) -> Future:
    """An already computed result as a Future (the in-process path, --num_workers 0)."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


@dataclass
class RunResult:
    manifest: dict
    paths: RunPaths
    processed: int  # records decoded by this run (not counting blocks resumed from the journal)
    duration_s: float


def run(cfg: CreateDataRun, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> RunResult:
    """Do one (shard of a) dataset run of a resolved config (create_config.resolve). Raises CreateDataError on
    fatal problems."""
    t0 = time.monotonic()
    sources = cfg.input_files
    if next(iter_records(cfg, lambda index: False), None) is None:
        raise CreateDataError(f"the input files hold no records: {', '.join(sources)}")
    paths = RunPaths(cfg.output_path, cfg.output_name, run_name(cfg.output_name, cfg.num_shards, cfg.shard_id))
    with dataset_lock(paths):  # held until the manifest is written: a second writer stops at start
        return _run_locked(cfg, paths, t0, log)


def _run_locked(cfg: CreateDataRun, paths: RunPaths, t0: float, log: Callable[[str], None]) -> RunResult:
    sources = cfg.input_files
    settings = cfg.part_settings()  # a resumed run must match these exactly
    inputs = [{"path": s, "size": os.path.getsize(s), "mtime_ns": os.stat(s).st_mtime_ns} for s in sources]
    header = {"journal_version": JOURNAL_VERSION, "settings": settings, "inputs": inputs}

    def owns(block: int) -> bool:
        return block % cfg.num_shards == cfg.shard_id

    journal, done = prepare_output(paths, owns, header, cfg.resume, cfg.overwrite, log)
    if done:
        log(f"resume: {len(done)} blocks already complete, skipping them")
    sink = BlockSink(cfg, paths, journal, sources)
    try:
        total = _pump(cfg, owns, done, sink, log)
    finally:
        journal.close()
    P = cfg.per_part_file_num
    entries = sorted(list(done.values()) + sink.entries, key=lambda e: e.block)
    expected = [b for b in range(-(-total // P)) if owns(b)]
    if [e.block for e in entries] != expected:  # cannot happen unless the input changed under our feet
        raise CreateDataError(f"blocks done {[e.block for e in entries][:8]}... != expected {expected[:8]}...; "
                              "did an input file change during the run?")
    write_rejects_from_journal(paths.journal, entries, paths.rejects)
    by_reason: Counter = Counter()
    for e in entries:
        by_reason.update(e.reject_counts)
    owned_records = sum(e.count for e in entries)
    written = sum(e.records for e in entries)
    rejected = owned_records - written
    duration = time.monotonic() - t0
    if owned_records and rejected / owned_records > cfg.max_reject_ratio:
        raise RejectRatioExceeded(
            f"{rejected} of {owned_records} records rejected ({rejected / owned_records:.1%}) > --max_reject_ratio "
            f"{cfg.max_reject_ratio}; see {paths.rejects}. No filelist written; fix the input, or accept with "
            f"--resume --max_reject_ratio {min(1.0, round(rejected / owned_records + 0.005, 2))}")
    parts = [{"path": os.path.join(paths.part_dir, e.part), "records": e.records, "bytes": e.bytes,
              "sha256": e.sha256, "block": e.block} for e in entries if e.part]
    manifest = {
        "format_version": FORMAT_VERSION, "data_format": DATA_FORMAT, "created_by": CREATED_BY,
        "arguments": to_jsonable(cfg), "settings": settings, "inputs": inputs, "input_records": total,
        "records_written": written, "records_rejected": rejected, "rejects_by_reason": dict(sorted(by_reason.items())),
        "parts": parts, "blocks": [e.block for e in entries], "num_repeat": cfg.num_repeat,
        "num_shards": cfg.num_shards, "shard_id": cfg.shard_id,
        "resumed_parts": sum(1 for e in done.values() if e.part),
        "filelist": paths.filelist, "rejects_file": paths.rejects, "duration_s": round(duration, 3)}
    if cfg.buckets:
        manifest["records_by_bucket"] = bucket_counts(cfg.buckets, [e.bucket_counts for e in entries])
    write_dataset_files(paths, [p["path"] for p in parts], cfg.num_repeat, manifest)
    return RunResult(manifest, paths, sink.processed, duration)


def _pump(cfg: CreateDataRun, owns: Callable[[int], bool], done: Dict[int, BlockEntry], sink: BlockSink,
          log: Callable[[str], None]) -> int:
    """Stream records through the workers into `sink`, in input order. Returns the number of input records.
    With --dedup every record goes through the workers (the others' without decoding: module docstring)."""
    P, batch_size = cfg.per_part_file_num, min(BATCH, cfg.per_part_file_num)
    # Bounded in-flight work is what keeps memory flat: reading stops while this many batches are out.
    max_inflight = 2 * cfg.num_workers + 2
    pending: Deque[Tuple[int, List[Tuple[int, int, int, bool]], Future]] = deque()
    executor = None
    if cfg.num_workers > 0:
        # forkserver, not fork: the caller (a test run, a trainer) may hold threads that fork would copy mid-lock
        executor = ProcessPoolExecutor(cfg.num_workers, mp_context=multiprocessing.get_context("forkserver"),
                                       initializer=init_worker, initargs=(cfg, os.getpid()))
    else:
        apply_pixel_limit(cfg.max_image_pixels)
    progress = _Progress(cfg.progress_interval, log)
    digests = DigestIndex(cfg.dedup_max_images) if cfg.dedup else None  # images seen, in record order

    def mine(index: int) -> bool:
        return owns(index // P) and index // P not in done

    def consume() -> None:
        block, metas, fut = pending.popleft()
        for (index, si, n, decode), (outcome, digest, bucket) in zip(metas, fut.result()):
            if digest is not None and _seen(digests, digest) and isinstance(outcome, bytes):
                outcome = (DUPLICATE, f"same image bytes (sha256 {digest.hex()}...) as an earlier record")
            if decode:
                sink.add(block, index, si, n, outcome, bucket)
        progress.update(total, sink)

    def submit(block: int, batch: List[Tuple[int, int, int, Item, bool]]) -> None:
        tasks = [(si, n == 1, item, decode) for _, si, n, item, decode in batch]
        fut = executor.submit(worker_batch, tasks) if executor else _done(process_batch(cfg, tasks))
        pending.append((block, [(i, si, n, decode) for i, si, n, _, decode in batch], fut))

    total = 0
    batch: List[Tuple[int, int, int, Item, bool]] = []
    batch_block = -1
    try:
        for si, n, item in iter_records(cfg, lambda index: cfg.dedup or mine(index)):
            index, total = total, total + 1
            block = index // P
            decode = mine(index)
            if not (decode or cfg.dedup):
                continue
            if batch and (block != batch_block or len(batch) >= batch_size):
                submit(batch_block, batch)
                batch = []
            batch.append((index, si, n, item, decode))
            batch_block = block
            while len(pending) > max_inflight:
                consume()
        if batch:
            submit(batch_block, batch)
        while pending:
            consume()
        sink.finish_block()
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    progress.update(total, sink, final=True)
    return total


def _seen(index: DigestIndex, digest: bytes) -> bool:
    """DigestIndex.check_and_add, its limit turned into the run's error."""
    try:
        return index.check_and_add(digest)
    except DigestIndexFull as e:
        raise CreateDataError(f"{e}; rerun with a larger --dedup_max_images and --resume (finished parts are "
                              "kept)") from None


class _Progress:
    """A records/s line on stderr at most every `interval` seconds."""

    def __init__(self, interval: float, log: Callable[[str], None]):
        self.interval, self.log = interval, log
        self.t0 = self.last = time.monotonic()

    def update(self, read: int, sink: BlockSink, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        rate = sink.processed / max(now - self.t0, 1e-9)
        self.log(f"create_data: {read} records read, {sink.processed} processed, {len(sink.entries)} blocks "
                 f"done, {rate:.1f} records/s")


def summary(result: RunResult) -> str:
    """The one-screen report printed at the end of a run."""
    m = result.manifest
    mb = sum(p["bytes"] for p in m["parts"]) / 1e6
    lines = [f"create_pretraining_data: {result.paths.run} done in {result.duration_s:.1f} s",
             f"  input records : {m['input_records']} in {len(m['inputs'])} file(s)",
             f"  written       : {m['records_written']} records in {len(m['parts'])} parts, {mb:.1f} MB"
             f" ({m['resumed_parts']} parts resumed)",
             f"  rejected      : {m['records_rejected']}"]
    lines += [f"    {reason:<22}{n}" for reason, n in m["rejects_by_reason"].items()]
    if "records_by_bucket" in m:
        lines.append("  by bucket     : " + ", ".join(f"{b} {n}" for b, n in m["records_by_bucket"].items()))
    lines += [f"  throughput    : {result.processed / max(result.duration_s, 1e-9):.1f} records/s "
              f"({result.processed} decoded this run)",
              f"  filelist      : {result.paths.filelist_list} (parts listed x{m['num_repeat']})",
              f"  manifest      : {result.paths.manifest}",
              f"  rejects       : {result.paths.rejects}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- shards
def merge_shards(out: str, name: str, num_shards: int, num_repeat: int, extra: dict) -> dict:
    """Combine the N finished shard runs in `out` into NAME's filelist, rejects and manifest: the parts in block
    order, so the result lists the very files an unsharded run would have written. Returns the manifest."""
    with dataset_lock(RunPaths(out, name, name)):
        return _merge_shards(out, name, num_shards, num_repeat, extra)


def _merge_shards(out: str, name: str, num_shards: int, num_repeat: int, extra: dict) -> dict:
    shard_paths = [RunPaths(out, name, run_name(name, num_shards, k)) for k in range(num_shards)]
    missing = [p.manifest for p in shard_paths if not os.path.isfile(p.manifest)]
    if missing:
        raise CreateDataError(f"--merge_shards: {len(missing)} of {num_shards} shards are not finished "
                              f"(no manifest), e.g. {missing[0]}")
    shards = [read_manifest(p.manifest) for p in shard_paths]
    first = shards[0]
    for p, m in zip(shard_paths, shards):
        if m.get("num_shards") != num_shards:
            raise CreateDataError(f"{p.manifest}: written for num_shards={m.get('num_shards')}, not {num_shards}")
        same = {k: v for k, v in m["settings"].items() if k != "shard_id"}
        if same != {k: v for k, v in first["settings"].items() if k != "shard_id"}:
            raise CreateDataError(f"{p.manifest}: settings differ from {shard_paths[0].manifest}")
        # Compared by name and size, not path: shards may run on machines that mount the inputs elsewhere.
        if _input_ids(m) != _input_ids(first) or m["input_records"] != first["input_records"]:
            raise CreateDataError(f"{p.manifest}: inputs differ from {shard_paths[0].manifest}")
    per_part = first["settings"]["per_part_file_num"]
    num_blocks = -(-first["input_records"] // per_part)
    blocks = sorted(b for m in shards for b in m["blocks"])
    if blocks != list(range(num_blocks)):
        raise CreateDataError(f"--merge_shards: shards cover blocks {blocks[:5]}..., expected 0..{num_blocks - 1}")
    parts = sorted((p for m in shards for p in m["parts"]), key=lambda p: p["block"])
    for p in parts:
        if not os.path.isfile(p["path"]) or os.path.getsize(p["path"]) != p["bytes"]:
            raise CreateDataError(f"--merge_shards: part {p['path']} is missing or not {p['bytes']} bytes")
    paths = RunPaths(out, name, name)
    files = [open(p.rejects, "rb") for p in shard_paths]
    try:
        with writing(paths.rejects), atomic_writer(paths.rejects, "wb") as dst:
            for line in heapq.merge(*files, key=lambda raw: json.loads(raw)["index"]):
                dst.write(line)
    finally:
        for f in files:
            f.close()
    by_reason: Counter = Counter()
    for m in shards:
        by_reason.update(m["rejects_by_reason"])
    manifest = dict(first, **extra)
    manifest.update(
        settings={k: v for k, v in first["settings"].items() if k != "shard_id"}, shard_id=None,
        records_written=sum(m["records_written"] for m in shards),
        records_rejected=sum(m["records_rejected"] for m in shards),
        rejects_by_reason=dict(sorted(by_reason.items())), parts=parts, blocks=list(range(num_blocks)),
        **({"records_by_bucket": _merged_buckets([m["records_by_bucket"] for m in shards])}
           if "records_by_bucket" in first else {}),
        num_repeat=num_repeat, resumed_parts=0, shards=[p.manifest for p in shard_paths],
        filelist=os.path.abspath(paths.filelist), rejects_file=os.path.abspath(paths.rejects))
    write_dataset_files(paths, [p["path"] for p in parts], num_repeat, manifest)
    return manifest


def bucket_counts(buckets: Tuple[Tuple[int, int], ...], counts: List[Counter]) -> Dict[str, int]:
    """Written records per bucket ("WxH"), every bucket of the set listed in its order (empty ones as 0), as the
    loader assigns them (trainer/loader/buckets.nearest_bucket of the stored image's upright size)."""
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return {bucket_name(b): total[bucket_name(b)] for b in buckets}


def _merged_buckets(shards: List[Dict[str, int]]) -> Dict[str, int]:
    """The shards' per-bucket counts summed (equal settings, so equal bucket lists in equal order)."""
    return {name: sum(s[name] for s in shards) for name in shards[0]}


def _input_ids(manifest: dict) -> List[Tuple[str, int]]:
    return [(os.path.basename(i["path"]), i["size"]) for i in manifest["inputs"]]
