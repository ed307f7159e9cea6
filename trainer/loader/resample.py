"""Crop-and-resize as two blocked matrix products, in float32, straight into the normalised CHW batch slot.

Pillow resamples in 8-bit fixed point with a scalar loop, and its lanczos on the crop box was the largest cost
of a sample (1.9 ms of 4.2 at 256 px). The same separable filter is a banded matrix per axis: output row y is
sum_i Wy[y, i] * row i, output column x is sum_i Wx[x, i] * column i. Cut each band matrix into blocks of
consecutive outputs; each block only needs a window of consecutive inputs, so one batched BLAS call per axis
computes the crop with a few times the multiply-adds of the band itself, at BLAS speed instead of
scalar speed.

The coefficients are Pillow's (`precompute_coeffs` in libImaging/Resample.c): the same filters, support
scaled by the downscale factor (antialiasing), centres at `box0 + (x + 0.5) * scale`, taps outside the image
dropped and the rest renormalised. Nearest is Pillow's too (input `floor(box0 + (x + 0.5) * scale)`, no
antialiasing). What differs is rounding: no 8-bit intermediate between the passes and no 8-bit output, so
the result is the exact filter in float32 (measured against Pillow: mean |diff| ~0.3/255, larger only where
Pillow clipped a ringing overshoot between its passes). The output is clipped to the normalised range.

Pure functions of their inputs; the tests compare them with Pillow and with a dense float64 reference.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import ContextManager, Optional, Tuple, Union

import numpy as np
from numpy.lib.stride_tricks import as_strided
from PIL import Image
from threadpoolctl import ThreadpoolController


# (pid, number of imported modules, controller), made on first use
_controller: Optional[Tuple[int, int, ThreadpoolController]] = None


def single_thread_blas() -> ContextManager:
    """Context: BLAS on one thread while it is active. The products here are small and run in every loader
    worker; numpy's OpenBLAS would otherwise start one thread per core in each worker (96 threads in each
    of 64 workers on a big node), and paddle's OMP_NUM_THREADS default does not reach it. Costs ~17 us.
    The controller knows the BLAS libraries loaded when it was made: it is made again in a new process and
    after an import (one may load another BLAS, as paddlenlp's scipy does); finding them takes ~5 ms."""
    global _controller
    key = (os.getpid(), len(sys.modules))
    if _controller is None or _controller[:2] != key:
        _controller = (*key, ThreadpoolController())
    return _controller[2].limit(limits=1, user_api="blas")


def _lanczos(x: np.ndarray) -> np.ndarray:
    """sinc(x) * sinc(x / 3) on (-3, 3), 0 outside, as Pillow's lanczos_filter; in float32, where numpy's sin
    is SIMD (13x faster than float64)."""
    px = x.astype(np.float32)
    px *= np.float32(np.pi)
    px[px == 0] = np.float32(1e-30)  # sin(e) / e = 1 exactly in float32: the limit at 0
    y = np.sin(px)
    y /= px
    px /= np.float32(3.0)
    y *= np.sin(px)
    y /= px
    y *= np.abs(x) < 3.0
    return y


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic with a = -0.5, as Pillow's bicubic_filter."""
    a, x = -0.5, np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0)).astype(np.float32)


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0).astype(np.float32)


def _box(x: np.ndarray) -> np.ndarray:
    """1 on (-0.5, 0.5], as Pillow's box_filter (the half-open interval decides ties at exact half pixels)."""
    return ((x > -0.5) & (x <= 0.5)).astype(np.float32)


_F054, _F046 = float(np.float32(0.54)), float(np.float32(0.46))


def _hamming(x: np.ndarray) -> np.ndarray:
    """sinc(x) windowed by 0.54 + 0.46 cos(pi x) on (-1, 1), as Pillow's hamming_filter: in float64 as there, with
    its window constants as the C float literals 0.54f and 0.46f they are."""
    x = np.abs(x)
    px = np.pi * np.where(x == 0.0, 1.0, x)
    y = np.where(x == 0.0, 1.0, np.sin(px) / px * (_F054 + _F046 * np.cos(px)))
    return np.where(x >= 1.0, 0.0, y).astype(np.float32)


# The Pillow filter each name reproduces (for comparisons: tests/test_resample.py, bench/bench_resample.py).
PILLOW_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
                  "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}

# name -> (filter, support in input pixels at scale 1, antialias when downscaling): Pillow's table (Resample.c).
# Every name paddle.vision.transforms.Resize accepts with its PIL backend.
FILTERS = {
    "lanczos": (_lanczos, 3.0, True),
    "bicubic": (_bicubic, 2.0, True),
    "bilinear": (_bilinear, 1.0, True),
    "nearest": (None, 0.5, False),  # no filter: the one pixel under the centre
    "box": (_box, 0.5, True),
    "hamming": (_hamming, 1.0, True),
}

