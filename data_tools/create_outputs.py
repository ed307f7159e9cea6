"""Output-folder bookkeeping of create_pretraining_data.py: which files a dataset owns, the lock that keeps a
second writer out, the journal that makes a run resumable, the final rejects/filelist/manifest writes (the merge
of shards is create_data.merge_shards).

Ownership: the parts of dataset NAME live in OUT/laion400m_format_data/NAME/ (so two --output_name values in one
--output_path never share a part), and within that folder a file is this run's only when its journal says the
run wrote it (a "writing" line lands before the part is created) or, with no journal, when the manifest lists it
with the same sha256. Resume and --overwrite delete only such files; any other part-named file where this run
would write is an error, never silently replaced.

Lock: OUT/RUN.lock, held with fcntl.flock for the whole run (released by the kernel when the process dies), so a
second run of the same dataset stops at start with one line instead of interleaving its writes.

Journal (OUT/RUN.journal.jsonl): line 1 is a header {"journal_version", "settings", "inputs"}; then, appended with
one write() each and fsynced: {"writing": part} before a part's temporary file is created, and one line per
completed block *after* its part was fsynced and renamed into place:
{"block", "start", "count", "records", "part", "bytes", "sha256", "rejects": [...]}. A kill can leave only
(a) a `part-*.tmp` (deleted on resume), (b) a renamed part without its block line (deleted and redone),
(c) a torn last journal line, recognisable by its missing newline (dropped). Before a block is skipped on
resume its part is re-validated against the journal (size and sha256).

RUN is NAME for an unsharded run and NAME.shard-K-of-N for shard K, so every shard is itself a complete dataset
(filelist, manifest, rejects) and shards never write the same file; the shards of NAME share NAME's parts folder,
each owning the blocks b with b % N == K.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from data_tools.fileio import atomic_writer, sha256_file, write_json_atomic, write_text_atomic
from data_tools.filelists import FILELIST_DIR_NAME, manifest_path
from data_tools.part_format import DATA_DIR_NAME, part_index

JOURNAL_VERSION = 2  # 2: parts in a folder of their dataset, "writing" lines
DATA_FORMAT = "laion400m"


class CreateDataError(Exception):
    """A fatal problem with the run as a whole (input, output folder, arguments); the CLI exits non-zero."""


@contextmanager
def writing(path: str) -> Iterator[None]:
    """A failed write of the run's own output (full disk, file size limit, I/O error) as one error naming the
    file: the OSError of a write() carries no file name."""
    try:
        yield
    except OSError as e:
        raise CreateDataError(f"cannot write {path}: {e.strerror or e}"
                              + ("; free some space and rerun with --resume" if e.errno == errno.ENOSPC else "")
                              ) from None


def block_of_part_file(filename: str) -> Optional[int]:
    """0-based block index of a part (or part tmp) file name; None for any other file."""
    index = part_index(filename)
    return None if index is None else index - 1


def run_name(name: str, num_shards: int, shard_id: int) -> str:
    return name if num_shards == 1 else f"{name}.shard-{shard_id}-of-{num_shards}"


@dataclass(frozen=True)
class RunPaths:
    out: str
    name: str  # the dataset: names its parts folder, shared by its shards
    run: str  # NAME or NAME.shard-K-of-N: names the journal, lock, filelists, manifest, rejects

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out, DATA_DIR_NAME)

    @property
    def part_dir(self) -> str:
        return os.path.join(self.data_dir, self.name)

    @property
    def lock(self) -> str:
        return os.path.join(self.out, f"{self.run}.lock")

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
    bucket_counts: Counter = field(default_factory=Counter)  # "WxH" -> records written (--aspect_ratio_buckets)
    offset: int = -1  # byte offset of its journal line, to stream its rejects out at the end


# ----------------------------------------------------------------------------------------------- journal
class Journal:
    """Append-only progress log of one run (see module docstring)."""

    def __init__(self, path: str, header: dict, keep: List[BlockEntry]):
        """Start the journal afresh with `header` and the lines of the `keep` entries of the old journal."""
        self.path = path
        old = open(path, "rb") if keep else None
        try:
            with writing(path), atomic_writer(path, "wb") as f:
                f.write(_json_line(header))
                for e in sorted(keep, key=lambda e: e.block):
                    old.seek(e.offset)
                    line = old.readline()
                    e.offset = f.tell()
                    f.write(line)
        finally:
            if old is not None:
                old.close()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def intend(self, part: str) -> None:
        """Record that this run is about to create `part` (and its .tmp): from now on the file is this run's."""
        self._write(_json_line({"writing": part}))

    def append(self, entry: BlockEntry, rejects: List[dict]) -> None:
        obj = {"block": entry.block, "start": entry.start, "count": entry.count, "records": entry.records,
               "part": entry.part, "bytes": entry.bytes, "sha256": entry.sha256, "rejects": rejects}
        if entry.bucket_counts:  # only with --aspect_ratio_buckets: other journals keep their bytes
            obj["buckets"] = dict(entry.bucket_counts)
        line = _json_line(obj)
        entry.offset = os.fstat(self._fd).st_size
        self._write(line)

    def _write(self, line: bytes) -> None:
        with writing(self.path):
            # one write: a kill leaves a whole line or a torn one without newline
            if os.write(self._fd, line) != len(line):  # a short write is how a full disk shows here
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _json_line(obj: dict) -> bytes:
    # A lone surrogate (from a jsonl escape such as "\ud800", or a non-UTF-8 file name) is not UTF-8: written
    # as its JSON escape it stays valid JSON and reads back as the same string.
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")


