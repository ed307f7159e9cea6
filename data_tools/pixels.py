"""How decoded pixels become 8-bit RGB, upright: one rule for the data tool (its --max_side re-encode) and the
loader (every training sample), so the two paths can never disagree about an image.

- Orientation: the EXIF Orientation tag (phone photos) is applied. Part files keep the original bytes, so the
  loader applies it when it decodes, exactly as the data tool does when it re-encodes.
- Bit depth: 16-bit and 32-bit integer images are scaled to 8 bits (v / 257 for 16-bit), not clipped (a plain
  convert('RGB') clips, and a 16-bit greyscale photo comes out almost all white); float images in [0, 1] are
  scaled by 255, other float ranges are clipped to [0, 255].
- Transparency (RGBA, LA, PA, P with a transparency entry) is composited on white: a plain convert('RGB') would
  expose whatever colour the transparent pixels happen to store (often black).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
SWAPS_AXES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation (1 = upright, 2..8 flips and rotations); 1 when absent or unreadable."""
    value = img.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(img: Image.Image) -> tuple:
    """(width, height) as the image is meant to be seen, before any pixel is decoded."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in SWAPS_AXES else (w, h)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Decoded pixels as 8-bit RGB (see the module docstring for the rules); orientation is not touched."""
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def upright_rgb8(img: Image.Image) -> Image.Image:
    """Decoded, upright, 8-bit RGB: what both paths store or train on."""
    return to_rgb8(ImageOps.exif_transpose(img))
