"""data_tools/pixels.py: one rule for orientation, bit depth and transparency, on real images."""
import io

import numpy as np
import pytest
from PIL import Image

from data_tools.pixels import exif_orientation, to_rgb8, upright_rgb8, upright_size

pytestmark = pytest.mark.unit


def reopen(img: Image.Image, fmt: str = "PNG", **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_16_bit_greyscale_is_scaled_not_clipped():
    ramp = (np.arange(64 * 16, dtype=np.uint16).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    img = reopen(Image.fromarray(ramp))  # a 16-bit PNG
    assert img.mode in ("I;16", "I")
    out = np.asarray(to_rgb8(img))
    assert out.shape == (16, 64, 3) and np.array_equal(out[..., 0], out[..., 2])
    np.testing.assert_allclose(out[..., 0], np.rint(ramp / 257.0), atol=1)
    assert (out == 255).mean() < 0.01  # a plain convert('RGB') makes ~99.6% of this ramp white


def test_float_images_in_unit_range_are_scaled():
    arr = np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8)
    out = np.asarray(to_rgb8(Image.fromarray(arr, "F")))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (np.asarray(to_rgb8(Image.fromarray(rgba, "RGBA"))) == 255).all()


@pytest.mark.parametrize("orientation,swaps", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_is_applied(orientation, swaps):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = reopen(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    assert exif_orientation(img) == orientation
    assert upright_size(img) == ((20, 40) if swaps else (40, 20))
    up = np.asarray(upright_rgb8(img))
    assert up.shape[:2] == ((40, 20) if swaps else (20, 40))
    if orientation == 6:  # rotated 90 degrees clockwise for display: the white half ends on top
        assert up[:20].mean() > 200 and up[20:].mean() < 50
