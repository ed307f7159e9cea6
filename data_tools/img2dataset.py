"""Reading img2dataset's outputs, streamed, in create_pretraining_data.py's main process (--input_format
webdataset | parquet). What becomes of each record (caption, scores, image) is data_tools/ingest.py's, in the
workers.

webdataset: a tar shard holds KEY.jpg|jpeg|png|webp, KEY.txt (caption) and KEY.json (img2dataset's metadata: url,
caption, width, height, original_width, original_height, status, similarity, pwatermark, punsafe, ...). As in
webdataset, a sample is a run of consecutive members with one key: the member path up to the first '.' of its
file name. The tar is read in tarfile's streaming mode ("r|*", compressed or not), one member at a time, so memory
holds one sample, never a shard; a member over its bound (--max_image_bytes for an image, --max_line_bytes for
text) is passed over in chunks and handed on as its size. Every member's bytes are read in the same way whether or
not this run wants the record (another shard's, a resumed block), so where a damaged tar fails, and therefore the
sequence of records, is the same in every run. A truncated or corrupt tar ends the shard's reading: the sample
being read (or, when none was, a record of its own) becomes a `corrupt_tar` reject, and every sample before it
counts as usual.

parquet: img2dataset's per-shard metadata, SHARD.parquet beside the folder SHARD/ of KEY.jpg files (its
`--output_format files`), one record per row, failed downloads included (their `status` says so; they become
`download_failed` rejects). A file not starting with parquet's magic bytes is read as jsonl of the same columns.
Rows stream in batches of ROW_BATCH over the columns used only; a parquet's own `jpg` column (img2dataset's
`--output_format parquet`) is used for the image when present.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Union

from data_tools.create_outputs import CreateDataError
from data_tools.filters import SCORE_KEYS, SIZE_KEYS

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's --encode_format values, in the order looked for
TEXT_EXTS = ("txt", "json")
FOLDER_SUFFIXES = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",)}
PARQUET_MAGIC = b"PAR1"
IMAGE_COLUMN = "jpg"  # img2dataset's --output_format parquet stores the image bytes here
ROW_BATCH = 256
_CHUNK = 1 << 16
# tarfile reports a damaged archive as TarError (ReadError: "unexpected end of data", a bad header checksum),
# EOFError or zlib.error (a damaged .tar.gz); an OSError is the disk's, not the data's, and stays fatal.
_TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error)


class TarSample(NamedTuple):
    """One webdataset sample: its members by lower-case extension (bytes, or the size of a member over its bound,
    never read), and `damage` when the tar broke while this sample was read (key '' when between samples)."""

    key: str
    members: Dict[str, Union[bytes, int]]
    damage: Optional[str] = None


def split_member_name(name: str) -> tuple:
    """(key, extension) of a tar member by webdataset's rule: the extension starts at the first '.' of the file
    name, the key is everything before it (its folder included)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int, keep: bool) -> Union[bytes, int, None]:
    """A member's bytes; its size when over `limit`; None when not `keep`. Always read to its end (a member not
    kept in chunks), so that damage shows at the same place whatever is kept."""
    f = tar.extractfile(member)
    if f is None:
        return None
    if keep and member.size <= limit:
        data = f.read(member.size)  # bounded by `limit`
        if len(data) < member.size:
            raise tarfile.ReadError("unexpected end of data")
        return data
    while f.read(_CHUNK):
        pass
    return member.size if keep else None


def iter_tar(path: str, want: Callable[[], bool], max_image_bytes: int,
             max_text_bytes: int) -> Iterator[Optional[TarSample]]:
    """The samples of one tar shard in order; None for a sample `want()` (asked as each sample starts, i.e. for
    the record to be yielded next) declines. See the module docstring for damage."""
    key: Optional[str] = None
    members: Dict[str, Union[bytes, int]] = {}
    exts: set = set()  # of the sample being read, kept or not: where a sample ends must not depend on want()
    keep = False
    try:
        # an OSError opening or reading the file is fatal (create_data names the file); tar damage is a record
        with open(path, "rb") as raw:
            try:
                with tarfile.open(fileobj=raw, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue  # folders, links: not part of any sample
                        k, ext = split_member_name(member.name)
                        if key is not None and (k != key or ext in exts):
                            yield TarSample(key, members) if keep else None
                            key = None
                        if key is None:
                            key, members, exts, keep = k, {}, set(), want()
                        exts.add(ext)
                        limit = max_image_bytes if ext in IMAGE_EXTS else max_text_bytes
                        value = _read_member(tar, member, limit, keep)
                        if value is not None:
                            members[ext] = value
            except _TAR_DAMAGE as e:
                if key is None:
                    key, members, keep = "", {}, want()
                yield TarSample(key, members, f"{type(e).__name__}: {e}") if keep else None
                return
        if key is not None:
            yield TarSample(key, members) if keep else None
    except OSError as e:
        raise CreateDataError(f"cannot read input file {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------- parquet
def is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CreateDataError("--input_format parquet reads .parquet files with pyarrow, which is not installed "
                              "(datasets, pinned in requirements.txt, depends on it): pip install pyarrow") from None
    return pq


def wanted_columns(caption_key: str) -> tuple:
    """The columns a record is made of; every other column (url, exif, ...) is never read."""
    scores = tuple(k for keys in SCORE_KEYS.values() for k in keys)
    return ("key", caption_key, "status", "error_message", IMAGE_COLUMN) + scores + SIZE_KEYS


def check_parquet_input(path: str, caption_key: str) -> None:
    """At start: a parquet metadata file must open and have a `key` column. Jsonl metadata is checked per line."""
    if not is_parquet(path):
        return
    pq = _pyarrow_parquet()
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...: each means unusable
        raise CreateDataError(f"cannot read parquet file {path}: {e}") from None
    if "key" not in names:
        raise CreateDataError(f"{path}: no 'key' column (img2dataset's image file name); it has {names[:12]}")


def iter_parquet(path: str, caption_key: str, want: Callable[[], bool]) -> Iterator[Union[dict, str, None]]:
    """The rows of one parquet file as dicts, in order; None for a row `want()` declines. Damage found while
    reading (a corrupt row group) ends the file: it is yielded as its message (a str), one record."""
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
        columns = [c for c in wanted_columns(caption_key) if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=ROW_BATCH, columns=columns):
            for row in batch.to_pylist():
                yield row if want() else None
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for damaged data have no common base but Exception
        if isinstance(e, OSError) and not type(e).__module__.startswith("pyarrow"):
            raise CreateDataError(f"cannot read input file {path}: {e.strerror or e}") from None
        yield f"{type(e).__name__}: {e}" if want() else None
