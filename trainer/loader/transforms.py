"""Image bytes -> normalized NCHW-ready float32 crop, with the cheap paths the reference did not take.

Three savings over the reference's decode-everything, Resize-then-RandomCrop, ToTensor, Normalize design:
- JPEG draft decoding: libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, chosen so that the shorter side
  stays >= the resolution, so a 900 px photo for a 256 px crop decodes at a quarter of the pixels.
- Resize only the crop: the crop box is chosen in resized coordinates, mapped back to source coordinates,
  and only the R x R output is computed instead of the whole resized image.
- That resample is Pillow's filter computed as two blocked float32 matrix products (trainer/loader/resample.py),
  written straight into the batch slot already normalised: no 8-bit pass, no separate normalise pass.
The crop geometry is computed from the original size, so it does not depend on whether draft applied.

Mode conversion: images with transparency (RGBA, LA, PA, P with a transparency entry) are composited on
white, because a plain convert('RGB') would expose whatever colour the transparent pixels happen to store
(often black); every other mode goes through convert('RGB').
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools.part_format import RecordError
from trainer.loader.resample import FILTERS, resample_crop

if TYPE_CHECKING:  # config.py imports INTERPOLATIONS from here
    from trainer.loader.config import DataArguments

INTERPOLATIONS = tuple(FILTERS)  # lanczos, bicubic, bilinear, nearest: Pillow's filters, see resample.py

# Errors Pillow raises on corrupt or unsupported data (truncated streams are OSError, decompression bombs
# are a DecompressionBombError, a ValueError subclass of Image's own). Listed, not `Exception`, so a bug in
# our code is not counted as a bad image.
_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
               EOFError)


@dataclass(frozen=True)
class CropPlan:
    """Where the crop lies in resized coordinates and whether it is mirrored."""

    left: int
    top: int
    flip: bool


def open_image(image_bytes: bytes) -> Image.Image:
    """Header only (Pillow decodes lazily); RecordError('bad_image') when Pillow cannot identify it."""
    try:
        with warnings.catch_warnings():
            # DecompressionBombWarning is promoted to an error: a huge image is a bad record, not a warning
            # per sample.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(image_bytes))
    except (_PIL_ERRORS + (Image.DecompressionBombWarning,)) as e:
        raise RecordError("bad_image", f"{type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ImageTransform:
    """Resize the shorter side to `data.resolution`, crop a square (random or center), optionally flip,
    normalize to [-1, 1], channels first. Reads its settings from the loader's DataArguments (validated
    there): resolution, interpolation, center_crop, random_flip, min_image_size."""

    def __init__(self, data: "DataArguments"):
        self.data = data

    def open_checked(self, image_bytes: bytes) -> Image.Image:
        """The image opened from its header only (pixels are decoded later, by `apply`): cheap enough to run
        when a record enters the shuffle buffer, so too-small and unidentifiable images never take a buffer
        slot, and the opened image is kept so the header is parsed once."""
        img = open_image(image_bytes)
        self._checked_size(img)
        return img

    def _checked_size(self, img: Image.Image) -> Tuple[int, int]:
        """(width, height) of an opened image; RecordError('bad_image' | 'too_small') when it cannot be used."""
        w, h = img.size
        if w < 1 or h < 1:
            raise RecordError("bad_image", f"image size {w}x{h}")
        if min(w, h) < self.data.min_image_size:
            raise RecordError("too_small", f"{w}x{h} < min_image_size {self.data.min_image_size}")
        return w, h

    def resized_size(self, w: int, h: int) -> Tuple[int, int]:
        """Size after scaling the shorter side to the resolution (never below it on either side)."""
        r = self.data.resolution
        scale = r / min(w, h)
        return max(r, round(w * scale)), max(r, round(h * scale))

    def plan(self, w: int, h: int, rng: np.random.Generator) -> CropPlan:
        """Crop offsets and flip for an image of original size (w, h). Draws from `rng` in a fixed order
        (left, top, flip) whatever the flags, so flags do not shift other random choices."""
        rw, rh = self.resized_size(w, h)
        r = self.data.resolution
        left_r, top_r, flip_r = int(rng.integers(rw - r + 1)), int(rng.integers(rh - r + 1)), rng.random()
        if self.data.center_crop:
            left, top = int(round((rw - r) / 2.0)), int(round((rh - r) / 2.0))
        else:
            left, top = left_r, top_r
        return CropPlan(left, top, bool(self.data.random_flip and flip_r < 0.5))

    def decode(self, img: Image.Image) -> Image.Image:
        """Pixels of an opened image as RGB; a JPEG much larger than the target is decoded at a 1/2^k draft
        scale. Corrupt pixel data raises RecordError('bad_image') here."""
        w, h = img.size
        try:
            if img.format == "JPEG" and min(w, h) >= 2 * self.data.resolution:
                # Ask for the resized size: Pillow picks the largest 1/2^k scale that keeps both sides >= it.
                img.draft("RGB", self.resized_size(w, h))
            img.load()
            return _to_rgb(img)
        except _PIL_ERRORS as e:
            raise RecordError("bad_image", f"{type(e).__name__}: {e}") from None

    def crop_box(self, decoded_size: Tuple[int, int], size: Tuple[int, int], plan: CropPlan) -> Tuple[float, ...]:
        """The crop of `plan` as a box (x0, y0, x1, y1) in the pixels of the decoded image (`decoded_size`, after
        any draft) of an image whose original size is `size`: resized coords * (decoded / resized)."""
        r = self.data.resolution
        (rw, rh), (dw, dh) = self.resized_size(*size), decoded_size
        sx, sy = dw / rw, dh / rh
        # min(): (left + r) * dw / rw may land an ulp past dw.
        return plan.left * sx, plan.top * sy, min(dw, (plan.left + r) * sx), min(dh, (plan.top + r) * sy)

    def resize_crop(self, img: Image.Image, size: Tuple[int, int], plan: CropPlan,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
        """The R x R crop of `plan` as float32 [3, R, R] in [-1, 1] (into `out` when given), computed from
        the decoded RGB `img` of an image whose original size is `size`: only the crop box is resampled."""
        # Not wrapped in RecordError: the pixels are loaded by now, so an error here is a bug, not bad data.
        return resample_crop(img, self.crop_box(img.size, size, plan), self.data.resolution, self.data.interpolation,
                             plan.flip, out)

    def apply(self, img: Image.Image, rng: np.random.Generator, out: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 [3, R, R] in [-1, 1] from an image from `open_checked`, written into `out` when given (a
        slot of the batch array, which saves an allocation and the copy of stacking). Raises
        RecordError('bad_image') when the pixel data is corrupt."""
        w, h = img.size
        plan = self.plan(w, h, rng)
        return self.resize_crop(self.decode(img), (w, h), plan, out)

    def __call__(self, image_bytes: bytes, rng: np.random.Generator,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
        """`apply` on encoded bytes. Raises RecordError('bad_image' | 'too_small')."""
        return self.apply(self.open_checked(image_bytes), rng, out)
