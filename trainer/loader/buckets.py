"""Aspect-ratio buckets: which output sizes exist, which one an image goes to, and its minimal crop.

Pure functions of integers, shared by the loader (trainer/loader/transforms.py, sample_stream.py), the data tool
(per-bucket counts in a manifest) and inspect_data.py, so a bucket means the same thing everywhere.

A bucket set is given (`--aspect_ratio_buckets`) either as a target side N, meaning the pixel area N x N, or as an
explicit list "512x512,576x448,...". For a target side the default list is: every width W that is a multiple of
`step` paired with the largest multiple-of-`step` height H with W * H <= N * N, kept when its aspect ratio lies in
[1:2, 2:1], and the same with the roles of width and height swapped (so the list holds each bucket's transpose).
With step 64 (Stable Diffusion 1.x/2.x: the VAE downsamples by 8 and the UNet by 2^3 more, so a side that is a
multiple of 64 gives latents every UNet level halves exactly) that is

    N=256: 192x320, 256x256, 320x192                                   (aspect 0.6 .. 1.67)
    N=512: 384x640, 448x576, 512x512, 576x448, 640x384                 (aspect 0.6 .. 1.67)

A 2:1 bucket does not fit under those areas in steps of 64 (384x192 is 73,728 px > 256^2), so wider images go
to the widest bucket and lose the rest to the crop; a finer `step` gives more buckets (and latents that the
UNet's downsamplings do not halve exactly, which ppdiffusers' UNet handles by forwarding its upsample sizes). This is the rule of NovelAI's and kohya sd-scripts' bucketing (largest height under the area for each
width), limited to 1:2 .. 2:1.

An image of upright size (w, h) goes to the bucket nearest in log aspect ratio, i.e. the bucket minimising
max(w*bh, h*bw) / min(w*bh, h*bw), compared exactly as fractions; ties go to the larger area, then to the
narrower bucket. It is resized to cover the bucket (scale max(bw/w, bh/h), each side rounded, never below the
bucket's) and cropped to the bucket: the minimal crop, along one axis only. With one square bucket R x R this
is exactly the square path (shorter side to R, crop R x R), arithmetic included.
"""
from __future__ import annotations

from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Bucket", "DEFAULT_STEP", "MAX_ASPECT", "bucket_set", "default_buckets", "parse_bucket_list",
           "bucket_name", "nearest_bucket", "cover_size", "crop_offsets", "center_offsets", "crop_box_for"]

Bucket = Tuple[int, int]  # (width, height) in pixels
DEFAULT_STEP = 64  # SD 1.x/2.x: VAE factor 8 x UNet downsampling 2^3
MAX_ASPECT = 2  # default lists span 1:2 .. 2:1
MAX_BUCKETS = 64  # a list longer than this is a typo (or a step of 8 at 1024): every bucket holds a pending batch


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def default_buckets(side: int, step: int = DEFAULT_STEP, max_aspect: int = MAX_ASPECT) -> List[Bucket]:
    """The default list for the area side x side (module docstring), sorted by aspect ratio w/h ascending."""
    if step < 1 or side < step or side % step:
        raise ValueError(f"bucket target side {side} must be a positive multiple of the bucket step {step}")
    area = side * side
    out = set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(w, h) <= max_aspect * min(w, h):
            out |= {(w, h), (h, w)}  # both orientations: the rule run over heights too, so the list is symmetric
    return sorted(out, key=lambda b: (Fraction(b[0], b[1]), b[0]))


def parse_bucket_list(text: str, multiple: int = 8) -> List[Bucket]:
    """"WxH,WxH,..." -> buckets in the order given; each side a positive multiple of `multiple`, no duplicates."""
    out: List[Bucket] = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bucket {item.strip()!r} is not WIDTHxHEIGHT (e.g. 576x448)")
        w, h = int(parts[0]), int(parts[1])
        if w < multiple or h < multiple or w % multiple or h % multiple:
            raise ValueError(f"bucket {w}x{h}: both sides must be positive multiples of {multiple}")
        if (w, h) in out:
            raise ValueError(f"bucket {w}x{h} is listed twice")
        out.append((w, h))
    return out


def bucket_set(spec: str, step: int = DEFAULT_STEP) -> List[Bucket]:
    """The buckets of `spec`: a target side ("512": default_buckets(512, step)) or an explicit list
    ("512x512,576x448"). ValueError naming the problem otherwise."""
    text = str(spec).strip()
    if not text:
        raise ValueError("empty bucket spec: give a target side (e.g. 512) or a list (e.g. 512x512,576x448)")
    buckets = default_buckets(int(text), step) if text.isdigit() else parse_bucket_list(text)
    if len(buckets) > MAX_BUCKETS:
        raise ValueError(f"bucket spec {text!r} gives {len(buckets)} buckets, more than {MAX_BUCKETS}")
    return buckets


def _distance(width: int, height: int, bucket: Bucket) -> Fraction:
    """exp(|log(w/h) - log(bw/bh)|) as an exact fraction (>= 1)."""
    a, b = width * bucket[1], height * bucket[0]
    return Fraction(max(a, b), min(a, b))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest to an image of size (width, height) in log aspect ratio; ties: larger area, then the
    smaller width. Independent of the list's order."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}")
    if not buckets:
        raise ValueError("no buckets")
    return min(buckets, key=lambda b: (_distance(width, height, b), -b[0] * b[1], b[0]))


def cover_size(width: int, height: int, bw: int, bh: int) -> Tuple[int, int]:
    """The size of (width, height) resized to cover a bw x bh bucket: scale max(bw/w, bh/h), each side rounded and
    never below the bucket's. For a square bucket R x R it is the shorter side resized to R."""
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def crop_offsets(width: int, height: int, bw: int, bh: int, rng: np.random.Generator) -> Tuple[int, int]:
    """A uniform (left, top) of the bucket inside the covering size: two integer draws from `rng`, always both
    (one is always 0), so the number of draws never depends on the image."""
    rw, rh = cover_size(width, height, bw, bh)
    return int(rng.integers(rw - bw + 1)), int(rng.integers(rh - bh + 1))


def center_offsets(width: int, height: int, bw: int, bh: int) -> Tuple[int, int]:
    rw, rh = cover_size(width, height, bw, bh)
    return int(round((rw - bw) / 2.0)), int(round((rh - bh) / 2.0))


def crop_box_for(width: int, height: int, bw: int, bh: int, offset: Optional[Tuple[int, int]] = None,
                 decoded: Optional[Tuple[int, int]] = None) -> Tuple[float, float, float, float]:
    """The bucket's crop (x0, y0, x1, y1) in the pixels of the image as decoded (`decoded`: its size after a JPEG
    draft; default (width, height)), for the crop at `offset` (left, top) in covering-size pixels (None: centred).
    Resampling that box straight to bw x bh is the resize-then-crop in one step."""
    rw, rh = cover_size(width, height, bw, bh)
    left, top = center_offsets(width, height, bw, bh) if offset is None else offset
    if not (0 <= left <= rw - bw and 0 <= top <= rh - bh):
        raise ValueError(f"offset {(left, top)} puts the {bw}x{bh} crop outside the {rw}x{rh} covering size")
    dw, dh = decoded or (width, height)
    sx, sy = dw / rw, dh / rh
    # min(): (left + bw) * dw / rw may land an ulp past dw.
    return left * sx, top * sy, min(dw, (left + bw) * sx), min(dh, (top + bh) * sy)
