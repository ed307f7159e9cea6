"""Images as every stage shows them: model tensors back to uint8 pixels, and pictures tiled into one grid.

One home for both, used by the loader inspector, the training callbacks, the VAE stage and eval."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image


def to_uint8(images: Any) -> np.ndarray:
    """Pixels in [-1, 1], channels first (CHW, or NCHW; a numpy array or a paddle Tensor) -> uint8 channels last
    (HWC or NHWC): the inverse of the loader's normalisation, rounded to nearest."""
    arr = images.astype("float32").numpy() if hasattr(images, "numpy") else np.asarray(images, dtype=np.float32)
    if arr.ndim not in (3, 4):
        raise ValueError(f"to_uint8 takes CHW or NCHW pixels, got shape {arr.shape}")
    arr = np.rint((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def grid(images: Sequence[Any], cols: Optional[int] = None, pad: int = 2, bg: int = 255) -> Image.Image:
    """Tile PIL images or HWC uint8 arrays (all the same size) row-major into one RGB image; `cols` defaults to
    a near-square layout."""
    if not images:
        raise ValueError("grid needs at least one image")
    arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    h, w = arrays[0].shape[:2]
    cols = cols or math.ceil(math.sqrt(len(arrays)))
    rows = (len(arrays) + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), bg, np.uint8)
    for i, a in enumerate(arrays):
        if a.shape[:2] != (h, w):
            raise ValueError(f"grid: image {i} is {a.shape[1]}x{a.shape[0]}, the first is {w}x{h}")
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    return Image.fromarray(canvas)
