"""Per-record work of create_pretraining_data.py: parse one jsonl line and read its image (prepare_jsonl), check a
caption and the score filters (any input format), fully decode an image (check_image). Runs in the worker
processes (data_tools/ingest.py drives it); nothing here touches the output folder. What a worker needs to know is
the run's resolved config (data_tools/create_config.CreateDataRun), sent once per worker.

Every way a record can fail has its own reason key (REASONS) so the rejects file and the summary can say how
many records were lost to what. Failures are raised as part_format.RecordError(reason, detail); any other
exception while reading, parsing or decoding one record (a bug in a decoder, a MemoryError) is still that record's
fault, and becomes a `record_exception` reject with the exception's repr (ingest.process_batch): one record never
ends a run. The reasons of the filters are data_tools/filters.py's, those of img2dataset's inputs ingest.py's.

Bounded memory: a line longer than --max_line_bytes never reaches a worker (ingest.iter_lines hands over its
length); an image file is opened without following a FIFO's wait (O_NONBLOCK), must be a regular file, and is
refused by its size before any byte is read when over --max_image_bytes. Pixels are judged as the loader sees
them: data_tools/pixels.upright_rgb8 (EXIF orientation applied, 16-bit and float scaled to 8 bits).
"""
from __future__ import annotations

import io
import json
import os
import stat
import struct
import warnings
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

from PIL import Image

from data_tools.create_config import DEFAULT_MAX_IMAGE_PIXELS, CreateDataRun
from data_tools.filters import aspect_reject, record_metadata, score_reject
from data_tools.part_format import RecordError, sanitize_caption
from data_tools.pixels import upright_rgb8

# Reject reasons, each distinct so a count points at one cause.
MALFORMED_JSON = "malformed_json"
NOT_OBJECT = "not_json_object"
MISSING_CAPTION = "missing_caption_key"
CAPTION_NOT_STRING = "caption_not_string"
BLANK_CAPTION = "blank_caption"
MISSING_IMAGE_KEY = "missing_image_key"
IMAGE_NOT_STRING = "image_not_string"
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
OUTSIDE_ROOT = "path_outside_root"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated_image"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_SMALL = "too_small"
LINE_TOO_LONG = "line_too_long"
CAPTION_BAD_UNICODE = "caption_bad_unicode"
NOT_A_FILE = "image_not_a_file"
IMAGE_TOO_LARGE = "image_too_large"
RECORD_EXCEPTION = "record_exception"
REASONS = (MALFORMED_JSON, NOT_OBJECT, MISSING_CAPTION, CAPTION_NOT_STRING, BLANK_CAPTION, MISSING_IMAGE_KEY,
           IMAGE_NOT_STRING, IMAGE_MISSING, IMAGE_UNREADABLE, OUTSIDE_ROOT, EMPTY_FILE, NOT_AN_IMAGE, TRUNCATED,
           TOO_MANY_PIXELS, TOO_SMALL, LINE_TOO_LONG, CAPTION_BAD_UNICODE, NOT_A_FILE, IMAGE_TOO_LARGE,
           RECORD_EXCEPTION)
MAX_DETAIL = 500  # characters of a reject's detail: a 15 MB path must not make a 15 MB rejects line

# Exceptions Pillow's decoders raise on corrupt input (the set its fuzz tests accept): each names its reason;
# anything else becomes a record_exception reject (process_batch).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, struct.error)
_PNG_END = b"IEND\xaeB`\x82"


def resolve_image_path(value: str, root: str, allow_outside_root: bool) -> str:
    """The real path of an image named by a record. Symlinks and '..' are resolved before the root check, so
    neither can smuggle a file from outside the root; the check comes before any existence test so a rejected
    path reveals nothing about the file system outside the root."""
    if "\x00" in value:
        raise RecordError(IMAGE_MISSING, f"{value!r} contains a NUL byte")
    candidate = os.path.join(root, value)  # join keeps an absolute value as it is
    real = os.path.realpath(candidate)
    real_root = os.path.realpath(root)
    if not allow_outside_root and os.path.commonpath([real, real_root]) != real_root:
        raise RecordError(OUTSIDE_ROOT, f"{value!r} resolves to {real}, outside the image root {real_root}")
    if os.path.exists(real) and not os.path.isfile(real):  # a folder, a FIFO, a device such as /dev/zero
        raise RecordError(NOT_A_FILE, f"{real} is not a regular file")
    if not os.path.exists(real):
        what = "is a broken or looping symlink" if os.path.lexists(real) else "does not exist"
        raise RecordError(IMAGE_MISSING, f"{real} {what}")
    return real


