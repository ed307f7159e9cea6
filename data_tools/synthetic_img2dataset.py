"""A small synthetic dataset shaped like img2dataset's output, with known scores, for the tests and
bench/bench_ingest.py: the same records as webdataset tars (KEY.jpg, KEY.txt, KEY.json, SHARD.parquet beside each
tar), as `--output_format files` (SHARD.parquet + SHARD/KEY.jpg|.txt|.json) and as jsonl + image files.

    from data_tools.synthetic_img2dataset import synthetic_records, write_webdataset, expected_counts
    recs = synthetic_records(40)
    tars = write_webdataset(recs, "in", per_shard=16)
    written, rejects = expected_counts(recs, "webdataset", max_punsafe=0.3, dedup=True)

Every record is deterministic in (index, seed). Shapes cycle through SHAPES (square, 4:3, 3:4, 2:1, 1:3, a tiny
square); every `dup_every`-th record reuses the image of record i // 2 (equal bytes: a duplicate, often in
another shard); every `unscored_every`-th lacks its aesthetic score; every `failed_every`-th is a failed download
(in the parquet only, as img2dataset writes it; tars hold successes only). expected_counts() is the oracle the
tests and the benchmark check the tool against: it applies the documented rules to the records' known values,
written separately from the tool's code (data_tools/filters.py).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

SHAPES: Tuple[Tuple[int, int], ...] = ((64, 64), (80, 60), (60, 80), (96, 48), (40, 120), (24, 24))
AESTHETIC_COLUMN = "AESTHETIC_SCORE"  # LAION-Aesthetics' name for it


@dataclass(frozen=True)
class SyntheticRecord:
    key: str
    caption: str
    image_id: int  # records with one image_id have byte-equal images
    width: int
    height: int
    success: bool
    scores: Dict[str, float] = field(default_factory=dict)  # input column name -> value (absent: unscored)

    def metadata(self) -> dict:
        """The record's img2dataset metadata (the .json sidecar, the parquet row)."""
        meta = {"url": f"https://example.com/{self.key}.jpg", "key": self.key, "caption": self.caption,
                "status": "success" if self.success else "failed_to_download",
                "error_message": None if self.success else "HTTP Error 404: Not Found",
                "width": self.width if self.success else None, "height": self.height if self.success else None,
                "original_width": 2 * self.width if self.success else None,
                "original_height": 2 * self.height if self.success else None}
        meta.update(self.scores)
        return meta


