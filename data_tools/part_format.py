"""The one module that owns the on-disk dataset format: part files, filelists and the manifest.

Layout written by create_pretraining_data.py (the reference's layout, plus a manifest):

    OUT/laion400m_format_data/part-000001[.gz]   one record a line: caption<TAB>NONE<TAB><base64 image>
    OUT/filelist/NAME.filelist                   one part path a line (absolute)
    OUT/filelist/NAME.filelist.list              one filelist path a line, optional weight after a space
    OUT/NAME.manifest.json                       format, counts, parts with sha256

The writer (data_tools/create_data.py) and the streaming loader (trainer/) both import this module, so a
change of format is made here once. Gzip is recognised by its magic bytes, never by a file name.
"""
from __future__ import annotations

import binascii
import gzip
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import IO, Iterator, List, Optional, Tuple

import pybase64  # same bytes and the same strict validation as binascii, ~40x faster on image fields

try:  # ISA-L gzip: same format as zlib's, ~10x faster to compress base64 JPEG (bench/bench_create_data.py)
    from isal import igzip as _gzip_impl
except ImportError:  # pragma: no cover - isal is in requirements.txt; zlib stays a correct fallback
    _gzip_impl = gzip

FORMAT_VERSION = 1
DATA_DIR_NAME = "laion400m_format_data"
FILELIST_DIR_NAME = "filelist"
PLACEHOLDER = "NONE"
DATA_FORMATS = ("laion400m", "laion_aes")
GZIP_MAGIC = b"\x1f\x8b"

# Characters that would break "one record a line, three tab-separated fields" or that str.splitlines() treats
# as line breaks. Everything in Unicode category Cc (C0/C1 controls incl. TAB, CR, LF, NEL) plus these.
_EXTRA_BREAKS = frozenset({"\u2028", "\u2029"})


