"""trainer/loader/resample.py against a dense float64 port of Pillow's coefficients, and against Pillow itself."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_info, threadpool_limits

from trainer.loader.resample import (FILTERS, PILLOW_FILTERS, _bicubic, _bilinear, _box, _hamming, _lanczos,
                                     axis_plan, num_blocks, resample_crop, single_thread_blas)

SUPPORT = {"lanczos": 3.0, "bicubic": 2.0, "bilinear": 1.0, "box": 0.5, "hamming": 1.0}


def _filter64(kind: str, x: float) -> float:
    """Pillow's filters (libImaging/Resample.c), in float64, point by point."""
    if kind == "lanczos":
        return np.sinc(x) * np.sinc(x / 3) if -3.0 <= x < 3.0 else 0.0
    if kind == "bicubic":
        a, x = -0.5, abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2.0 else 0.0
    if kind == "box":
        return 1.0 if -0.5 < x <= 0.5 else 0.0
    if kind == "hamming":
        x = abs(x)
        if x >= 1.0:
            return 0.0
        # The window's constants are C float literals (0.54f, 0.46f) in Pillow.
        return 1.0 if x == 0.0 else math.sin(math.pi * x) / (math.pi * x) * (
            float(np.float32(0.54)) + float(np.float32(0.46)) * math.cos(math.pi * x))
    return max(0.0, 1.0 - abs(x))


def dense_matrix(in_size: int, b0: float, b1: float, out_size: int, kind: str) -> np.ndarray:
    """(out, in) float64 weights, written the way Pillow's C computes them, loop for loop: precompute_coeffs
    for the filters, ImagingScaleAffine for nearest. The box is a C float there, hence float32 here."""
    f0, f1 = np.float32(b0), np.float32(b1)
    m = np.zeros((out_size, in_size))
    if kind == "nearest":
        xo = float(f0) + float(f1 - f0) / out_size * 0.5
        for xx in range(out_size):
            m[xx, int(xo)] = 1.0
            xo += float(f1 - f0) / out_size
        return m
    scale = float(f1 - f0) / out_size
    fscale = max(scale, 1.0)
    support = SUPPORT[kind] * fscale
    for xx in range(out_size):
        center = float(f0) + (xx + 0.5) * scale
        xmin, xmax = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        ws = [_filter64(kind, (x + xmin - center + 0.5) / fscale) for x in range(xmax - xmin)]
        m[xx, xmin:xmax] = np.array(ws) / sum(ws)
    return m


def dense_reference(img: Image.Image, box, size: int, kind: str, flip: bool) -> np.ndarray:
    """What resample_crop must compute: both passes in float64, clipped once, normalised to [-1, 1]."""
    arr = np.asarray(img, dtype=np.float64)
    wy = dense_matrix(img.height, box[1], box[3], size, kind)
    wx = dense_matrix(img.width, box[0], box[2], size, kind)
    out = np.stack([wy @ arr[:, :, c] @ wx.T for c in range(3)])
    out = np.clip(out, 0, 255) / 127.5 - 1
    return out[:, :, ::-1] if flip else out


def _image(w: int, h: int, seed: int, smooth: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    if smooth:  # gradients and a slow wave: no ringing overshoot for Pillow to clip between its passes
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([60 + 120 * x / w + 20 * np.sin(y / 7.0), 50 + 100 * y / h, 128 + 60 * np.cos(x / 11.0)], -1)
        return Image.fromarray(arr.astype(np.uint8))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


CASES = [  # (image w, h, box, output size): downscales of 1 to 3.4x, upscales, edges, sizes of 1 or many blocks
    (120, 90, (0.0, 0.0, 90.0, 90.0), 64),
    (120, 90, (17.3, 5.1, 101.9, 89.7), 37),
    (300, 200, (100.0, 0.0, 300.0, 200.0), 64),
    (200, 260, (3.7, 40.2, 200.0, 240.2), 48),
    (40, 30, (5.0, 2.0, 35.0, 30.0), 64),
    (9, 7, (0.0, 0.0, 9.0, 7.0), 32),
    (500, 180, (121.5, 0.0, 301.5, 180.0), 53),
]


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(FILTERS))
def test_matches_dense_float64_port_of_pillow(kind):
    for i, (w, h, box, size) in enumerate(CASES):
        img = _image(w, h, seed=i)
        for flip in (False, True):
            got = resample_crop(img, box, size, kind, flip)
            want = dense_reference(img, box, size, kind, flip)
            assert got.dtype == np.float32 and got.shape == (3, size, size)
            err = np.abs(got - want).max()
            assert err < 3e-5, (kind, w, h, box, size, flip, err)


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(FILTERS))
def test_close_to_pillow(kind):
    """Pillow rounds to 8 bits between and after its passes; on content without overshoot that is all
    that differs. Nearest picks the same pixels exactly."""
    img = _image(400, 300, seed=1, smooth=True)
    for box, size in (((23.4, 11.2, 323.4, 287.7), 256), ((0.0, 0.0, 300.0, 300.0), 128)):
        pil = np.asarray(img.resize((size, size), PILLOW_FILTERS[kind], box=box), dtype=np.float64)
        ours = (resample_crop(img, box, size, kind).transpose(1, 2, 0) + 1) * 127.5
        diff = np.abs(ours - pil)
        if kind == "nearest":
            assert diff.max() < 1e-4
        else:
            # Pillow's 8-bit intermediate (+-0.5) goes through the second pass's lobes, then it rounds again.
            assert diff.mean() < 0.35 and diff.max() < 1.5, (diff.mean(), diff.max())


