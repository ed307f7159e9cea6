"""The quality filters of create_pretraining_data.py as small pure functions, and the bounded exact-duplicate index.

Scores: img2dataset copies LAION's columns into its metadata (parquet columns, the `.json` beside each image):
`similarity` (CLIP image-text cosine), `pwatermark`, `punsafe` (probabilities) and an aesthetic score (named
`AESTHETIC_SCORE` in LAION-Aesthetics, `aesthetic` elsewhere). record_metadata() reads them, and the sizes, from one
record's metadata; score_reject() applies the --max_*/--min_* thresholds.

A record lacking a score whose filter is on is rejected as `unscored_<score>`: a LAION user who asks for
punsafe <= 0.1 wants images known to be safe, and an image nobody scored is not known to be; the count per score
is in the manifest (rejects_by_reason), so a metadata file missing a column shows at once.

Exact duplicates (--dedup): two records are duplicates when their image bytes are equal; the first in global record
order (input files in order, records in file order) among those that pass every check is kept. Precisely: record i
is a `duplicate_image` reject when it passes every other check and an earlier record with the same image bytes
passed every check made before decoding (caption, scores, the image's presence and size in bytes). That needs no
decode of the earlier record: the checks made at decode time (the image decodes, its size, its aspect ratio) depend
on the bytes alone, so equal bytes get the same verdict, and if the earlier copy failed them, i fails them too. So
the main process (create_data._pump) keeps the digest of every record that passed the pre-decode checks, in record
order, and every run computes the same sequence of digests: a shard gets those of the other shards' blocks, and a
resumed run those of its finished blocks, from the workers hashing without decoding (ingest.process_item). The index
before each record, and so every verdict, is the unsharded run's, and the shards merged equal it. The price: with
--dedup every shard reads and hashes every record's image (sha256 ~1.2 GB/s a core, small next to decoding) and
holds the digests of all: 16 bytes per distinct image (DigestIndex), up to --dedup_max_images, beyond which the run
stops with an error (rerun with a larger limit and --resume: the finished blocks stay). A 16-byte prefix of sha256
makes a false duplicate a 128-bit collision: about n^2 / 2^129, nil for any real n.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from data_tools.part_format import RecordError

# Reject reasons of the filters (data_tools/image_check.REASONS holds the others).
ASPECT_RATIO = "aspect_ratio_too_large"
PWATERMARK = "pwatermark_too_high"
PUNSAFE = "punsafe_too_high"
AESTHETIC = "aesthetic_too_low"
SIMILARITY = "similarity_too_low"
DUPLICATE = "duplicate_image"
BAD_SCORE = "bad_score"
UNSCORED = "unscored_"  # + the score's name: unscored_pwatermark, ...

# canonical name -> the metadata keys it is read from, first present wins
SCORE_KEYS: Dict[str, Tuple[str, ...]] = {
    "similarity": ("similarity",),
    "pwatermark": ("pwatermark",),
    "punsafe": ("punsafe",),
    "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
}
# img2dataset's sizes: width/height of the saved image, original_* of the downloaded one. Carried (original_*) or
# only noticed (width/height: the part gets the decoded size instead), never filtered on.
SIZE_KEYS = ("width", "height", "original_width", "original_height")
CARRIED_SIZES = ("original_width", "original_height")

# (flag, score, bound): "max" rejects score > value, "min" rejects score < value. The order is the check order.
SCORE_FILTERS: Tuple[Tuple[str, str, str, str], ...] = (
    ("max_pwatermark", "pwatermark", "max", PWATERMARK),
    ("max_punsafe", "punsafe", "max", PUNSAFE),
    ("min_aesthetic", "aesthetic", "min", AESTHETIC),
    ("min_similarity", "similarity", "min", SIMILARITY),
)
REASONS = (ASPECT_RATIO, PWATERMARK, PUNSAFE, AESTHETIC, SIMILARITY, DUPLICATE, BAD_SCORE) + tuple(
    UNSCORED + s for s in SCORE_KEYS)

DIGEST_BYTES = 16


def _number(key: str, value: object) -> Optional[float]:
    """A metadata value as a float; None when absent (JSON null, parquet null, NaN). Anything else that is not a
    real number is a bad_score reject: a string where a score should be is a broken metadata file, not a 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(BAD_SCORE, f"{key!r} is a {type(value).__name__} ({str(value)[:40]!r}), not a number")
    v = float(value)
    if math.isnan(v):
        return None
    if math.isinf(v):
        raise RecordError(BAD_SCORE, f"{key!r} is {v}")
    return v


def record_metadata(obj: Mapping[str, object]) -> Tuple[Dict[str, float], bool]:
    """(scores by canonical name, whether the record carries any score or size key at all). The second decides
    whether the part line's second field is JSON or the reference's NONE (create_data.py)."""
    scores: Dict[str, float] = {}
    seen = False
    for name, keys in SCORE_KEYS.items():
        for key in keys:
            if key in obj:
                seen = True
                v = _number(key, obj[key])
                if v is not None:
                    scores[name] = v
                    break
    for key in SIZE_KEYS:
        if key in obj:
            seen = True
            v = _number(key, obj[key])
            if v is not None and key in CARRIED_SIZES:
                scores[key] = v
    return scores, seen