def read_image_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Checked on the open file itself, so a path swapped for
    a FIFO or a huge file after resolve_image_path still cannot block the worker or fill its memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RecordError(IMAGE_UNREADABLE, f"{path}: {e.strerror or e}") from None
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError(NOT_A_FILE, f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise RecordError(IMAGE_TOO_LARGE, f"{path}: {st.st_size} bytes > --max_image_bytes {max_bytes}")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise RecordError(IMAGE_UNREADABLE, f"{path}: {e}") from None
    if len(data) > max_bytes:  # grew since fstat
        raise RecordError(IMAGE_TOO_LARGE, f"{path}: more than --max_image_bytes {max_bytes} bytes")
    return data


def _truncated_or_corrupt(img_format: Optional[str], data: bytes, err: BaseException) -> RecordError:
    """PIL says 'truncated' for most formats cut short; a PNG cut after its pixel data is found by verify()
    with other words, so for PNG the missing end chunk decides."""
    msg = f"{type(err).__name__}: {err}"
    if isinstance(err, EOFError) or "truncated" in str(err).lower():
        return RecordError(TRUNCATED, msg)
    if img_format == "PNG" and _PNG_END not in data[-64:]:
        return RecordError(TRUNCATED, f"PNG without its IEND chunk ({msg})")
    return RecordError(NOT_AN_IMAGE, f"undecodable {img_format or 'image'}: {msg}")


def check_image(data: bytes, cfg: CreateDataRun) -> Tuple[bytes, Tuple[int, int]]:
    """Fully decode `data`; return the bytes to store (the original bytes, or a JPEG re-encode when `max_side`
    asks for a downscale) and the stored image's size as the loader sees it (upright). Raises RecordError for
    anything a trainer could not use or --max_aspect_ratio refuses."""
    if not data:
        raise RecordError(EMPTY_FILE, "zero-byte file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's bound is set to ours in the workers; it fires at 2x
        raise RecordError(TOO_MANY_PIXELS, str(e)) from None
    except Image.UnidentifiedImageError:  # its message names a BytesIO address: useless, not reproducible
        raise RecordError(NOT_AN_IMAGE, f"no image format recognised (starts with {data[:8]!r})") from None
    except _DECODE_ERRORS as e:
        raise RecordError(NOT_AN_IMAGE, f"{type(e).__name__}: {e}") from None
    with im:
        w, h = im.size
        # Checked before load(): the point of the bound is not to allocate the pixels of a decompression bomb.
        if w * h > cfg.max_image_pixels:
            raise RecordError(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > --max_image_pixels {cfg.max_image_pixels}")
        if min(w, h) < cfg.min_image_size:
            raise RecordError(TOO_SMALL, f"{w}x{h}: shorter side < --min_image_size {cfg.min_image_size}")
        refused = aspect_reject(w, h, cfg.max_aspect_ratio)  # from the header's size, before the pixels
        if refused is not None:
            raise RecordError(*refused)
        fmt = im.format
        try:
            im.load()
            rgb = upright_rgb8(im)  # exactly the loader's conversion: what fails here would fail in training
            if fmt == "PNG":  # load() stops at the pixel data; verify() checks the chunks after it and CRCs
                with Image.open(io.BytesIO(data)) as again:
                    again.verify()
        except _DECODE_ERRORS as e:
            raise _truncated_or_corrupt(fmt, data, e) from None
        if cfg.max_side is None or max(w, h) <= cfg.max_side:
            return data, rgb.size  # original bytes: no generation loss
        # Re-encoding drops EXIF: `rgb` is already upright, so the stored pixels are what the loader would show.
        scale = cfg.max_side / max(rgb.size)
        size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
        out = io.BytesIO()
        rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0).save(out, "JPEG", quality=cfg.jpeg_quality)
        return out.getvalue(), size


class Prepared(NamedTuple):
    """A record whose every check but the image decode passed: what ingest.process_item decodes and encodes."""

    caption: str
    data: bytes  # the image's bytes as stored in the input
    scores: Dict[str, float]  # filters.record_metadata
    has_meta: bool  # the input carried scores or sizes: the part's second field is JSON, not NONE
    where: str  # names the image in a reject's detail (a path, a tar member)


def check_caption(obj: Mapping[str, object], key: str, allow_empty: bool) -> str:
    """The sanitized caption under `key` of a record's fields."""
    if key not in obj:
        raise RecordError(MISSING_CAPTION, f"no {key!r} key")
    caption = obj[key]
    if not isinstance(caption, str):
        raise RecordError(CAPTION_NOT_STRING, f"{key!r} is a {type(caption).__name__}")
    return check_caption_text(caption, key, allow_empty)


def check_caption_text(caption: str, what: str, allow_empty: bool) -> str:
    caption = sanitize_caption(caption)
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, from a JSON escape such as "\ud800"
        raise RecordError(CAPTION_BAD_UNICODE, f"{e.reason} at character {e.start}: {caption[e.start:e.end]!r}"
                          ) from None
    if not caption and not allow_empty:
        raise RecordError(BLANK_CAPTION, f"{what!r} is blank (pass --allow_empty_caption to keep it)")
    return caption


def check_scores(obj: Mapping[str, object], cfg: CreateDataRun) -> Tuple[Dict[str, float], bool]:
    """The record's scores and whether it has metadata at all (filters.record_metadata), after the score filters
    (--max_pwatermark, --max_punsafe, --min_aesthetic, --min_similarity) accepted it."""
    scores, has_meta = record_metadata(obj)
    refused = score_reject(scores, cfg.score_limits())
    if refused is not None:
        raise RecordError(*refused)
    return scores, has_meta


def parse_json_object(raw: bytes, first_line: bool = False) -> dict:
    """One jsonl line as a JSON object."""
    if first_line and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark some editors put at the start of a file
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecordError(MALFORMED_JSON, f"not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise RecordError(MALFORMED_JSON, str(e)) from None
    except (ValueError, RecursionError) as e:  # a number of 5,000 digits; nesting deeper than the stack
        raise RecordError(MALFORMED_JSON, repr(e)) from None
    if not isinstance(obj, dict):
        raise RecordError(NOT_OBJECT, f"got a JSON {type(obj).__name__}")
    return obj


def prepare_jsonl(raw: bytes, source_index: int, cfg: CreateDataRun, first_line: bool = False) -> Prepared:
    """One jsonl line {caption, image path, optional scores}: its checks, then its image's bytes."""
    obj = parse_json_object(raw, first_line)
    caption = check_caption(obj, cfg.caption_key, cfg.allow_empty_caption)
    if cfg.image_key not in obj:
        raise RecordError(MISSING_IMAGE_KEY, f"no {cfg.image_key!r} key")
    image = obj[cfg.image_key]
    if not isinstance(image, str):
        raise RecordError(IMAGE_NOT_STRING, f"{cfg.image_key!r} is a {type(image).__name__}")
    scores, has_meta = check_scores(obj, cfg)
    path = resolve_image_path(image, cfg.image_roots[source_index], cfg.allow_outside_root)
    return Prepared(caption, read_image_file(path, cfg.max_image_bytes), scores, has_meta, path)


def apply_pixel_limit(max_image_pixels: int) -> None:
    """Align PIL's decompression-bomb guard with ours: PIL must not refuse below our bound (it raises at 2x
    MAX_IMAGE_PIXELS inside Image.open) nor warn about images we reject anyway."""
    Image.MAX_IMAGE_PIXELS = max(max_image_pixels, DEFAULT_MAX_IMAGE_PIXELS)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
