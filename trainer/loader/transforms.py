"""Image bytes -> normalized NCHW-ready float32 crop, with the cheap paths the reference did not take.

Three savings over the reference's decode-everything, Resize-then-RandomCrop, ToTensor, Normalize design:
- JPEG draft decoding: libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, chosen so that the shorter side
  stays >= the resolution, so a 900 px photo for a 256 px crop decodes at a quarter of the pixels.
- Resize only the crop: the crop box is chosen in resized coordinates, mapped back to source coordinates,
  and only the R x R output is computed instead of the whole resized image.
- That resample is Pillow's filter computed as two blocked float32 matrix products (trainer/loader/resample.py),
  written straight into the batch slot already normalised: no 8-bit pass, no separate normalise pass.
The crop geometry is computed from the upright original size, so it does not depend on whether draft applied.

Pixels: data_tools/pixels.py's one rule, shared with the data tool. The EXIF orientation is applied (the crop is
planned on the upright size, the decoded image is turned upright before the crop box is read from it), 16-bit and
float images are scaled to 8 bits, and transparency is composited on white.

Every failure of one record's image (an unidentifiable header, a size over --max_image_pixels, pixel data that
does not decode, any exception Pillow raises while decoding) is a RecordError with a reason, so the stream skips
and counts it. The resample of decoded pixels is the loader's own code: the stream counts a failure there too
('transform_error'), so even a bug ends the run after --max_consecutive_skips records, with the reason.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from data_tools.part_format import RecordError
from data_tools.pixels import SWAPS_AXES, exif_orientation, to_rgb8
from trainer.loader.buckets import Bucket, cover_size, crop_box_for, crop_offsets
from trainer.loader.resample import FILTERS, resample_crop

if TYPE_CHECKING:  # config.py imports INTERPOLATIONS from here
    from trainer.loader.config import DataArguments

# Pillow's filters, every name paddle.vision.transforms.Resize accepts (see resample.py).
INTERPOLATIONS = tuple(FILTERS)


@dataclass(frozen=True)
class CropPlan:
    """Where the crop lies in resized coordinates and whether it is mirrored."""

    left: int
    top: int
    flip: bool


def open_image(image_bytes: bytes) -> Image.Image:
    """Header only (Pillow decodes lazily); RecordError('bad_image') when Pillow cannot identify it, or
    'too_large' when Pillow refuses it as a decompression bomb (over twice its pixel limit)."""
    try:
        with warnings.catch_warnings():
            # Our --max_image_pixels decides (ImageTransform._checked_size); Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(image_bytes))
    except Image.DecompressionBombError as e:
        raise RecordError("too_large", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises on one record's bytes is that record's fault
        raise RecordError("bad_image", f"{type(e).__name__}: {e}") from None


class ImageTransform:
    """Resize the shorter side to `data.resolution`, crop a square (random or center), optionally flip,
    normalize to [-1, 1], channels first. Reads its settings from the loader's DataArguments (validated
    there): resolution, interpolation, center_crop, random_flip, min_image_size, max_image_pixels.
    Sizes are upright sizes (EXIF orientation applied) throughout.

    With an aspect-ratio bucket (width, height) (`bucket`, from trainer/loader/buckets.py) the image is resized to
    cover the bucket instead and cropped to it; the square is the bucket (R, R), with the same arithmetic."""

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
        """Upright (width, height) of an opened image; RecordError('bad_image' | 'too_small' | 'too_large')
        when it cannot be used."""
        try:
            w, h = img.size
            orientation = exif_orientation(img)
        except Exception as e:  # noqa: BLE001 - a corrupt EXIF block is the record's fault
            raise RecordError("bad_image", f"{type(e).__name__}: {e}") from None
        if w < 1 or h < 1:
            raise RecordError("bad_image", f"image size {w}x{h}")
        if w * h > self.data.max_image_pixels:
            raise RecordError("too_large", f"{w}x{h} > max_image_pixels {self.data.max_image_pixels}")
        if orientation in SWAPS_AXES:
            w, h = h, w
        if min(w, h) < self.data.min_image_size:
            raise RecordError("too_small", f"{w}x{h} < min_image_size {self.data.min_image_size}")
        return w, h

    def output_size(self, bucket: Optional[Bucket] = None) -> Bucket:
        """(width, height) of the crop: the bucket, or the resolution's square."""
        return bucket or (self.data.resolution, self.data.resolution)

    def resized_size(self, w: int, h: int, bucket: Optional[Bucket] = None) -> Tuple[int, int]:
        """Size after scaling the shorter side to the resolution (never below it on either side); with a
        bucket, after scaling to cover it (buckets.cover_size)."""
        return cover_size(w, h, *self.output_size(bucket))

    def plan(self, w: int, h: int, rng: np.random.Generator, bucket: Optional[Bucket] = None) -> CropPlan:
        """Crop offsets and flip for an image of upright size (w, h). Draws from `rng` in a fixed order
        (left, top, flip) whatever the flags, so flags do not shift other random choices."""
        bw, bh = self.output_size(bucket)
        rw, rh = cover_size(w, h, bw, bh)
        left_r, top_r = crop_offsets(w, h, bw, bh, rng)
        flip_r = rng.random()
        if self.data.center_crop:
            left, top = int(round((rw - bw) / 2.0)), int(round((rh - bh) / 2.0))
        else:
            left, top = left_r, top_r
        return CropPlan(left, top, bool(self.data.random_flip and flip_r < 0.5))

    def decode(self, img: Image.Image, bucket: Optional[Bucket] = None) -> Image.Image:
        """Pixels of an opened image as upright 8-bit RGB; a JPEG much larger than the target is decoded at a
        1/2^k draft scale. Any failure while decoding raises RecordError('bad_image')."""
        try:
            orientation = exif_orientation(img)
            w, h = img.size  # as stored
            if img.format == "JPEG" and min(w, h) >= 2 * min(self.output_size(bucket)):
                # Ask for the resized size, in stored axes: Pillow picks the largest 1/2^k scale that keeps both
                # sides >= it.
                rw, rh = self.resized_size(*((h, w) if orientation in SWAPS_AXES else (w, h)), bucket)
                img.draft("RGB", (rh, rw) if orientation in SWAPS_AXES else (rw, rh))
            img.load()
            if orientation != 1:  # exif_transpose copies even an upright image: only when there is work
                img = ImageOps.exif_transpose(img)
            return to_rgb8(img)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data, or a decoder's own failure
            raise RecordError("bad_image", f"{type(e).__name__}: {e}") from None

    def crop_box(self, decoded_size: Tuple[int, int], size: Tuple[int, int], plan: CropPlan,
                 bucket: Optional[Bucket] = None) -> Tuple[float, ...]:
        """The crop of `plan` as a box (x0, y0, x1, y1) in the pixels of the decoded upright image
        (`decoded_size`, after any draft) of an image whose upright size is `size`: resized coords * (decoded /
        resized)."""
        return crop_box_for(*size, *self.output_size(bucket), (plan.left, plan.top), decoded_size)

    def resize_crop(self, img: Image.Image, size: Tuple[int, int], plan: CropPlan,
                    out: Optional[np.ndarray] = None, bucket: Optional[Bucket] = None) -> np.ndarray:
        """The crop of `plan` as float32 [3, R, R] (with a bucket: [3, height, width]) in [-1, 1] (into `out`
        when given), computed from the decoded upright RGB `img` of an image whose upright size is `size`: only
        the crop box is resampled."""
        # Not wrapped in RecordError: the pixels are loaded by now, so an error here is a bug, not bad data.
        return resample_crop(img, self.crop_box(img.size, size, plan, bucket), self.output_size(bucket),
                             self.data.interpolation, plan.flip, out)

    def apply(self, img: Image.Image, rng: np.random.Generator, out: Optional[np.ndarray] = None,
              bucket: Optional[Bucket] = None) -> np.ndarray:
        """float32 [3, R, R] (with a bucket: [3, height, width]) in [-1, 1] from an image from `open_checked`,
        written into `out` when given (a slot of the batch array, which saves an allocation and the copy of
        stacking). Raises RecordError('bad_image') when the pixel data is corrupt."""
        size = self._checked_size(img)
        plan = self.plan(*size, rng, bucket)
        return self.resize_crop(self.decode(img, bucket), size, plan, out, bucket)

    def upright_size(self, img: Image.Image) -> Tuple[int, int]:
        """(width, height) of an image from `open_checked`, EXIF orientation applied: what picks its bucket."""
        return self._checked_size(img)

    def __call__(self, image_bytes: bytes, rng: np.random.Generator,
                 out: Optional[np.ndarray] = None, bucket: Optional[Bucket] = None) -> np.ndarray:
        """`apply` on encoded bytes. Raises RecordError('bad_image' | 'too_small' | 'too_large')."""
        return self.apply(self.open_checked(image_bytes), rng, out, bucket)
