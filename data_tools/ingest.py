"""The input side of create_pretraining_data.py, for every --input_format: the records of the input files in global
order (iter_records, main process), and what the workers make of one (process_batch).

Formats: jsonl (a line {caption, image path, optional scores}: image_check.prepare_jsonl), webdataset (a tar sample:
prepare_tar_sample) and parquet (a row of img2dataset's metadata: prepare_row); reading the last two is
data_tools/img2dataset.py's. Each turns a record into an image_check.Prepared (caption, image bytes, scores) or a
RecordError; process_item then decodes the image (image_check.check_image) and encodes the part line, whose second
field carries the record's size and scores as JSON when the input had any (filters.part_metadata).

Dedup: with --dedup, process_item also returns the image's digest (filters.image_digest) for every record that
passed every check made before decoding, and does so for records this run does not write too (another shard's
blocks, blocks a resumed run already finished: `decode` False), so that every run sees the same digests in the
same order; create_data.py decides duplicates from them in the main process.
"""
from __future__ import annotations

import os
from typing import Callable, IO, Iterator, List, Optional, Sequence, Tuple, Union

from data_tools.create_config import CreateDataRun
from data_tools.create_outputs import CreateDataError
from data_tools.filters import image_digest, part_metadata
from data_tools.image_check import (CAPTION_BAD_UNICODE, IMAGE_MISSING, IMAGE_TOO_LARGE, LINE_TOO_LONG,
                                    RECORD_EXCEPTION, Prepared, apply_pixel_limit, check_caption,
                                    check_caption_text, check_image, check_scores, parse_json_object,
                                    prepare_jsonl, read_image_file, resolve_image_path)
from data_tools.img2dataset import IMAGE_COLUMN, IMAGE_EXTS, TarSample, is_parquet, iter_parquet, iter_tar
from data_tools.part_format import RecordError, encode_record
from trainer.launch.reaper import die_with_parent
from trainer.loader.buckets import bucket_name, nearest_bucket

# Reject reasons of img2dataset's inputs (image_check.REASONS: jsonl's and the image's; filters.REASONS).
CORRUPT_TAR = "corrupt_tar"
CORRUPT_PARQUET = "corrupt_parquet"
NO_IMAGE_MEMBER = "missing_image_member"
NO_CAPTION = "missing_caption"
MISSING_KEY = "missing_key"
DOWNLOAD_FAILED = "download_failed"
REASONS = (CORRUPT_TAR, CORRUPT_PARQUET, NO_IMAGE_MEMBER, NO_CAPTION, MISSING_KEY, DOWNLOAD_FAILED)
MAX_DETAIL = 500  # characters of a reject's detail: a 15 MB path must not make a 15 MB rejects line

# One outcome per record: the encoded line, or (reason, detail).
Outcome = Union[bytes, Tuple[str, str]]
# A record as read: a jsonl line (bytes, or the length of one over --max_line_bytes: never read whole), a tar
# sample, a parquet row (dict; a str when the file's damage ends it), or None when this run does not want it.
Item = Union[bytes, int, TarSample, dict, str, None]
Task = Sequence[Tuple[int, bool, Item, bool]]  # (source index, is first line of its file, item, decode it)
# (outcome: None when not decoded, dedup digest or None, "WxH" bucket of a written record with --aspect_ratio_buckets)
Result = Tuple[Optional[Outcome], Optional[bytes], Optional[str]]

_CHUNK = 1 << 20  # how an over-long line is skipped: memory stays at max_line_bytes + this


# ----------------------------------------------------------------------------------------------- main process
def iter_records(cfg: CreateDataRun, want: Callable[[int], bool]) -> Iterator[Tuple[int, int, Item]]:
    """(source index, 1-based record number in its file, item) of every record of the input files in order.
    `want(i)` says whether record i (0-based, global) will be processed; a tar sample or parquet row it declines
    is yielded as None (its bytes are still read: img2dataset.iter_tar). Jsonl lines are always yielded."""
    count = 0

    def next_wanted() -> bool:
        return want(count)

    for si, path in enumerate(cfg.input_files):
        if cfg.input_format == "webdataset":
            records = enumerate(iter_tar(path, next_wanted, cfg.max_image_bytes, cfg.max_line_bytes), 1)
        elif cfg.input_format == "parquet" and is_parquet(path):
            records = enumerate(iter_parquet(path, cfg.caption_key, next_wanted), 1)
        else:  # jsonl, and img2dataset's metadata as jsonl
            records = iter_lines(path, cfg.max_line_bytes)
        for n, item in records:
            count += 1  # before the yield: want() asked while reading the next record sees this one counted
            yield si, n, item


