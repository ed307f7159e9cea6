"""The one module that owns the on-disk dataset format: part files, filelists and the manifest.

Layout written by create_pretraining_data.py (the reference's layout, plus a manifest):

    OUT/laion400m_format_data/part-000001[.gz]   one record a line: caption<TAB>NONE<TAB><base64 image>
    OUT/filelist/NAME.filelist                   one part path a line
    OUT/filelist/NAME.filelist.list              one filelist path a line, optional weight after a space
    OUT/NAME.manifest.json                       format, counts, parts with sha256

A relative path in either list is looked for in the list's own folder, then in the working folder (the
reference's convention): see resolve_listed. The writer (data_tools/create_data.py) and the streaming loader
(trainer/loader/) both import this module, so a change of format is made here once. Gzip is recognised by
its magic bytes, never by a file name.
"""
from __future__ import annotations

import binascii
import gzip
import json
import math
import os
import re
import unicodedata
from collections import Counter
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


# ----------------------------------------------------------------------------------------------- filelists
# Where a relative path in a .filelist or .filelist.list is looked for, in this order. Our data tool writes paths
# relative to the list's own folder (or absolute); the reference's create_pretraining_data.py writes them relative
# to the folder the recipe runs from, and its loader opens them from the working folder. The list's folder is
# tried first because it does not depend on where a command runs; the working folder second, so the reference's
# layouts read unchanged. A path found in neither is an error naming both places.
BASE_ABSOLUTE = "absolute"
BASE_LIST_FOLDER = "list folder"
BASE_WORKING_FOLDER = "working folder"
_WEIGHTED_LINE = re.compile(r"^(.*?\S)\s+(\S+)$")
_MAX_LIST_BYTES = 256 << 20  # a list of 1M parts with 200-character paths; anything larger is not a list