class RecordError(ValueError):
    """A record that cannot be used. `reason` is a short stable key used in counters and rejects files."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- records
def sanitize_caption(caption: str) -> str:
    """Control characters (tabs, CR, LF, ...) and Unicode line/paragraph separators become spaces; the result
    is stripped. A sanitized caption can never split a record or add a field."""
    out = [" " if (unicodedata.category(ch) == "Cc" or ch in _EXTRA_BREAKS) else ch for ch in caption]
    return "".join(out).strip()


def encode_record(caption: str, image_bytes: bytes) -> bytes:
    """One laion400m line (with trailing newline), UTF-8. The caption is sanitized here so that no caller can
    write a broken record."""
    b64 = pybase64.b64encode(image_bytes)
    return sanitize_caption(caption).encode("utf-8") + b"\t" + PLACEHOLDER.encode() + b"\t" + b64 + b"\n"


def decode_text(raw: bytes) -> str:
    """Lines are UTF-8; older Chinese dumps are gb18030 (the reference's fallback)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("gb18030")
        except UnicodeDecodeError as e:
            raise RecordError("bad_encoding", str(e)) from None


def _base64_error_detail(b64: bytes, error: Exception) -> str:
    """pybase64 says only 'Non-base64 digit found'; binascii's strict mode says what is wrong (padding, excess
    data, a bad character). Run on the error path only, so its cost does not matter."""
    try:
        binascii.a2b_base64(b64, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        return str(e)
    return str(error)


def parse_record(raw: bytes, data_format: str) -> Tuple[str, bytes]:
    """(caption, image bytes) from one line of a part. Raises RecordError with a reason key.

    The line is split as bytes and only the text fields are decoded: the base64 field is ASCII and by far the
    largest, and decoding it to str and back cost more than the base64 decode itself (0.43 ms of a 160 KB
    line, bench/bench_loader.py). Splitting on the TAB byte is safe in both encodings: neither UTF-8 nor
    gb18030 uses 0x09 inside a multi-byte character."""
    fields = raw.rstrip(b"\r\n").split(b"\t")
    if data_format == "laion400m":
        if len(fields) < 3:
            raise RecordError("bad_fields", f"expected 3 tab-separated fields, got {len(fields)}")
        caption, b64 = decode_text(fields[0]), fields[2]
    elif data_format == "laion_aes":
        if len(fields) < 6:
            raise RecordError("bad_fields", f"expected at least 6 tab-separated fields, got {len(fields)}")
        try:
            meta = json.loads(decode_text(fields[2]))
        except json.JSONDecodeError as e:
            raise RecordError("bad_json", str(e)) from None
        caption = (meta.get("caption_en") or meta.get("blip_caption_en")) if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise RecordError("no_caption", "neither caption_en nor blip_caption_en is a string")
        b64 = fields[5]
    else:
        raise ValueError(f"unknown data_format {data_format!r}; expected one of {DATA_FORMATS}")
    try:
        image = pybase64.b64decode(b64, validate=True)  # non-base64 bytes (any non-ASCII too) raise here
    except (binascii.Error, ValueError) as e:
        raise RecordError("bad_base64", _base64_error_detail(b64, e)) from None
    if not image:
        raise RecordError("bad_base64", "empty image field")
    return caption, image


# ----------------------------------------------------------------------------------------------- parts
def part_name(index: int, gzipped: bool) -> str:
    return f"part-{index:06d}" + (".gz" if gzipped else "")


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


class PartWriter:
    """Binary writer of one part. Gzip goes through ISA-L when available (its levels are 0-3: zlib's level // 3)
    with mtime 0 and no file name in the header, so equal content gives equal bytes in every run (a resumed run,
    another worker count, a shard). close() flushes and fsyncs, so a rename that follows never exposes a part
    whose bytes are not on disk."""

    def __init__(self, path: str, gzipped: bool, level: int = 6):
        self._raw = open(path, "wb")
        self._out: IO[bytes] = self._raw
        if gzipped and _gzip_impl is gzip:
            self._out = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=level, mtime=0)
        elif gzipped:
            self._out = _gzip_impl.IGzipFile(filename="", mode="wb", fileobj=self._raw,
                                             compresslevel=min(3, max(0, level // 3)), mtime=0)

    def write(self, data: bytes) -> int:
        return self._out.write(data)

    def close(self) -> None:
        if self._out is not self._raw:
            self._out.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_part_writer(path: str, gzipped: bool, level: int = 6) -> PartWriter:
    return PartWriter(path, gzipped, level)


_PART_FILE_RE = re.compile(r"^part-(\d{6,})(\.gz)?(\.tmp)?$")


def part_index(filename: str) -> Optional[int]:
    """The 1-based index of a part (or part .tmp) file name written by part_name(); None for any other file."""
    m = _PART_FILE_RE.match(filename)
    return int(m.group(1)) if m else None


def open_part_reader(path: str) -> IO[bytes]:
    """A binary reader for a plain or gzipped part, chosen by the file's magic bytes."""
    if is_gzip(path):
        return _gzip_impl.open(path, "rb")
    return open(path, "rb")


def iter_part_lines(path: str, start_line: int = 0) -> Iterator[Tuple[int, bytes]]:
    """Yield (0-based line number, raw line bytes) of non-blank lines, from `start_line` on.

    A truncated or corrupt gzip part raises RecordError('truncated_part') after the last good line, so a reader
    keeps every record before the damage and can count the damage."""
    with open_part_reader(path) as f:
        i = -1
        try:
            for i, raw in enumerate(f):
                if i < start_line or not raw.strip():
                    continue
                yield i, raw
        except (EOFError, OSError, gzip.BadGzipFile, ValueError) as e:
            raise RecordError("truncated_part", f"{path} after line {i + 1}: {e}") from None


# ----------------------------------------------------------------------------------------------- filelists
def _resolve(path: str, naming_file: str) -> str:
    """Relative paths resolve against the folder of the file that names them."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(os.path.dirname(naming_file), path))


@dataclass(frozen=True)
class Source:
    """One weighted `.filelist` named by a `.filelist.list`."""

    filelist: str
    weight: float
    parts: Tuple[str, ...]


def read_filelist(path: str) -> List[str]:
    """Part paths listed by a `.filelist` (blank lines and #-comments ignored), resolved."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"filelist not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [_resolve(s, path) for s in (ln.strip() for ln in f) if s and not s.startswith("#")]


def read_filelist_list(path: str, check_parts: bool = True) -> List[Source]:
    """Sources of a `.filelist.list`: each line `path/to/x.filelist [weight]`. Missing files are errors naming
    the file and the line that names it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--file_list not found: {path}")
    sources = []
    with open(path, encoding="utf-8") as f:
        for n, ln in enumerate(f, 1):
            s = ln.strip()
            if not s or s.startswith("#"):
                continue
            fields = s.split()
            if len(fields) > 2:
                raise ValueError(f"{path}:{n}: expected 'path [weight]', got {s!r}")
            weight = 1.0
            if len(fields) == 2:
                try:
                    weight = float(fields[1])
                except ValueError:
                    raise ValueError(f"{path}:{n}: weight {fields[1]!r} is not a number") from None
                if not weight > 0:
                    raise ValueError(f"{path}:{n}: weight must be > 0, got {weight}")
            filelist = _resolve(fields[0], path)
            if not os.path.isfile(filelist):
                raise FileNotFoundError(f"{path}:{n}: filelist not found: {filelist}")
            parts = read_filelist(filelist)
            if check_parts:
                for p in dict.fromkeys(parts):
                    if not os.path.isfile(p):
                        raise FileNotFoundError(f"{filelist}: part not found: {p}")
            sources.append(Source(filelist, weight, tuple(parts)))
    if not sources:
        raise ValueError(f"{path}: names no filelist")
    if not any(src.parts for src in sources):
        raise ValueError(f"{path}: its filelists list no part files")
    return sources


# ----------------------------------------------------------------------------------------------- manifest
def manifest_path(output_path: str, output_name: str) -> str:
    return os.path.join(output_path, f"{output_name}.manifest.json")


def manifest_for_filelist(filelist: str) -> Optional[str]:
    """The manifest create_pretraining_data.py wrote beside OUT/filelist/NAME.filelist, if there is one."""
    name = os.path.basename(filelist)
    if not name.endswith(".filelist"):
        return None
    out = os.path.dirname(os.path.dirname(os.path.abspath(filelist)))
    path = manifest_path(out, name[: -len(".filelist")])
    return path if os.path.isfile(path) else None


def read_manifest(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if manifest.get("data_format") not in DATA_FORMATS:
        raise ValueError(f"{path}: data_format {manifest.get('data_format')!r} not in {DATA_FORMATS}")
    return manifest


def data_format_of(filelist: str, explicit: Optional[str]) -> str:
    """The format of a source: the explicit argument wins, then the dataset's manifest, else laion400m (the
    reference's default). Never guessed from a file name."""
    if explicit:
        if explicit not in DATA_FORMATS:
            raise ValueError(f"--data_format {explicit!r} not in {DATA_FORMATS}")
        return explicit
    m = manifest_for_filelist(filelist)
    return read_manifest(m)["data_format"] if m else "laion400m"