@pytest.mark.unit
def test_blocking_flip_and_out():
    img = _image(300, 200, seed=3)
    box = (41.2, 7.9, 241.2, 197.3)
    dense = resample_crop(img, box, 64, "lanczos", block=64)  # one block: a plain banded product
    for block in (0, 8, 16, 32):
        assert np.abs(resample_crop(img, box, 64, "lanczos", block=block) - dense).max() < 1e-5
    # Stripes of 7 columns (the float copy of a large PNG is converted stripe by stripe): the same columns out.
    striped = resample_crop(img, box, 64, "lanczos", stripe_bytes=7 * 3 * 4 * 256)
    assert np.abs(striped - resample_crop(img, box, 64, "lanczos")).max() < 1e-6
    flipped = resample_crop(img, box, 64, "lanczos", flip=True)
    np.testing.assert_allclose(flipped, resample_crop(img, box, 64, "lanczos")[:, :, ::-1], atol=1e-6)
    batch = np.zeros((2, 3, 64, 64), np.float32)
    assert np.shares_memory(resample_crop(img, box, 64, "lanczos", out=batch[1]), batch)
    assert np.abs(batch[1] - resample_crop(img, box, 64, "lanczos")).max() == 0 and not batch[0].any()
    assert batch.min() >= -1 and batch.max() <= 1


@pytest.mark.unit
def test_bad_arguments_are_errors():
    img = _image(50, 40, seed=0)
    with pytest.raises(ValueError, match="RGB"):
        resample_crop(img.convert("L"), (0, 0, 40, 40), 16, "lanczos")
    for box in ((0, 0, 51, 40), (10, 0, 10, 40), (-1, 0, 30, 30)):
        with pytest.raises(ValueError, match="box"):
            resample_crop(img, box, 16, "lanczos")
    for out in (np.zeros((3, 16, 16), np.float64), np.zeros((3, 16, 32), np.float32)[:, :, ::2],
                np.zeros((3, 8, 8), np.float32)):
        with pytest.raises(ValueError, match="out"):
            resample_crop(img, (0, 0, 40, 40), 16, "lanczos", out=out)


@pytest.mark.unit
def test_filters_and_plans():
    x = np.array([-3.5, -3.0, -2.2, -1.0, -0.3, 0.0, 0.4, 1.5, 2.999, 3.0, 4.0])
    np.testing.assert_allclose(_lanczos(x), [_filter64("lanczos", v) for v in x], atol=1e-6)
    np.testing.assert_allclose(_bicubic(x), [_filter64("bicubic", v) for v in x], atol=1e-6)
    np.testing.assert_allclose(_bilinear(x), [_filter64("bilinear", v) for v in x], atol=1e-6)
    x = np.concatenate([x, [-0.5, 0.5, -0.999, 0.999, 1e-9]])  # box's half-open edges, hamming's ends
    np.testing.assert_allclose(_box(x), [_filter64("box", v) for v in x], atol=0)
    np.testing.assert_allclose(_hamming(x), [_filter64("hamming", v) for v in x], atol=1e-7)
    assert set(FILTERS) == set(PILLOW_FILTERS) == {"nearest", "bilinear", "bicubic", "box", "lanczos", "hamming"}
    assert num_blocks(256) == 16 and num_blocks(512) == 16 and num_blocks(128) == 8 and num_blocks(37) == 1
    plan = axis_plan(450, 20.3, 320.3, 256, "lanczos", 16)
    assert plan.weights.shape[0] == 16 and plan.start + plan.span >= 320
    assert np.abs(plan.weights.sum(axis=1) - 1.0).max() < 1e-6  # each output's taps sum to 1
    # 4 inputs to 64 outputs: the blocks would all start at input 0, so the plan falls back to one block.
    up = axis_plan(4, 0.0, 4.0, 64, "bicubic", 16)
    assert up.weights.shape == (1, 4, 64) and math.isclose(float(up.weights.sum()), 64, rel_tol=1e-6)


@pytest.mark.unit
def test_single_thread_blas_limits_and_restores():
    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    with threadpool_limits(2, user_api="blas"):  # the suite runs with OMP_NUM_THREADS=1: start from 2
        assert blas_threads() and all(n == 2 for n in blas_threads())
        with single_thread_blas():
            assert all(n == 1 for n in blas_threads())
        assert all(n == 2 for n in blas_threads())
