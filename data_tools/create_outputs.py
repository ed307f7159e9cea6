"""Output-folder bookkeeping of create_pretraining_data.py: which files a run owns, the journal that makes a run
resumable, the final rejects/filelist/manifest writes, and the merge of shards.

Journal (OUT/RUN.journal.jsonl): line 1 is a header {"journal_version", "settings", "inputs"}; then one line per
completed block, appended with one write() and fsynced *after* its part was fsynced and renamed into place:
{"block", "start", "count", "records", "part", "bytes", "sha256", "rejects": [...]}. A kill can leave only
(a) a `part-*.tmp` (deleted on resume), (b) a renamed part without its journal line (deleted and redone),
(c) a torn last journal line, recognisable by its missing newline (dropped). Before a block is skipped on
resume its part is re-validated against the journal (size and sha256).

RUN is NAME for an unsharded run and NAME.shard-K-of-N for shard K, so every shard is itself a complete dataset
(parts, filelist, manifest, rejects) and shards never write the same file.
"""
from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from data_tools.fileio import atomic_writer, sha256_file, write_json_atomic, write_text_atomic
from data_tools.part_format import DATA_DIR_NAME, FILELIST_DIR_NAME, manifest_path, part_index, read_manifest

JOURNAL_VERSION = 1
DATA_FORMAT = "laion400m"


class CreateDataError(Exception):
    """A fatal problem with the run as a whole (input, output folder, arguments); the CLI exits non-zero."""


def block_of_part_file(filename: str) -> Optional[int]:
    """0-based block index of a part (or part tmp) file name; None for any other file."""
    index = part_index(filename)
    return None if index is None else index - 1


def run_name(name: str, num_shards: int, shard_id: int) -> str:
    return name if num_shards == 1 else f"{name}.shard-{shard_id}-of-{num_shards}"


@dataclass(frozen=True)
class RunPaths:
    out: str
    run: str

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out, DATA_DIR_NAME)

    @property
    def journal(self) -> str:
        return os.path.join(self.out, f"{self.run}.journal.jsonl")

    @property
    def rejects(self) -> str:
        return os.path.join(self.out, f"{self.run}.rejects.jsonl")

    @property
    def manifest(self) -> str:
        return manifest_path(self.out, self.run)

    @property
    def filelist(self) -> str:
        return os.path.join(self.out, FILELIST_DIR_NAME, f"{self.run}.filelist")

    @property
    def filelist_list(self) -> str:
        return self.filelist + ".list"

    def final_files(self) -> List[str]:
        """Written at the end, manifest last: its presence means the run completed."""
        return [self.rejects, self.filelist, self.filelist_list, self.manifest]


@dataclass
class BlockEntry:
    """One completed block: `count` input records starting at global record index `start`."""

    block: int
    start: int
    count: int
    records: int
    part: Optional[str]  # file name in the data folder; None when every record of the block was rejected
    bytes: int
    sha256: Optional[str]
    reject_counts: Counter = field(default_factory=Counter)  # reason -> records
    offset: int = -1  # byte offset of its journal line, to stream its rejects out at the end


# ----------------------------------------------------------------------------------------------- journal
class Journal:
    """Append-only progress log of one run (see module docstring)."""

    def __init__(self, path: str, header: dict, keep: List[BlockEntry]):
        """Start the journal afresh with `header` and the lines of the `keep` entries of the old journal."""
        self.path = path
        old = open(path, "rb") if keep else None
        try:
            with atomic_writer(path, "wb") as f:
                f.write(_json_line(header))
                for e in sorted(keep, key=lambda e: e.block):
                    old.seek(e.offset)
                    line = old.readline()
                    e.offset = f.tell()
                    f.write(line)
        finally:
            if old is not None:
                old.close()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append(self, entry: BlockEntry, rejects: List[dict]) -> None:
        line = _json_line({"block": entry.block, "start": entry.start, "count": entry.count,
                           "records": entry.records, "part": entry.part, "bytes": entry.bytes,
                           "sha256": entry.sha256, "rejects": rejects})
        entry.offset = os.fstat(self._fd).st_size
        os.write(self._fd, line)  # one write: a kill leaves a whole line or a torn one without newline
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def load_journal(path: str) -> Tuple[dict, List[BlockEntry], bool]:
    """(header, entries, torn_tail_dropped)."""
    entries: List[BlockEntry] = []
    with open(path, "rb") as f:
        header_raw = f.readline()
        if not header_raw.endswith(b"\n"):
            raise CreateDataError(f"{path}: journal has no complete header line; rerun with --overwrite")
        header = _parse_journal_line(path, 1, header_raw)
        if header.get("journal_version") != JOURNAL_VERSION:
            raise CreateDataError(f"{path}: journal_version {header.get('journal_version')!r} is not "
                                  f"{JOURNAL_VERSION}; rerun with --overwrite")
        n = 1
        while True:
            offset = f.tell()
            raw = f.readline()
            n += 1
            if not raw:
                return header, entries, False
            if not raw.endswith(b"\n"):  # torn write of a killed run: that block was never confirmed
                return header, entries, True
            obj = _parse_journal_line(path, n, raw)
            counts = Counter(r["reason"] for r in obj["rejects"])
            entries.append(BlockEntry(obj["block"], obj["start"], obj["count"], obj["records"], obj["part"],
                                      obj["bytes"], obj["sha256"], counts, offset))


