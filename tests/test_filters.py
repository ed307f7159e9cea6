"""data_tools/filters.py: the score and aspect-ratio filters, the part metadata, the bounded dedup index; and
part_format's metadata field (encode_meta / decode_meta)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from data_tools import filters as F
from data_tools import part_format as pf
from data_tools.part_format import RecordError

pytestmark = pytest.mark.unit


def test_record_metadata_reads_laion_columns():
    scores, has = F.record_metadata({"caption": "c", "image": "a.jpg"})
    assert (scores, has) == ({}, False)  # a plain jsonl record: the part keeps NONE
    row = {"similarity": 0.31, "pwatermark": 0.1, "punsafe": 0, "AESTHETIC_SCORE": 5.5, "width": 640,
           "height": 480, "original_width": 1280, "original_height": None, "url": "http://x"}
    scores, has = F.record_metadata(row)
    assert has and scores == {"similarity": 0.31, "pwatermark": 0.1, "punsafe": 0.0, "aesthetic": 5.5,
                              "original_width": 1280.0}
    assert F.record_metadata({"aesthetic": 6.0, "AESTHETIC_SCORE": 1.0})[0] == {"aesthetic": 6.0}  # first alias
    assert F.record_metadata({"punsafe": float("nan")}) == ({}, True)  # NaN: unscored, as null
    assert F.record_metadata({"width": None}) == ({}, True)
    for bad in ("0.3", True, [0.3], float("inf")):
        with pytest.raises(RecordError) as e:
            F.record_metadata({"similarity": bad})
        assert e.value.reason == F.BAD_SCORE


def test_score_reject_bounds_order_and_unscored():
    scores = {"pwatermark": 0.5, "punsafe": 0.2, "aesthetic": 5.0, "similarity": 0.3}
    off = {"max_pwatermark": None, "max_punsafe": None, "min_aesthetic": None, "min_similarity": None}
    assert F.score_reject(scores, off) is None
    assert F.score_reject(scores, dict(off, max_pwatermark=0.5, min_aesthetic=5.0, min_similarity=0.3)) is None
    assert F.score_reject(scores, dict(off, max_pwatermark=0.49))[0] == F.PWATERMARK
    assert F.score_reject(scores, dict(off, max_punsafe=0.1))[0] == F.PUNSAFE
    assert F.score_reject(scores, dict(off, min_aesthetic=5.01))[0] == F.AESTHETIC
    reason, detail = F.score_reject(scores, dict(off, min_similarity=0.31))
    assert reason == F.SIMILARITY and "--min_similarity 0.31" in detail
    # flag order decides which reason a record failing several gets
    assert F.score_reject(scores, dict(off, max_punsafe=0.1, max_pwatermark=0.1))[0] == F.PWATERMARK
    reason, detail = F.score_reject({}, dict(off, min_aesthetic=4.0))
    assert reason == "unscored_aesthetic" and "--min_aesthetic" in detail
    assert {F.UNSCORED + s for s in F.SCORE_KEYS} <= set(F.REASONS)


def test_aspect_ratio():
    assert F.aspect_ratio(64, 64) == 1.0 and F.aspect_ratio(96, 48) == F.aspect_ratio(48, 96) == 2.0
    assert F.aspect_reject(96, 48, None) is None and F.aspect_reject(96, 48, 2.0) is None
    reason, detail = F.aspect_reject(40, 120, 2.5)
    assert reason == F.ASPECT_RATIO and "40x120" in detail


def test_part_metadata_and_its_field():
    meta = F.part_metadata({"aesthetic": 5.123456789, "similarity": 0.30000001192092896, "original_width": 1280.0},
                           640, 480)
    assert meta == {"w": 640, "h": 480, "similarity": 0.3, "aesthetic": 5.12346, "original_width": 1280}
    field = pf.encode_meta(meta)
    assert field == b'{"w":640,"h":480,"similarity":0.3,"aesthetic":5.12346,"original_width":1280}'
    line = pf.encode_record("a cat", b"\x89PNG", meta)
    assert line.count(b"\t") == 2 and line.endswith(b"\n")
    assert pf.parse_record(line, "laion400m") == ("a cat", b"\x89PNG")  # the loader's parse ignores the field
    assert pf.record_meta(line) == meta
    assert pf.record_meta(pf.encode_record("a cat", b"x")) is None  # NONE
    for bad in (b"{broken", b"[1,2]", b"\xff{", b"{" * 100000, b""):
        assert pf.decode_meta(bad) is None  # never an error: the field is informative
    assert pf.encode_meta({"caption": "tab\there\nnl"}).count(b"\t") == 0  # JSON escapes control characters
    with pytest.raises(ValueError):
        pf.encode_meta({"x": math.nan})


def test_digest_index_is_a_bounded_set():
    index = F.DigestIndex(max_images=1000)
    index.BUFFER = 8  # many flushes and merges on a small input
    rng = np.random.default_rng(0)
    pool = [F.image_digest(os.urandom(8)) for _ in range(300)]
    reference = set()
    for k in rng.integers(0, len(pool), 900):
        d = pool[k]
        assert index.check_and_add(d) == (d in reference)
        reference.add(d)
    assert len(index) == len(reference)
    assert all(d in index for d in pool if d in reference)
    assert not any(d in index for d in pool if d not in reference)
    assert len(index._levels) <= 1 + math.ceil(math.log2(len(reference) / 8))  # log levels, not one per flush
    assert index.nbytes() == 16 * (len(reference) - len(index._buf))  # 16 bytes per digest held
    # two digests sharing their first 8 bytes are still told apart
    a, b = b"\x01" * 8 + b"\x02" * 8, b"\x01" * 8 + b"\x03" * 8
    small = F.DigestIndex(10)
    small.BUFFER = 1
    assert small.check_and_add(a) is False and b not in small and small.check_and_add(b) is False
    assert small.check_and_add(a) is True
    with pytest.raises(ValueError):
        small.check_and_add(b"short")


def test_digest_index_limit():
    index = F.DigestIndex(max_images=2)
    index.check_and_add(F.image_digest(b"a"))
    index.check_and_add(F.image_digest(b"b"))
    assert index.check_and_add(F.image_digest(b"a")) is True  # a repeat is not a new entry
    with pytest.raises(F.DigestIndexFull, match="--dedup_max_images 2"):
        index.check_and_add(F.image_digest(b"c"))