def synthetic_records(n: int, seed: int = 0, per_shard: int = 16, scale: int = 1, dup_every: int = 6,
                      unscored_every: int = 7, failed_every: int = 13) -> List[SyntheticRecord]:
    """n records; keys as img2dataset names them (5-digit shard, 4-digit index in the shard); sizes x `scale`."""
    out: List[SyntheticRecord] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        dup = dup_every > 0 and i % dup_every == dup_every - 1
        image_id = out[i // 2].image_id if dup else i
        w, h = (out[i // 2].width, out[i // 2].height) if dup else tuple(s * scale for s in SHAPES[i % len(SHAPES)])
        scores = {"similarity": round(float(rng.uniform(0.15, 0.45)), 4),
                  "pwatermark": round(float(rng.uniform(0.0, 1.0)), 4),
                  "punsafe": round(float(rng.uniform(0.0, 0.6)), 4)}
        if not (unscored_every > 0 and i % unscored_every == unscored_every - 1):
            scores[AESTHETIC_COLUMN] = round(float(rng.uniform(3.0, 7.5)), 4)
        success = not (failed_every > 0 and i % failed_every == failed_every - 1)
        key = f"{i // per_shard:05d}{i % per_shard:04d}"
        out.append(SyntheticRecord(key, f"synthetic photo {i} of thing {image_id}", image_id, w, h, success, scores))
    return out


def image_bytes(rec: SyntheticRecord, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth colour fields plus grain) depending on (image_id, seed) only."""
    rng = np.random.default_rng([seed, 10_000_019, rec.image_id])
    low = rng.integers(30, 226, size=(max(1, rec.height // 8), max(1, rec.width // 8), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((rec.width, rec.height), Image.BICUBIC), np.int16)
    img = img + rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _shards(records: List[SyntheticRecord]) -> Dict[str, List[SyntheticRecord]]:
    shards: Dict[str, List[SyntheticRecord]] = {}
    for r in records:
        shards.setdefault(r.key[:5], []).append(r)
    return shards


def _write_parquet(path: str, records: List[SyntheticRecord]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.metadata() for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
    return path


def write_webdataset(records: List[SyntheticRecord], folder: str, seed: int = 0,
                     images: Optional[Dict[int, bytes]] = None) -> List[str]:
    """SHARD.tar per shard (successful records only, members KEY.jpg, KEY.txt, KEY.json in that order) and
    SHARD.parquet beside it (every record). Returns the tar paths, in order."""
    os.makedirs(folder, exist_ok=True)
    images = {} if images is None else images
    tars = []
    for shard, recs in _shards(records).items():
        path = os.path.join(folder, f"{shard}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in recs:
                if not r.success:
                    continue
                data = images.setdefault(r.image_id, image_bytes(r, seed))
                for ext, payload in (("jpg", data), ("txt", r.caption.encode()),
                                     ("json", json.dumps(r.metadata(), indent=4).encode())):
                    info = tarfile.TarInfo(f"{r.key}.{ext}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        _write_parquet(os.path.join(folder, f"{shard}.parquet"), recs)
        tars.append(path)
    return tars


def write_files(records: List[SyntheticRecord], folder: str, seed: int = 0,
                images: Optional[Dict[int, bytes]] = None) -> List[str]:
    """img2dataset's --output_format files: SHARD/KEY.jpg|.txt|.json and SHARD.parquet. Returns the parquets."""
    images = {} if images is None else images
    parquets = []
    for shard, recs in _shards(records).items():
        os.makedirs(os.path.join(folder, shard), exist_ok=True)
        for r in recs:
            if r.success:
                base = os.path.join(folder, shard, r.key)
                with open(base + ".jpg", "wb") as f:
                    f.write(images.setdefault(r.image_id, image_bytes(r, seed)))
                with open(base + ".txt", "w", encoding="utf-8") as f:
                    f.write(r.caption)
                with open(base + ".json", "w", encoding="utf-8") as f:
                    json.dump(r.metadata(), f, indent=4)
        parquets.append(_write_parquet(os.path.join(folder, f"{shard}.parquet"), recs))
    return parquets


def write_jsonl(records: List[SyntheticRecord], folder: str, seed: int = 0,
                images: Optional[Dict[int, bytes]] = None) -> str:
    """The successful records as this tool's own jsonl input ({caption, image, scores}) + image files."""
    images = {} if images is None else images
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            if not r.success:
                continue
            rel = os.path.join("img", f"{r.key}.jpg")
            with open(os.path.join(folder, rel), "wb") as img:
                img.write(images.setdefault(r.image_id, image_bytes(r, seed)))
            f.write(json.dumps({"caption": r.caption, "image": rel, "width": r.width, "height": r.height,
                                **r.scores}) + "\n")
    return path


def expected_counts(records: List[SyntheticRecord], input_format: str, min_image_size: int = 0,
                    max_aspect_ratio: Optional[float] = None, max_pwatermark: Optional[float] = None,
                    max_punsafe: Optional[float] = None, min_aesthetic: Optional[float] = None,
                    min_similarity: Optional[float] = None, dedup: bool = False) -> Tuple[int, Dict[str, int]]:
    """(records written, rejects by reason) the tool must report for `records` in `input_format`, by the rules
    README states: failed downloads (parquet only: tars and jsonl hold successes), then the score filters in
    flag order (a missing score is unscored_<score>), then the image (too small, aspect ratio), then duplicates
    (equal image to an earlier record that passed the checks before the image)."""
    rejects: Counter = Counter()
    seen = set()
    written = 0
    for r in records:
        if not r.success:
            if input_format == "parquet":
                rejects["download_failed"] += 1
            continue
        reason = None
        aesthetic = r.scores.get(AESTHETIC_COLUMN)
        for limit, value, name, too_high, bad in (
                (max_pwatermark, r.scores.get("pwatermark"), "pwatermark", True, "pwatermark_too_high"),
                (max_punsafe, r.scores.get("punsafe"), "punsafe", True, "punsafe_too_high"),
                (min_aesthetic, aesthetic, "aesthetic", False, "aesthetic_too_low"),
                (min_similarity, r.scores.get("similarity"), "similarity", False, "similarity_too_low")):
            if limit is None:
                continue
            if value is None:
                reason = f"unscored_{name}"
            elif (value > limit) if too_high else (value < limit):
                reason = bad
            if reason:
                break
        if reason is None:
            first = r.image_id not in seen
            seen.add(r.image_id)
            if min(r.width, r.height) < min_image_size:
                reason = "too_small"
            elif max_aspect_ratio is not None and max(r.width, r.height) / min(r.width, r.height) > max_aspect_ratio:
                reason = "aspect_ratio_too_large"
            elif dedup and not first:
                reason = "duplicate_image"
        if reason:
            rejects[reason] += 1
        else:
            written += 1
    return written, dict(sorted(rejects.items()))