def load_journal(path: str) -> Tuple[dict, List[BlockEntry], Set[str], bool]:
    """(header, entries, part names the run wrote or began writing, torn_tail_dropped)."""
    entries: List[BlockEntry] = []
    written: Set[str] = set()
    with open(path, "rb") as f:
        header_raw = f.readline()
        if not header_raw.endswith(b"\n"):
            raise CreateDataError(f"{path}: journal has no complete header line; rerun with --overwrite")
        header = _parse_journal_line(path, 1, header_raw)
        if header.get("journal_version") != JOURNAL_VERSION:
            raise CreateDataError(f"{path}: journal_version {header.get('journal_version')!r} is not "
                                  f"{JOURNAL_VERSION} (an older version of this tool); rerun with --overwrite")
        n = 1
        while True:
            offset = f.tell()
            raw = f.readline()
            n += 1
            if not raw:
                return header, entries, written, False
            if not raw.endswith(b"\n"):  # torn write of a killed run: that block was never confirmed
                return header, entries, written, True
            obj = _parse_journal_line(path, n, raw)
            if "writing" in obj:
                written.add(_part_file_name(path, n, obj["writing"]))
                continue
            try:
                counts = Counter(r["reason"] for r in obj["rejects"])
                entry = BlockEntry(int(obj["block"]), int(obj["start"]), int(obj["count"]), int(obj["records"]),
                                   obj["part"], int(obj["bytes"]), obj["sha256"], counts,
                                   Counter({str(k): int(v) for k, v in obj.get("buckets", {}).items()}), offset)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CreateDataError(f"{path}:{n}: corrupt journal line ({e!r}); rerun with --overwrite") from None
            if entry.part is not None:
                written.add(_part_file_name(path, n, entry.part))
            entries.append(entry)


