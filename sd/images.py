"""Images as every stage shows them: model tensors back to uint8 pixels, and pictures tiled into one grid.

One home for both, used by the loader inspector, the training callbacks, the VAE stage and eval. A grid can carry a
label above each picture (the prompt of a sample): a 32 px sample then is upscaled (nearest, integer factor, so
pixels stay pixels) until the label is readable above it."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_MIN_CELL = 128  # px: a labelled cell is at least this wide, room for ~20 characters a line
LABEL_FONT_SIZE = 11


def to_uint8(images: Any) -> np.ndarray:
    """Pixels in [-1, 1], channels first (CHW, or NCHW; a numpy array or a paddle Tensor) -> uint8 channels last
    (HWC or NHWC): the inverse of the loader's normalisation, rounded to nearest."""
    arr = images.astype("float32").numpy() if hasattr(images, "numpy") else np.asarray(images, dtype=np.float32)
    if arr.ndim not in (3, 4):
        raise ValueError(f"to_uint8 takes CHW or NCHW pixels, got shape {arr.shape}")
    arr = np.rint((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def wrap_label(text: str, max_chars: int) -> List[str]:
    """Greedy word wrap into lines of at most `max_chars` characters (a longer word gets a line of its own, cut)."""
    lines: List[str] = []
    for word in text.split():
        word = word[:max_chars]
        if lines and len(lines[-1]) + 1 + len(word) <= max_chars:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def grid(images: Sequence[Any], cols: Optional[int] = None, pad: int = 2, bg: int = 255,
         labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Tile PIL images or HWC uint8 arrays (all the same size) row-major into one RGB image; `cols` defaults to
    a near-square layout. With `labels` (one per image) each image gets its label written above it."""
    if not images:
        raise ValueError("grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"grid: {len(labels)} labels for {len(images)} images")
    arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    h, w = arrays[0].shape[:2]
    for i, a in enumerate(arrays):
        if a.shape[:2] != (h, w):
            raise ValueError(f"grid: image {i} is {a.shape[1]}x{a.shape[0]}, the first is {w}x{h}")
    scale, lines, font, line_h = 1, [], None, 0
    if labels is not None:
        scale = max(1, math.ceil(LABEL_MIN_CELL / w))
        arrays = [a.repeat(scale, axis=0).repeat(scale, axis=1) for a in arrays]
        font = ImageFont.load_default(size=LABEL_FONT_SIZE)
        max_chars = max(4, int(w * scale / (0.6 * LABEL_FONT_SIZE)))  # ~0.6 em per character
        lines = [wrap_label(str(t), max_chars) for t in labels]
        line_h = LABEL_FONT_SIZE + 2
    h, w = h * scale, w * scale
    label_h = line_h * max((len(x) for x in lines), default=0)
    cols = cols or math.ceil(math.sqrt(len(arrays)))
    rows = (len(arrays) + cols - 1) // cols
    cell_h = label_h + h
    canvas = np.full((rows * (cell_h + pad) + pad, cols * (w + pad) + pad, 3), bg, np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        y, x = pad + r * (cell_h + pad) + label_h, pad + c * (w + pad)
        canvas[y: y + h, x: x + w] = a
    out = Image.fromarray(canvas)
    if labels is not None:
        draw = ImageDraw.Draw(out)
        for i, text_lines in enumerate(lines):
            r, c = divmod(i, cols)
            for k, line in enumerate(text_lines):
                draw.text((pad + c * (w + pad), pad + r * (cell_h + pad) + k * line_h), line, fill=(0, 0, 0),
                          font=font)
    return out