def listed_candidates(path: str, naming_file: str) -> List[Tuple[str, str]]:
    """(candidate, base) in the order a path named in `naming_file` is looked for: itself when absolute, else the
    list's own folder, then the working folder."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return [(os.path.normpath(path), BASE_ABSOLUTE)]
    return [(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(naming_file)), path)), BASE_LIST_FOLDER),
            (os.path.normpath(os.path.join(os.getcwd(), path)), BASE_WORKING_FOLDER)]


def resolve_listed(path: str, naming_file: str, line: int, what: str) -> Tuple[str, str]:
    """(absolute path, base used) of a path named on line `line` of `naming_file`: see the order above. A path
    that names no regular file at either place is a FileNotFoundError naming every place tried."""
    path = os.path.expanduser(path)
    tried = listed_candidates(path, naming_file)
    for candidate, base in tried:
        if os.path.isfile(candidate):
            return candidate, base
    places = "; ".join(f"{c} ({b}{': exists but is not a regular file' if os.path.exists(c) else ''})"
                       for c, b in tried)
    raise FileNotFoundError(f"{naming_file}:{line}: {what} not found: {path!r}; tried {places}")


def list_lines(path: str, what: str) -> List[Tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank, non-comment lines of a list file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}" + (" (not a regular file)" if os.path.exists(path) else ""))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(_MAX_LIST_BYTES + 1)
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: cannot read this {what} as UTF-8 text: {e}") from None
    if len(text) > _MAX_LIST_BYTES:
        raise ValueError(f"{path}: this {what} is larger than {_MAX_LIST_BYTES >> 20} MiB; is it really a list?")
    out = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()[:1] not in ("", "#")]
    for n, s in out:
        if "\x00" in s:
            raise ValueError(f"{path}:{n}: NUL byte in a path")
    return out


@dataclass(frozen=True)
class Source:
    """One weighted `.filelist` named by a `.filelist.list`. `base`: how the filelist's own path was found;
    `parts_base`: how its part paths were (one base, or the count of each when they differ)."""

    filelist: str
    weight: float
    parts: Tuple[str, ...]
    base: str = BASE_ABSOLUTE
    parts_base: str = BASE_ABSOLUTE


def _read_filelist(path: str) -> Tuple[List[str], List[str]]:
    parts, bases = [], []
    for n, s in list_lines(path, "filelist"):
        part, base = resolve_listed(s, path, n, "part")
        parts.append(part)
        bases.append(base)
    return parts, bases


def read_filelist(path: str) -> List[str]:
    """Part paths listed by a `.filelist` (blank lines and #-comments ignored), resolved (see resolve_listed)."""
    return _read_filelist(path)[0]


def _summarise_bases(bases: List[str]) -> str:
    counts = Counter(bases)
    return bases[0] if len(counts) == 1 else ", ".join(f"{n} by {b}" for b, n in counts.items()) or "no parts"


def parse_weighted_line(text: str) -> Tuple[str, Optional[str]]:
    """(path, weight token or None) of a `.filelist.list` line `path [weight]`: the last whitespace-separated
    token is the weight when it reads as a number, else it is part of the path (paths may contain spaces)."""
    m = _WEIGHTED_LINE.match(text)
    if m is None:
        return text, None
    try:
        float(m.group(2))
    except ValueError:
        return text, None
    return m.group(1), m.group(2)


def read_filelist_list(path: str) -> List[Source]:
    """Sources of a `.filelist.list`: each line `path/to/x.filelist [weight]`. Missing files, weights that are not
    finite and > 0, and lists that name themselves are errors naming the file and the line."""
    sources = []
    for n, s in list_lines(path, "--file_list"):
        fl_text, weight_text = parse_weighted_line(s)
        weight = 1.0
        if weight_text is not None:
            weight = float(weight_text)
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{path}:{n}: weight must be a finite number > 0, got {weight_text!r}")
        try:
            filelist, base = resolve_listed(fl_text, path, n, "filelist")
        except FileNotFoundError as e:
            last = s.split()[-1]
            hint = (f" (its last token {last!r} is not a number, so it was read as part of the path, not as a "
                    "weight)") if weight_text is None and len(s.split()) > 1 else ""
            raise FileNotFoundError(f"{e}{hint}") from None
        if os.path.samefile(filelist, path):
            raise ValueError(f"{path}:{n}: the list names itself as a filelist")
        parts, bases = _read_filelist(filelist)
        for p in dict.fromkeys(parts):
            if os.path.samefile(p, filelist) or os.path.samefile(p, path):
                raise ValueError(f"{filelist}: lists itself (or its .filelist.list) as a part: {p}")
        sources.append(Source(filelist, weight, tuple(parts), base, _summarise_bases(bases)))
    if not sources:
        raise ValueError(f"{path}: names no filelist")
    if not any(src.parts for src in sources):
        raise ValueError(f"{path}: its filelists list no part files")
    total = sum(src.weight for src in sources)
    if not math.isfinite(total):
        raise ValueError(f"{path}: the weights sum to {total} (each is finite, their sum overflows); scale them "
                         "down: only their ratios matter")
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


LATENT_DATA_FORMAT = "sd_latents"  # the datasets of precompute_latents.py (data_tools/latent_format.py)


def read_manifest(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("data_format") == LATENT_DATA_FORMAT:  # data_tools/latent_format.py checks its own version
        return manifest
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if manifest.get("data_format") not in DATA_FORMATS:
        raise ValueError(f"{path}: data_format {manifest.get('data_format')!r} not in {DATA_FORMATS}")
    return manifest


def data_format_of(filelist: str, explicit: Optional[str]) -> str:
    """The format of a source: the explicit argument wins, then the dataset's manifest, else laion400m (the
    reference's default). Never guessed from a file name."""
    m = manifest_for_filelist(filelist)
    found = read_manifest(m)["data_format"] if m else None
    if explicit:
        if explicit not in DATA_FORMATS:
            raise ValueError(f"--data_format {explicit!r} not in {DATA_FORMATS}")
        if found == LATENT_DATA_FORMAT:
            raise ValueError(f"--data_format {explicit}: {filelist} is a latent dataset ({m}), not image parts")
        return explicit
    return found or "laion400m"