def _parse_journal_line(path: str, n: int, raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CreateDataError(f"{path}:{n}: corrupt journal line ({e!r}); rerun with --overwrite") from None
    if not isinstance(obj, dict):
        raise CreateDataError(f"{path}:{n}: corrupt journal line (a JSON {type(obj).__name__}); rerun with "
                              "--overwrite")
    return obj


def _part_file_name(path: str, n: int, name: object) -> str:
    """A part name read from a journal: a plain part file name, never a path that could reach another file."""
    if not isinstance(name, str) or block_of_part_file(name) is None or name.endswith(".tmp"):
        raise CreateDataError(f"{path}:{n}: corrupt journal line (part {name!r}); rerun with --overwrite")
    return name


def _part_matches(part_dir: str, e: BlockEntry) -> Optional[str]:
    """None when the block's part on disk is the one the journal recorded, else why not."""
    if e.part is None:
        return None if e.records == 0 else "journal lists records but no part"
    path = os.path.join(part_dir, e.part)
    if not os.path.isfile(path):
        return f"{e.part} is missing"
    if os.path.getsize(path) != e.bytes:
        return f"{e.part} has {os.path.getsize(path)} bytes, journal says {e.bytes}"
    if sha256_file(path) != e.sha256:
        return f"{e.part} does not match its sha256"
    return None


# ----------------------------------------------------------------------------------------------- start
@contextmanager
def dataset_lock(paths: RunPaths) -> Iterator[None]:
    """Hold OUT/RUN.lock for the body, or stop at once when another process holds it. The file is never
    deleted: a deleted lock file lets a third run lock a new file while the second still holds the old one."""
    with writing(paths.lock):
        os.makedirs(paths.out, exist_ok=True)
        # O_NOFOLLOW: a lock file planted as a symlink must not make us truncate the file it points to
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            raise CreateDataError(f"another run is writing dataset {paths.run!r} in {paths.out} ({holder} holds "
                                  f"{paths.lock}); wait for it to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _owned_files(paths: RunPaths, resume: bool, log: Callable[[str], None]
                 ) -> Tuple[Optional[Tuple[dict, List[BlockEntry], bool]], Set[str]]:
    """(the journal if read, the part file names in part_dir that this run wrote). The journal names what the
    run wrote; without one, the manifest names the parts whose bytes still match it (a merged dataset)."""
    journal, ours = None, set()
    if os.path.exists(paths.journal):
        try:
            header, entries, ours, torn = load_journal(paths.journal)
            journal = (header, entries, torn)
        except CreateDataError as e:
            if resume:
                raise
            log(f"--overwrite: ignoring {paths.journal}: {e}")  # then nothing it lists is deleted
    elif os.path.isfile(paths.manifest):
        try:
            with open(paths.manifest, encoding="utf-8") as f:
                parts = json.load(f).get("parts", [])
            for p in parts:
                name = os.path.basename(p["path"])
                path = os.path.join(paths.part_dir, name)
                if (block_of_part_file(name) is not None and os.path.isfile(path)
                        and os.path.getsize(path) == p["bytes"] and sha256_file(path) == p["sha256"]):
                    ours.add(name)
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            log(f"ignoring {paths.manifest}: {e!r}")  # then nothing it lists is deleted
    return journal, ours | {n + ".tmp" for n in ours}


def prepare_output(paths: RunPaths, owns: Callable[[int], bool], header: dict, resume: bool, overwrite: bool,
                   log: Callable[[str], None]) -> Tuple[Journal, Dict[int, BlockEntry]]:
    """Check the output folder, clean what this run owns, and return the journal plus the blocks already done
    (only with --resume). Call with the dataset's lock held. Files of other datasets and of other shards are
    never touched; a part-named file of an owned block that this run did not write is an error."""
    with writing(paths.part_dir):
        os.makedirs(paths.part_dir, exist_ok=True)
        os.makedirs(os.path.dirname(paths.filelist), exist_ok=True)
    present = sorted(fn for fn in os.listdir(paths.part_dir)
                     if block_of_part_file(fn) is not None and owns(block_of_part_file(fn)))
    meta = [p for p in [paths.journal] + paths.final_files() if os.path.exists(p)]
    if not resume and not overwrite and meta:
        raise CreateDataError(f"{paths.out} already holds output of {paths.run!r} (e.g. {meta[0]}); pass --resume "
                              "to complete it or --overwrite to replace it")
    journal, ours = _owned_files(paths, resume, log)
    foreign = [fn for fn in present if fn not in ours]
    if foreign:
        raise CreateDataError(
            f"{os.path.join(paths.part_dir, foreign[0])}"
            + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + f" is not a part that {paths.run!r} wrote: neither its journal nor its manifest lists it. Nothing "
            "was deleted; move the file(s) away, or pick another --output_name")
    done: Dict[int, BlockEntry] = {}
    if resume and journal is not None:
        old_header, entries, torn = journal
        if torn:
            log(f"resume: dropped the torn last line of {paths.journal}")
        for key in ("settings", "inputs"):
            if old_header.get(key) != header[key]:
                raise CreateDataError(f"--resume: {paths.journal} was written with other {key} "
                                      f"({old_header.get(key)} != {header[key]}); rerun with --overwrite")
        for e in entries:
            problem = _part_matches(paths.part_dir, e)
            if problem is None:
                done[e.block] = e
            else:
                log(f"resume: redoing block {e.block}: {problem}")
    keep = {e.part for e in done.values()}
    for fn in present:
        if fn not in keep:  # tmp parts, parts whose journal line never landed, parts that failed validation
            os.remove(os.path.join(paths.part_dir, fn))
    # Stale end products go first, so no filelist ever names a part this run may rewrite.
    for p in paths.final_files():
        if os.path.exists(p):
            os.remove(p)
    return Journal(paths.journal, header, list(done.values())), done


# ----------------------------------------------------------------------------------------------- finish
def write_rejects_from_journal(journal: str, entries: List[BlockEntry], out: str) -> None:
    """NAME.rejects.jsonl in input order, streamed from the journal lines of the blocks."""
    with open(journal, "rb") as src, writing(out), atomic_writer(out, "wb") as dst:
        for e in sorted(entries, key=lambda e: e.block):
            src.seek(e.offset)
            for r in json.loads(src.readline())["rejects"]:
                dst.write(_json_line(r))


def write_dataset_files(paths: RunPaths, parts: List[str], num_repeat: int, manifest: dict) -> None:
    """Filelist (every part, absolute, the list repeated num_repeat times), its .list, and the manifest last."""
    text = "".join(p + "\n" for _ in range(num_repeat) for p in parts)
    with writing(paths.filelist):
        write_text_atomic(paths.filelist, text)
    with writing(paths.filelist_list):
        write_text_atomic(paths.filelist_list, os.path.abspath(paths.filelist) + "\n")
    with writing(paths.manifest):
        write_json_atomic(paths.manifest, manifest)
