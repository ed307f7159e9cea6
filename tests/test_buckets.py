"""trainer/loader/buckets.py: the bucket lists, the nearest bucket and the minimal crop, as pure functions."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from trainer.loader.buckets import (bucket_name, bucket_set, center_offsets, cover_size, crop_box_for, crop_offsets,
                                    default_buckets, nearest_bucket, parse_bucket_list)

pytestmark = pytest.mark.unit


def test_default_lists_are_the_documented_ones():
    assert default_buckets(256) == [(192, 320), (256, 256), (320, 192)]
    assert default_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert bucket_set("512") == default_buckets(512, 64)
    assert bucket_set("32", step=8) == [(24, 40), (32, 32), (40, 24)]


@pytest.mark.parametrize("side,step", [(256, 64), (512, 64), (1024, 64), (256, 32), (64, 16)])
def test_default_list_invariants(side, step):
    buckets = default_buckets(side, step)
    assert (side, side) in buckets
    assert len(set(buckets)) == len(buckets)
    assert {(h, w) for w, h in buckets} == set(buckets)  # symmetric
    ratios = [Fraction(w, h) for w, h in buckets]
    assert ratios == sorted(ratios)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= side * side
        assert Fraction(1, 2) <= Fraction(w, h) <= 2
        # the largest height under the area for this width (or its transpose)
        assert h + step > side * side // w or w + step > side * side // h


def test_explicit_list_and_errors():
    assert parse_bucket_list("512x512, 576X448") == [(512, 512), (576, 448)]
    assert bucket_set("64x32,32x64") == [(64, 32), (32, 64)]
    for bad in ("512", "512x", "axb", "500x512", "0x64", "64x64,64x64", "64x64x64"):
        with pytest.raises(ValueError):
            parse_bucket_list(bad)
    for bad in ("", " ", "100", "32"):  # not a multiple of the step (64)
        with pytest.raises(ValueError):
            bucket_set(bad)
    assert bucket_name((576, 448)) == "576x448"


def test_nearest_bucket_by_log_aspect_with_deterministic_ties():
    b = default_buckets(512)
    assert nearest_bucket(1000, 1000, b) == (512, 512)
    assert nearest_bucket(1920, 1080, b) == (640, 384)
    assert nearest_bucket(1080, 1920, b) == (384, 640)
    assert nearest_bucket(4000, 100, b) == (640, 384)  # beyond the widest: the widest
    # exact tie in log ratio (1:1 between 2:1 and 1:2): larger area wins, then the narrower one, whatever the order
    ties = [(128, 64), (64, 128)]
    assert nearest_bucket(50, 50, ties) == nearest_bucket(50, 50, ties[::-1]) == (64, 128)
    assert nearest_bucket(50, 50, [(128, 64), (32, 64)]) == (128, 64)  # same distance, larger area
    # log distance, not linear: 3:2 is nearer 2:1 (x4/3) than 1:1 (x3/2)
    assert nearest_bucket(300, 200, [(64, 64), (128, 64)]) == (128, 64)
    for order in itertools.permutations(b):
        assert nearest_bucket(1200, 900, list(order)) == (576, 448)
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, b)


def test_cover_size_and_square_case_matches_shorter_side_resize():
    assert cover_size(1000, 500, 640, 384) == (768, 384)  # height binds
    assert cover_size(1000, 800, 640, 384) == (640, 512)  # width binds
    for w, h, r in [(24, 20, 16), (333, 1000, 256), (17, 93, 32)]:
        scale = r / min(w, h)
        assert cover_size(w, h, r, r) == (max(r, round(w * scale)), max(r, round(h * scale)))


def test_minimal_crop_is_along_one_axis_and_inside():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(8, 3000)), int(rng.integers(8, 3000))
        bw, bh = (int(v) * 8 for v in rng.integers(1, 80, size=2))
        rw, rh = cover_size(w, h, bw, bh)
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)
        left, top = crop_offsets(w, h, bw, bh, rng)
        x0, y0, x1, y1 = crop_box_for(w, h, bw, bh, (left, top))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # the box has the bucket's aspect ratio (up to the rounding of the covering size)
        assert abs((x1 - x0) / (y1 - y0) - bw / bh) <= bw / bh * (1.0 / min(rw, rh) + 1.0 / min(bw, bh))
        cx0, cy0, cx1, cy1 = crop_box_for(w, h, bw, bh)  # centred
        assert abs((cx0 + cx1) - w) <= 2 * w / rw and abs((cy0 + cy1) - h) <= 2 * h / rh


def test_crop_box_in_decoded_pixels_and_offsets_checked():
    # a 2000x1000 image drafted to 500x250: the box scales with the decoded size
    full = crop_box_for(2000, 1000, 64, 64, (10, 0))
    drafted = crop_box_for(2000, 1000, 64, 64, (10, 0), decoded=(500, 250))
    assert np.allclose(np.array(drafted) * 4, full)
    assert center_offsets(2000, 1000, 64, 64) == (32, 0)
    with pytest.raises(ValueError):
        crop_box_for(2000, 1000, 64, 64, (65, 0))  # covering size is 128x64


def test_crop_offsets_always_draw_twice():
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    crop_offsets(64, 64, 64, 64, a)  # no freedom at all, still two draws
    b.integers(1), b.integers(1)
    assert a.random() == b.random()


@pytest.mark.parametrize("size,box", [((64, 40), (10.0, 20.0, 490.0, 280.0)), ((40, 64), (0.0, 0.0, 300.0, 300.0)),
                                      ((48, 24), (3.5, 1.25, 203.0, 101.0))])
def test_non_square_resample_matches_pillow(size, box):
    """The bucket's crop goes through the same resample as the square one (trainer/loader/resample.py), now with
    its own block layout per axis: against Pillow's resize of the box, mirrored or not."""
    from PIL import Image

    from trainer.loader.resample import resample_crop

    rng = np.random.default_rng(1)
    # smooth content: the comparison measures the filter, not Pillow's clipping of ringing between its passes
    small = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((500, 300), Image.Resampling.BICUBIC)
    ref = np.asarray(img.resize(size, Image.Resampling.LANCZOS, box=box), np.float32).transpose(2, 0, 1) / 127.5 - 1
    for flip in (False, True):
        ours = resample_crop(img, box, size, "lanczos", flip)
        assert ours.shape == (3, size[1], size[0])
        want = ref[:, :, ::-1] if flip else ref
        # mean within rounding; the max is where Pillow clipped a ringing overshoot between its 8-bit passes
        assert np.abs(ours - want).mean() * 127.5 < 0.6 and np.abs(ours - want).max() * 127.5 < 8
    square = resample_crop(img, box, size[0], "lanczos")
    assert np.array_equal(square, resample_crop(img, box, (size[0], size[0]), "lanczos"))