def _parse_journal_line(path: str, n: int, raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CreateDataError(f"{path}:{n}: corrupt journal line ({e}); rerun with --overwrite") from None


def _part_matches(data_dir: str, e: BlockEntry) -> Optional[str]:
    """None when the block's part on disk is the one the journal recorded, else why not."""
    if e.part is None:
        return None if e.records == 0 else "journal lists records but no part"
    path = os.path.join(data_dir, e.part)
    if not os.path.isfile(path):
        return f"{e.part} is missing"
    if os.path.getsize(path) != e.bytes:
        return f"{e.part} has {os.path.getsize(path)} bytes, journal says {e.bytes}"
    if sha256_file(path) != e.sha256:
        return f"{e.part} does not match its sha256"
    return None


# ----------------------------------------------------------------------------------------------- start
def prepare_output(paths: RunPaths, owns: Callable[[int], bool], header: dict, resume: bool, overwrite: bool,
                   log: Callable[[str], None]) -> Tuple[Journal, Dict[int, BlockEntry]]:
    """Check the output folder, clean what this run owns, and return the journal plus the blocks already done
    (only with --resume). Parts of other shards in the same folder are never touched."""
    os.makedirs(paths.data_dir, exist_ok=True)
    os.makedirs(os.path.dirname(paths.filelist), exist_ok=True)
    owned = sorted(fn for fn in os.listdir(paths.data_dir)
                   if block_of_part_file(fn) is not None and owns(block_of_part_file(fn)))
    meta = [p for p in [paths.journal] + paths.final_files() if os.path.exists(p)]
    done: Dict[int, BlockEntry] = {}
    if not resume and not overwrite and (owned or meta):
        example = meta[0] if meta else os.path.join(paths.data_dir, owned[0])
        raise CreateDataError(f"{paths.out} already holds output of {paths.run!r} (e.g. {example}); pass --resume "
                              "to complete it or --overwrite to replace it")
    if resume and os.path.exists(paths.journal):
        old_header, entries, torn = load_journal(paths.journal)
        if torn:
            log(f"resume: dropped the torn last line of {paths.journal}")
        for key in ("settings", "inputs"):
            if old_header.get(key) != header[key]:
                raise CreateDataError(f"--resume: {paths.journal} was written with other {key} "
                                      f"({old_header.get(key)} != {header[key]}); rerun with --overwrite")
        for e in entries:
            problem = _part_matches(paths.data_dir, e)
            if problem is None:
                done[e.block] = e
            else:
                log(f"resume: redoing block {e.block}: {problem}")
    elif resume and owned:
        raise CreateDataError(f"--resume: {paths.journal} is missing but {paths.data_dir} holds parts of this run "
                              f"(e.g. {owned[0]}); rerun with --overwrite")
    keep = {e.part for e in done.values()}
    for fn in owned:
        if fn not in keep:  # tmp parts, parts whose journal line never landed, parts that failed validation
            os.remove(os.path.join(paths.data_dir, fn))
    # Stale end products go first, so no filelist ever names a part this run may rewrite.
    for p in paths.final_files():
        if os.path.exists(p):
            os.remove(p)
    return Journal(paths.journal, header, list(done.values())), done


# ----------------------------------------------------------------------------------------------- finish
def write_rejects_from_journal(journal: str, entries: List[BlockEntry], out: str) -> None:
    """NAME.rejects.jsonl in input order, streamed from the journal lines of the blocks."""
    with open(journal, "rb") as src, atomic_writer(out, "wb") as dst:
        for e in sorted(entries, key=lambda e: e.block):
            src.seek(e.offset)
            for r in json.loads(src.readline())["rejects"]:
                dst.write(_json_line(r))


def write_dataset_files(paths: RunPaths, parts: List[str], num_repeat: int, manifest: dict) -> None:
    """Filelist (every part, absolute, the list repeated num_repeat times), its .list, and the manifest last."""
    text = "".join(p + "\n" for _ in range(num_repeat) for p in parts)
    write_text_atomic(paths.filelist, text)
    write_text_atomic(paths.filelist_list, os.path.abspath(paths.filelist) + "\n")
    write_json_atomic(paths.manifest, manifest)


def merge_shards(out: str, name: str, num_shards: int, num_repeat: int, extra: dict) -> dict:
    """Combine the N finished shard runs in `out` into NAME's filelist, rejects and manifest: the parts in block
    order, so the result lists the very files an unsharded run would have written. Returns the manifest."""
    shard_paths = [RunPaths(out, run_name(name, num_shards, k)) for k in range(num_shards)]
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
    paths = RunPaths(out, name)
    files = [open(p.rejects, "rb") for p in shard_paths]
    try:
        with atomic_writer(paths.rejects, "wb") as dst:
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
        num_repeat=num_repeat, resumed_parts=0, shards=[p.manifest for p in shard_paths],
        filelist=os.path.abspath(paths.filelist), rejects_file=os.path.abspath(paths.rejects))
    write_dataset_files(paths, [p["path"] for p in parts], num_repeat, manifest)
    return manifest


def _input_ids(manifest: dict) -> List[Tuple[str, int]]:
    return [(os.path.basename(i["path"]), i["size"]) for i in manifest["inputs"]]
