"""The one module that owns the part-file format: records and the part files that hold them.

Layout written by create_pretraining_data.py (the reference's layout):

    OUT/laion400m_format_data/part-000001[.gz]   one record a line: caption<TAB>NONE<TAB><base64 image>
                                                 (the second field may be a JSON object of the image size and
                                                 scores instead of NONE: encode_meta)

The filelists that name parts and the dataset manifest are data_tools/filelists.py's. The writer
(data_tools/create_data.py) and the streaming loader (trainer/loader/) both import this module, so a change of
record or part format is made here once. Gzip is recognised by its magic bytes, never by a file name.
"""
from __future__ import annotations

import binascii
import gzip
import json
import os
import re
import unicodedata
from typing import IO, Iterator, Optional, Tuple

import pybase64  # same bytes and the same strict validation as binascii, ~40x faster on image fields

try:  # ISA-L gzip: same format as zlib's, ~10x faster to compress base64 JPEG (bench/bench_create_data.py)
    from isal import igzip as _gzip_impl
except ImportError:  # pragma: no cover - isal is in requirements.txt; zlib stays a correct fallback
    _gzip_impl = gzip

FORMAT_VERSION = 1
DATA_DIR_NAME = "laion400m_format_data"
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


def encode_record(caption: str, image_bytes: bytes, meta: Optional[dict] = None) -> bytes:
    """One laion400m line (with trailing newline), UTF-8. The caption is sanitized here so that no caller can
    write a broken record. `meta` (numbers by name, e.g. the image size and LAION scores) becomes the second
    field as compact JSON (encode_meta); without it the field is the reference's NONE."""
    b64 = pybase64.b64encode(image_bytes)
    second = PLACEHOLDER.encode() if meta is None else encode_meta(meta)
    return sanitize_caption(caption).encode("utf-8") + b"\t" + second + b"\t" + b64 + b"\n"


def encode_meta(meta: dict) -> bytes:
    """The second field of a laion400m line: a JSON object without spaces. ASCII-only JSON never holds a raw
    TAB or line break (json escapes control characters), so it cannot add a field or split a line; the
    reference's loader never reads this field, so such parts stay readable by it. NaN and infinities are
    refused: they are not JSON."""
    if not isinstance(meta, dict):
        raise TypeError(f"part metadata must be a dict, got {type(meta).__name__}")
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def decode_meta(field: bytes) -> Optional[dict]:
    """The metadata of a line's second field: None for NONE and for anything that is not a JSON object (the
    field is informative: a malformed one never makes a record unreadable)."""
    if field == PLACEHOLDER.encode() or not field.startswith(b"{"):
        return None
    try:
        obj = json.loads(field)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def record_meta(raw: bytes) -> Optional[dict]:
    """decode_meta of the second field of a laion400m line; None when the line has no second field."""
    fields = raw.split(b"\t", 2)
    return decode_meta(fields[1]) if len(fields) == 3 else None


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
        except RecordError:
            raise
        except Exception as e:  # noqa: BLE001 - bad JSON, nesting deeper than the recursion limit, huge ints
            raise RecordError("bad_json", repr(e)[:500]) from None
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


def iter_part_lines(path: str, start_line: int = 0,
                    max_line_bytes: Optional[int] = None) -> Iterator[Tuple[int, Optional[bytes]]]:
    """Yield (0-based line number, raw line bytes) of non-blank lines, from `start_line` on.

    With `max_line_bytes`, a line longer than that is yielded as (line number, None) and passed over by reading
    on to its newline in bounded chunks, so no line is ever held whole (a gzip part that inflates to one huge
    line included); lines are numbered by newlines either way, so a cap does not move any line number.

    A part that cannot be opened or read raises RecordError('unreadable_part'); a truncated gzip part raises
    RecordError('truncated_part') and any other read failure RecordError('read_error'), after the last good
    line, so a reader keeps every record before the damage and can count the damage."""
    try:
        f = open_part_reader(path)
    except Exception as e:  # noqa: BLE001 - gone, a directory, no permission, unreadable header: a skip
        raise RecordError("unreadable_part", f"{path}: {e!r}") from None
    i = -1
    try:
        with f:
            if max_line_bytes is None:
                for i, raw in enumerate(f):
                    if i >= start_line and raw.strip():
                        yield i, raw
                return
            while True:
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    return
                i += 1
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    while True:  # the rest of the over-long line, a chunk at a time
                        chunk = f.readline(_RESYNC_CHUNK)
                        if not chunk or chunk.endswith(b"\n"):
                            break
                    if i >= start_line:
                        yield i, None
                elif i >= start_line and raw.strip():
                    yield i, raw
    except (EOFError, gzip.BadGzipFile) as e:
        raise RecordError("truncated_part", f"{path} after line {i + 1}: {e!r}") from None
    except Exception as e:  # noqa: BLE001 - a record-level reader: every failure of the part's bytes is a skip
        raise RecordError("read_error", f"{path} after line {i + 1}: {e!r}") from None


_RESYNC_CHUNK = 1 << 20