# Each axis is cut into BLOCKS blocks of at least MIN_BLOCK outputs. Smaller blocks waste fewer multiply-adds on
# zero weights, larger ones keep BLAS efficient and re-read less of the overlapping input windows. Measured with
# `bench/bench_resample.py --blocks ...` (README): 16 outputs a block was best at 128 and 256 px, 24 at 384,
# 32 at 512, i.e. 16 blocks an axis.
BLOCKS = 16
MIN_BLOCK = 16
# The vertical pass converts its input to float32 in stripes of at most this many bytes: a drafted JPEG's box is
# one stripe (2.5 MB at 256 px, 10 MB at 512), while an 89-megapixel PNG (Pillow's bomb limit) would otherwise
# need a 1 GB float copy in every worker that meets one.
STRIPE_BYTES = 16 << 20


def num_blocks(out_size: int, target: int = 0) -> int:
    """The most blocks of >= `target` outputs (default: max(MIN_BLOCK, out_size / BLOCKS)) that divide
    out_size evenly (1 when none do)."""
    target = target or max(MIN_BLOCK, out_size // BLOCKS)
    for b in range(max(1, out_size // target), 0, -1):
        if out_size % b == 0:
            return b
    return 1


@dataclass(frozen=True)
class AxisPlan:
    """One axis of the resample: block j reads inputs [start + j * stride, start + j * stride + window)
    and computes outputs [j * n, (j + 1) * n) (n = out_size / blocks) with weights[j] (window x n)."""

    start: int
    stride: int
    window: int
    weights: np.ndarray  # float32 (blocks, window, n)

    @property
    def span(self) -> int:
        """Inputs covered by all blocks, from `start` (may run past the image: those weights are zero)."""
        return (self.weights.shape[0] - 1) * self.stride + self.window


@functools.lru_cache(maxsize=64)  # a few sizes per bucket of the largest bucket lists
def _layout(out_size: int, blocks: int, ksize: int) -> Tuple[np.ndarray, ...]:
    """Index arrays that depend only on the output size and the blocking (read-only: they are shared)."""
    n = out_size // blocks
    arrays = (np.arange(out_size) + 0.5, np.arange(ksize), *np.divmod(np.arange(out_size), n),
              np.arange(blocks), np.arange(1, max(blocks, 2)))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def axis_plan(in_size: int, b0: float, b1: float, out_size: int, kind: str, blocks: int) -> AxisPlan:
    """Weights resampling input positions [b0, b1) of an axis of `in_size` pixels to `out_size` outputs, in
    `blocks` blocks (which must divide out_size)."""
    flt, support, antialias = FILTERS[kind]
    # Pillow takes the box as C floats: round it the same way, so the centres and the scale are Pillow's.
    f0, f1 = np.float32(b0), np.float32(b1)
    b0, scale = float(f0), float(f1 - f0) / out_size
    fscale = max(scale, 1.0) if antialias else 1.0
    support *= fscale
    n = out_size // blocks
    half, ks, block_of, local, block_idx, one_up = _layout(out_size, blocks, int(np.ceil(support)) * 2 + 1)
    if antialias:
        center = b0 + half * scale
        # Taps [xmin, xmax) as Pillow's precompute_coeffs, clamped to the image; (int) truncation in C is
        # floor here, as the value is clamped to >= 0 first.
        xmin = np.maximum(center - (support - 0.5), 0.0).astype(np.int64)
    else:  # Pillow's nearest accumulates the position output by output and takes COORD(centre): so do we
        center = np.cumsum(np.r_[b0 + 0.5 * scale, np.full(out_size - 1, scale)])
        xmin = center.astype(np.int64)
    np.minimum(xmin, in_size - 1, out=xmin)
    xmax = np.minimum(center + (support + 0.5), in_size).astype(np.int64)
    taps = xmin[:, None] + ks  # (out, ksize)
    valid = taps < xmax[:, None]
    if antialias:
        w = flt((taps - (center - 0.5)[:, None]) * (1.0 / fscale))
        w *= valid
        w /= w.sum(axis=1, keepdims=True)
    else:  # nearest: the pixel int(centre), exactly, rather than a filter evaluated at a rounded offset
        w = (taps == xmin[:, None]).astype(np.float32)
    # Block j starts at start + j * stride, at or before its first output's first tap, and spans to its
    # last output's last tap.
    start = int(xmin[0])
    stride = int(((xmin[n::n] - start) // one_up).min()) if blocks > 1 else 1
    if stride < 1:  # heavy upscaling: blocks would share their first input; one dense block instead
        return axis_plan(in_size, b0, b1, out_size, kind, blocks=1)
    window = int((xmax[n - 1::n] - (start + stride * block_idx)).max())
    # weights[j, tap - start_j, o % n] = w for output o in block j; invalid taps land on a spare last slot.
    size = blocks * window * n
    flat = taps * n + ((block_of * (window - stride) - start) * n + local)[:, None]
    weights = np.zeros(size + 1, np.float32)
    weights[np.where(valid, flat, size)] = w
    return AxisPlan(start, stride, window, weights[:size].reshape(blocks, window, n))


def _blocked(x: np.ndarray, plan: AxisPlan, axis: int) -> np.ndarray:
    """Read-only view of 2-D `x` as (blocks, window, other axis) for axis 0, (blocks, other axis, window)
    for axis 1: block j is x's slice [start_j, start_j + window) along `axis`, relative to x's own first
    index (x begins at plan.start). No copy. x spans exactly plan.span along `axis`, and the last block ends
    there, so the view stays inside x's buffer (checked)."""
    if x.shape[axis] != plan.span or not x.flags.c_contiguous:
        raise ValueError(f"expected a contiguous array spanning {plan.span} along axis {axis}, got {x.shape}")
    blocks = plan.weights.shape[0]
    s0, s1 = x.strides
    if axis == 0:
        shape, strides = (blocks, plan.window, x.shape[1]), (plan.stride * s0, s0, s1)
    else:
        shape, strides = (blocks, x.shape[0], plan.window), (plan.stride * s1, s0, s1)
    return as_strided(x, shape, strides, writeable=False)


def resample_crop(img: Image.Image, box: Tuple[float, float, float, float], size: Union[int, Tuple[int, int]],
                  kind: str, flip: bool = False, out: Optional[np.ndarray] = None,
                  normalize: Tuple[float, float] = (1.0 / 127.5, -1.0), block: int = 0,
                  stripe_bytes: int = STRIPE_BYTES) -> np.ndarray:
    """The resample of `box` (x0, y0, x1, y1, in pixels of the RGB `img`) to `size` (a side: size x size, or
    (width, height): an aspect-ratio bucket), mirrored when `flip`, as float32 [3, height, width] with value =
    pixel * normalize[0] + normalize[1], clipped to the range of pixels 0..255; written into `out` when given.
    `block`: outputs per block (0: see num_blocks, per axis); `stripe_bytes`: the most float32 input converted
    at once."""
    ow, oh = (size, size) if not isinstance(size, (tuple, list)) else (int(size[0]), int(size[1]))
    w, h = img.size
    if img.mode != "RGB":
        raise ValueError(f"resample_crop needs an RGB image, got {img.mode}")
    if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
        raise ValueError(f"box {box} is not a non-empty box inside the {w}x{h} image")
    if out is None:
        out = np.empty((3, oh, ow), np.float32)
    elif out.shape != (3, oh, ow) or out.dtype != np.float32 or not out.flags.c_contiguous:
        # The last product writes through a reshaped view of `out`, which only a contiguous array has.
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(3, oh, ow)}, "
                         f"got {out.dtype} {out.shape}")
    py = axis_plan(h, box[1], box[3], oh, kind, num_blocks(oh, block))
    px = axis_plan(w, box[0], box[2], ow, kind, num_blocks(ow, block))
    # Vertical pass, all channels at once, the scale folded into the weights:
    # (blocks, n, window) @ (blocks, window, columns * 3) -> rows (oh, rw, 3).
    # Only the input rectangle the blocks read leaves Pillow, in stripes of columns converted to float32 rows
    # of interleaved RGB, zero-padded past the image (where the weights are zero). One stripe for a drafted
    # JPEG; several for a large PNG, so that its float copy stays within stripe_bytes.
    y1, x1 = min(h, py.start + py.span), min(w, px.start + px.span)
    rh, rw = y1 - py.start, x1 - px.start
    wy = py.weights.transpose(0, 2, 1) * np.float32(normalize[0])
    rows = np.empty((oh, rw, 3), np.float32)
    row_blocks = rows.reshape(wy.shape[0], wy.shape[1], rw * 3)
    step = max(1, min(rw, stripe_bytes // (py.span * 3 * 4)))
    for c0 in range(0, rw, step):
        c1 = min(rw, c0 + step)
        region = np.asarray(img.crop((px.start + c0, py.start, px.start + c1, y1)))
        src = np.empty((py.span, (c1 - c0) * 3), np.float32)
        src[:rh] = region.reshape(rh, -1)
        src[rh:] = 0.0
        np.matmul(wy, _blocked(src, py, 0), out=row_blocks[:, :, 3 * c0:3 * c1])
    # Channels first for the horizontal pass, zero-padded to the columns its blocks read. (A plain copy: adding
    # the offset in it would take twice as long as adding it to the output afterwards.)
    planes = np.empty((3, oh, px.span), np.float32)
    planes[:, :, :rw] = rows.transpose(2, 0, 1)
    planes[:, :, rw:] = 0.0
    planes = planes.reshape(3 * oh, px.span)
    # Horizontal pass: (blocks, 3 * oh, window) @ (blocks, window, n) -> the column blocks of `out`.
    wx, cols = px.weights, _blocked(planes, px, 1)
    if flip:  # the mirrored output: blocks in reverse order, each with its columns reversed
        wx, cols = wx[::-1, :, ::-1], cols[::-1]
    xblocks = px.weights.shape[0]  # may be 1 where py has more: heavy upscaling falls back to one block
    np.matmul(cols, wx, out=out.reshape(3 * oh, xblocks, ow // xblocks).transpose(1, 0, 2))
    out += np.float32(normalize[1])
    lo, hi = sorted((normalize[1], 255.0 * normalize[0] + normalize[1]))
    np.clip(out, np.float32(lo), np.float32(hi), out=out)
    return out