def score_reject(scores: Mapping[str, float], limits: Mapping[str, Optional[float]]) -> Optional[Tuple[str, str]]:
    """(reason, detail) of the first score filter the record fails, or None. `limits`: flag name -> threshold
    (None: that filter is off)."""
    for flag, score, bound, reason in SCORE_FILTERS:
        limit = limits.get(flag)
        if limit is None:
            continue
        if score not in scores:
            return UNSCORED + score, f"no {score} score and --{flag} {limit} is set"
        v = scores[score]
        if (v > limit) if bound == "max" else (v < limit):
            return reason, f"{score} {v:g} {'>' if bound == 'max' else '<'} --{flag} {limit:g}"
    return None


def aspect_ratio(width: int, height: int) -> float:
    """Longer side over shorter side: 1 for a square, the same for an image and its 90-degree rotation."""
    return max(width, height) / max(1, min(width, height))


def aspect_reject(width: int, height: int, max_ratio: Optional[float]) -> Optional[Tuple[str, str]]:
    if max_ratio is None or aspect_ratio(width, height) <= max_ratio:
        return None
    return ASPECT_RATIO, (f"{width}x{height}: aspect ratio {aspect_ratio(width, height):.3g} > --max_aspect_ratio "
                          f"{max_ratio:g}")


def part_metadata(scores: Mapping[str, float], width: int, height: int) -> Dict[str, object]:
    """What travels in the part line's second field: the stored image's size first, then the scores. Floats are
    rounded to 6 significant digits (LAION's scores are float32, so nothing real is lost) to keep lines short;
    filters compare the unrounded values."""
    out: Dict[str, object] = {"w": int(width), "h": int(height)}
    for name in list(SCORE_KEYS) + list(CARRIED_SIZES):
        if name in scores:
            v = scores[name]
            out[name] = int(v) if name in CARRIED_SIZES and v.is_integer() else float(f"{v:.6g}")
    return out


def image_digest(data: bytes) -> bytes:
    """The dedup key of an image: the first DIGEST_BYTES of the sha256 of its bytes as stored in the input."""
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


# ----------------------------------------------------------------------------------------------- dedup index
class DigestIndexFull(Exception):
    """More distinct images than --dedup_max_images: the run stops (create_data turns it into its error)."""


class DigestIndex:
    """A set of 16-byte digests in 16 bytes each (plus a small buffer), with a hard size limit.

    A Python set of bytes costs ~100 bytes an entry; this keeps the digests as two uint64 arrays (the first and
    the second 8 bytes) per sorted level, merged like a binary counter (a level merges into the one before it
    when that one is not larger than twice it), so there are at most ~log2(n / BUFFER) levels and a lookup is one
    searchsorted per level. The newest BUFFER digests sit in a set. Merging the largest level briefly needs
    ~2.5x its 16 bytes per entry (the concatenation, the sort order and the reordered copy)."""

    BUFFER = 1 << 16

    def __init__(self, max_images: int):
        self.max_images = max_images
        self._buf: set = set()
        self._levels: List[Tuple[np.ndarray, np.ndarray]] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def nbytes(self) -> int:
        """Bytes held by the sorted levels (the buffer adds at most BUFFER Python bytes objects)."""
        return sum(hi.nbytes + lo.nbytes for hi, lo in self._levels)

    def __contains__(self, digest: bytes) -> bool:
        if digest in self._buf:
            return True
        hi, lo = np.frombuffer(digest, "<u8", 2)
        for his, los in self._levels:
            i = int(his.searchsorted(hi))
            while i < len(his) and his[i] == hi:
                if los[i] == lo:
                    return True
                i += 1
        return False

    def check_and_add(self, digest: bytes) -> bool:
        """True when `digest` was already held; else add it and return False. Raises DigestIndexFull when adding
        would exceed max_images."""
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a digest has {DIGEST_BYTES} bytes, got {len(digest)}")
        if digest in self:
            return True
        if self._n >= self.max_images:
            raise DigestIndexFull(f"the --dedup index holds --dedup_max_images {self.max_images} distinct images "
                                  f"({DIGEST_BYTES} bytes each) and another one arrived")
        self._buf.add(digest)
        self._n += 1
        if len(self._buf) >= self.BUFFER:
            self._flush()
        return False

    def _flush(self) -> None:
        pairs = np.frombuffer(b"".join(self._buf), "<u8").reshape(-1, 2)
        self._buf = set()
        self._levels.append(_sorted_level(pairs[:, 0], pairs[:, 1]))
        while len(self._levels) >= 2 and len(self._levels[-2][0]) <= 2 * len(self._levels[-1][0]):
            (h2, l2), (h1, l1) = self._levels.pop(), self._levels.pop()
            self._levels.append(_sorted_level(np.concatenate([h1, h2]), np.concatenate([l1, l2])))


def _sorted_level(hi: np.ndarray, lo: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    order = np.argsort(hi, kind="stable")  # uint64 radix sort: ~8x faster than sorting (hi, lo) records
    return hi[order], lo[order]