def iter_lines(path: str, max_line_bytes: int) -> Iterator[Tuple[int, Union[bytes, int]]]:
    """(1-based line number, line) of every non-blank line; blank lines are not records. A line of more than
    `max_line_bytes` (its newline included) is given as its length (an int), read in chunks and dropped, so one
    huge line costs no more memory than a legal one."""
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = _readline(f, path, max_line_bytes + 1)
            if not raw:
                break
            n += 1
            if len(raw) <= max_line_bytes:  # the whole line (the last one may lack its newline)
                if raw.strip():
                    yield n, raw
                continue
            size, blank = len(raw), not raw.strip()
            while not raw.endswith(b"\n"):
                raw = _readline(f, path, _CHUNK)
                if not raw:
                    break
                size, blank = size + len(raw), blank and not raw.strip()
            if not blank:
                yield n, size


def _readline(f: IO[bytes], path: str, limit: int) -> bytes:
    try:
        return f.readline(limit)
    except OSError as e:  # the input file itself, not one record: fatal, naming the file
        raise CreateDataError(f"cannot read input file {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------- workers
def prepare_tar_sample(sample: TarSample, cfg: CreateDataRun) -> Prepared:
    """A webdataset sample: caption from KEY.txt (else the .json's caption), scores from KEY.json, the image."""
    key = sample.key
    if sample.damage is not None:
        raise RecordError(CORRUPT_TAR, f"{key or 'between samples'}: {sample.damage}")
    members = sample.members
    meta = {}
    if "json" in members:
        raw = members["json"]
        if isinstance(raw, int):
            raise RecordError(LINE_TOO_LONG, f"{key}.json: {raw} bytes > --max_line_bytes {cfg.max_line_bytes}")
        meta = parse_json_object(raw)
    if "txt" in members:
        raw = members["txt"]
        if isinstance(raw, int):
            raise RecordError(LINE_TOO_LONG, f"{key}.txt: {raw} bytes > --max_line_bytes {cfg.max_line_bytes}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(CAPTION_BAD_UNICODE, f"{key}.txt is not UTF-8: {e}") from None
        caption = check_caption_text(text, f"{key}.txt", cfg.allow_empty_caption)
    elif cfg.caption_key in meta:
        caption = check_caption(meta, cfg.caption_key, cfg.allow_empty_caption)
    else:
        raise RecordError(NO_CAPTION, f"{key}: no .txt member and no {cfg.caption_key!r} in its .json")
    scores, has_meta = check_scores(meta, cfg)
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise RecordError(NO_IMAGE_MEMBER, f"{key}: no {'/'.join(IMAGE_EXTS)} member (has {sorted(members)})")
    data = members[ext]
    if isinstance(data, int):
        raise RecordError(IMAGE_TOO_LARGE, f"{key}.{ext}: {data} bytes > --max_image_bytes {cfg.max_image_bytes}")
    return Prepared(caption, data, scores, has_meta, f"{key}.{ext}")


def prepare_row(row: dict, source_index: int, cfg: CreateDataRun) -> Prepared:
    """A row of img2dataset's metadata: a successful download's caption and scores, and its image from the
    row's `jpg` column or the file IMAGE_ROOT/SHARD/KEY.jpg|jpeg|png|webp (SHARD: the metadata file's name)."""
    key = row.get("key")
    if not isinstance(key, str) or not key:
        raise RecordError(MISSING_KEY, f"'key' is {key!r}, not a file name")
    status = row.get("status")
    if status is not None and status != "success":
        raise RecordError(DOWNLOAD_FAILED, f"{key}: status {status!r}: {row.get('error_message')}")
    caption = check_caption(row, cfg.caption_key, cfg.allow_empty_caption)
    scores, has_meta = check_scores(row, cfg)
    embedded = row.get(IMAGE_COLUMN)
    if isinstance(embedded, bytes):
        if len(embedded) > cfg.max_image_bytes:
            raise RecordError(IMAGE_TOO_LARGE, f"{key}: {len(embedded)} bytes > --max_image_bytes "
                                               f"{cfg.max_image_bytes}")
        return Prepared(caption, embedded, scores, has_meta, f"{key} ({IMAGE_COLUMN} column)")
    shard = os.path.splitext(os.path.basename(cfg.input_files[source_index]))[0]
    root = cfg.image_roots[source_index]
    for ext in IMAGE_EXTS:
        try:
            path = resolve_image_path(os.path.join(shard, f"{key}.{ext}"), root, cfg.allow_outside_root)
        except RecordError as e:
            if e.reason != IMAGE_MISSING:
                raise
            continue
        return Prepared(caption, read_image_file(path, cfg.max_image_bytes), scores, has_meta, path)
    raise RecordError(IMAGE_MISSING, f"none of {os.path.join(root, shard, key)}.{{{','.join(IMAGE_EXTS)}}} exists")


def prepare(cfg: CreateDataRun, source_index: int, first_line: bool, item: Item) -> Prepared:
    if isinstance(item, int):
        raise RecordError(LINE_TOO_LONG, f"{item} bytes > --max_line_bytes {cfg.max_line_bytes}")
    if cfg.input_format == "jsonl":
        return prepare_jsonl(item, source_index, cfg, first_line)
    if isinstance(item, str):
        raise RecordError(CORRUPT_PARQUET, item)
    if isinstance(item, bytes):  # a line of img2dataset's metadata as jsonl
        item = parse_json_object(item, first_line)
    key = item.key if isinstance(item, TarSample) else item.get("key")
    try:
        if isinstance(item, TarSample):
            return prepare_tar_sample(item, cfg)
        return prepare_row(item, source_index, cfg)
    except RecordError as e:  # img2dataset's key names the record in a reject (its row or sample number too)
        if not isinstance(key, str) or not key or e.detail.startswith(key):
            raise
        raise RecordError(e.reason, f"{key}: {e.detail}") from None


def process_item(cfg: CreateDataRun, source_index: int, first_line: bool, item: Item, decode: bool) -> Result:
    """(the part line or (reason, detail), the dedup digest) of one record; no outcome when not `decode`."""
    try:
        rec = prepare(cfg, source_index, first_line, item)
    except RecordError as e:  # a per-record verdict, returned to be counted and written to the rejects
        return ((e.reason, _short(e.detail)) if decode else None), None, None
    digest = image_digest(rec.data) if cfg.dedup else None
    if not decode:
        return None, digest, None
    try:
        stored, (w, h) = check_image(rec.data, cfg)
    except RecordError as e:
        return (e.reason, _short(f"{rec.where}: {e.detail}")), digest, None
    except Exception as e:  # noqa: BLE001 - a decoder's bug is this record's reject; its digest stands, as when
        return (RECORD_EXCEPTION, _short(repr(e))), digest, None  # another run hashes it without decoding
    meta = part_metadata(rec.scores, w, h) if rec.has_meta else None
    # (w, h): the stored image upright, the size the loader buckets by (trainer/loader/buckets.py)
    bucket = bucket_name(nearest_bucket(w, h, cfg.buckets)) if cfg.buckets else None
    return encode_record(rec.caption, stored, meta), digest, bucket


def _short(detail: str) -> str:
    return detail if len(detail) <= MAX_DETAIL else detail[:MAX_DETAIL] + f"... ({len(detail)} characters)"


def process_batch(cfg: CreateDataRun, batch: Task) -> List[Result]:
    out: List[Result] = []
    for source_index, first_line, item, decode in batch:
        try:
            out.append(process_item(cfg, source_index, first_line, item, decode))
        except Exception as e:  # noqa: BLE001 - whatever one record raises is that record's reject (image_check)
            out.append(((RECORD_EXCEPTION, _short(repr(e))) if decode else None, None, None))
    return out


# ---------------------------------------------------------------------------------------- pool plumbing
_WORKER_CFG: Optional[CreateDataRun] = None


def init_worker(cfg: CreateDataRun, main_pid: int) -> None:
    """Pool initializer: the config travels once per worker, not once per task. A worker holds both ends of its
    result pipe, so when the main process is SIGKILLed (OOM killer, a user) it would block forever writing a
    result and keep the forkserver alive with it: nobody is left to report to, so it leaves at once."""
    global _WORKER_CFG
    _WORKER_CFG = cfg
    apply_pixel_limit(cfg.max_image_pixels)
    die_with_parent(main_pid)  # the forkserver is the direct parent: this polls for the main process


def worker_batch(batch: Task) -> List[Result]:
    if _WORKER_CFG is None:
        raise RuntimeError("worker_batch called in a process that init_worker did not set up")
    return process_batch(_WORKER_CFG, batch)

