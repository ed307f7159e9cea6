"""Read (color, shape, position) back from a demo image: the judge of images generated from demo captions.

It will score diffusion-model samples, which are blurry, noisy and sometimes wrong, so it never raises on a
valid-looking array and always returns its best guess; `analyze` also gives the numbers behind the guess
(foreground fraction, saliency peak, fill ratio) so a caller can tell "no shape at all" from a confident read.

Method (why each step):
- saliency = chroma of (pixel - background color), i.e. how far a pixel's hue/saturation is from the background
  with brightness removed: the demo backgrounds are gray with a brightness gradient, the shapes saturated.
  The background color is the median of the border pixels (shapes never touch the border in the demo data).
- foreground = saliency above half of its high percentile (the half-maximum of a blurred edge sits on the true
  edge), then the largest 4-connected component, so specks of noise do not move the box or the centroid.
- color = palette entry whose chroma direction is closest (cosine) to the median of the most salient half of the
  foreground: hue survives mixing with gray, absolute RGB distance does not.
- position = nearest anchor to the component's bounding-box center (the triangle's centroid is off-center).
- shape = triangle if the row mass profile is skewed (apex up: wide at the bottom), else from the fill ratio of
  the bounding box, square ~1.0 vs circle ~0.785, measured with sums of soft coverage (see _soft_fill_ratio).

Non-square images (make_demo_data.py --aspect_ratios, and samples generated at a bucket's size) read alike: the
position is the box center as fractions of the width and of the height, which is how the generator places it,
and fill ratio and skewness do not depend on the image's proportions (tests/test_buckets_demo.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from sd.tiny.make_demo_data import COLORS, POSITIONS

# Decision boundaries, midway between the clusters measured on 540 images per setting (clean, and blurred with
# sigma 1-2.5 px per 64 px + noise std 8-20): circle fill 0.73-0.92 (mean 0.80), square 0.87-1.0 (mean 0.96),
# triangle row skewness -0.65..-0.21 vs -0.14..0.14 for the others. tests/test_demo_data.py checks accuracy.
TRIANGLE_MAX_SKEW = -0.25
TRIANGLE_MAX_FILL = 0.62
CIRCLE_MAX_FILL = 0.895
MAX_WORK_SIDE = 128  # larger inputs are box-downsampled first: the flood fill is pure Python
FOREGROUND_REL_THRESHOLD = 0.5
SALIENCY_PERCENTILE = 99.0

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)
_PALETTE_CHROMA = _PALETTE - _PALETTE.mean(axis=1, keepdims=True)
_PALETTE_CHROMA /= np.linalg.norm(_PALETTE_CHROMA, axis=1, keepdims=True)


@dataclass
class Reading:
    color: str
    shape: str
    position: str
    fill_ratio: float  # soft area / (peak column mass * peak row mass): the bbox fill ratio, see _soft_fill_ratio
    row_skewness: float  # skewness of the row mass profile: ~-0.57 for the apex-up triangle, ~0 otherwise
    foreground_fraction: float  # component area / image area
    saliency_peak: float  # high-percentile chroma distance from the background, 0..~250; ~0 means no shape
    center: Tuple[float, float]  # bbox center (x, y) as fractions of width and height

    def as_dict(self) -> Dict[str, str]:
        return {"color": self.color, "shape": self.shape, "position": self.position}


def to_float_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float32 in [0, 255] from a PIL image (any mode) or an array: HxWx3, HxWx4, HxW or 3xHxW; uint8 or
    float (floats whose max is <= 1 are taken as [0, 1], as diffusion pipelines return them)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    elif isinstance(image, np.ndarray):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
            arr = arr.transpose(1, 2, 0)  # CHW (paddle tensors converted to numpy)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 / HxWx4 / HxW / 3xHxW image array, got shape {arr.shape}")
        arr = arr[:, :, :3]
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
            if arr.size and float(arr.max()) <= 1.0:
                arr = arr * 255.0
        arr = np.clip(arr.astype(np.float32), 0.0, 255.0)
    else:
        raise TypeError(f"expected a PIL.Image or numpy array, got {type(image).__name__}")
    if arr.shape[0] < 4 or arr.shape[1] < 4:
        raise ValueError(f"image too small to read attributes from: {arr.shape[1]}x{arr.shape[0]}")
    if max(arr.shape[:2]) > MAX_WORK_SIDE:
        img = Image.fromarray(np.rint(arr).astype(np.uint8), "RGB")
        scale = MAX_WORK_SIDE / max(arr.shape[:2])
        size = (max(4, round(arr.shape[1] * scale)), max(4, round(arr.shape[0] * scale)))
        arr = np.asarray(img.resize(size, Image.Resampling.BOX), dtype=np.float32)
    return arr


def _saliency(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
    diff = rgb - np.median(border, axis=0)[None, None, :]
    chroma = diff - diff.mean(axis=2, keepdims=True)  # drop the brightness component (gradients, gray levels)
    return np.linalg.norm(chroma, axis=2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected True region of `mask` (HxW bool). Pure-Python BFS: inputs are <= 128x128."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_label else mask


def _nearest_color(pixels: np.ndarray) -> str:
    core = np.median(pixels, axis=0)
    chroma = core - core.mean()
    norm = float(np.linalg.norm(chroma))
    if norm < 1e-6:  # a perfectly gray "shape": no hue to compare; the best guess is the first palette entry
        return _PALETTE_NAMES[0]
    return _PALETTE_NAMES[int(np.argmax(_PALETTE_CHROMA @ (chroma / norm)))]


def _nearest_position(cx: float, cy: float) -> str:
    return min(POSITIONS, key=lambda n: (POSITIONS[n][0] - cx) ** 2 + (POSITIONS[n][1] - cy) ** 2)


def _soft_fill_ratio(sal: np.ndarray, comp: np.ndarray, box: Tuple[int, int, int, int]) -> Tuple[float, float]:
    """(fill, row skewness): area / (max column mass * max row mass) of the soft coverage around the component.

    For the three demo shapes this equals the bounding-box fill ratio (square a*a/(a*a), circle (pi d^2/4)/(d*d),
    triangle (b*h/2)/(h*b)) but it is made of sums, not of pixel extents: a thresholded box is off by a whole
    pixel row whenever an edge sits at half coverage (a 20% error on a 12 px shape), whereas sums of coverage are
    exact for antialiased edges, preserved by blur and average noise out."""
    h, w = sal.shape
    y0, y1, x0, x1 = box
    pad = max(2, round(0.06 * max(h, w)))  # room for the blurred rim: ~2 sigma of a mild blur
    win = (slice(max(0, y0 - pad), min(h, y1 + pad + 1)), slice(max(0, x0 - pad), min(w, x1 + pad + 1)))
    comp_sal = sal[comp]
    level = float(np.median(comp_sal[comp_sal >= np.median(comp_sal)]))  # full-coverage saliency
    floor = float(np.median(sal[~comp])) if (~comp).any() else 0.0  # background noise level
    # Not clipped: clipping noise at 0 or 1 would bias the sums; unclipped noise averages out.
    alpha = (sal[win] - floor) / max(level - floor, 1e-6)
    col_mass, row_mass = alpha.sum(axis=0), alpha.sum(axis=1)
    denom = _robust_max(col_mass) * _robust_max(row_mass)
    fill = float(alpha.sum()) / denom if denom > 1e-6 else 0.0
    return fill, _skewness(row_mass)


def _robust_max(profile: np.ndarray) -> float:
    """Mean of the top 3 values: the plain max of a noisy profile is biased upwards; squares and circles have
    flat-topped profiles, so the top 3 stay at the true peak."""
    return float(np.sort(profile)[-3:].mean())


def _skewness(mass: np.ndarray) -> float:
    """Skewness of a mass profile (negatives clipped to 0: here noise below the floor carries no mass).
    An apex-up triangle's row mass grows linearly downwards: skewness -0.57; circles and squares: 0."""
    m = np.clip(mass, 0.0, None)
    total = float(m.sum())
    if total <= 1e-6:
        return 0.0
    pos = np.arange(m.size, dtype=np.float64)
    mean = float((m * pos).sum()) / total
    var = float((m * (pos - mean) ** 2).sum()) / total
    return float((m * (pos - mean) ** 3).sum()) / total / max(var, 1e-6) ** 1.5


def _shape_from(fill: float, skew: float) -> str:
    # The triangle is the only shape that is top-bottom asymmetric: skewness separates it even where blur has
    # pushed its fill ratio up towards the circle's; a very low fill is a triangle whatever its orientation.
    if skew < TRIANGLE_MAX_SKEW or fill < TRIANGLE_MAX_FILL:
        return "triangle"
    return "circle" if fill < CIRCLE_MAX_FILL else "square"


def analyze(image: Image.Image | np.ndarray) -> Reading:
    """The best-guess attributes of `image` and the measurements they come from."""
    rgb = to_float_rgb(image)
    h, w = rgb.shape[:2]
    sal = _saliency(rgb)
    peak = float(np.percentile(sal, SALIENCY_PERCENTILE))
    mask = sal > FOREGROUND_REL_THRESHOLD * peak
    if not mask.any():  # flat saliency (e.g. a uniform image): nothing exceeds the threshold; take the maxima
        mask = sal >= sal.max()
    comp = _largest_component(mask)
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    area = float(comp.sum())
    fill, skew = _soft_fill_ratio(sal, comp, (y0, y1, x0, x1))
    # Color from the most salient half of the component: its blurred rim is a mix with the background.
    comp_sal = sal[comp]
    core = rgb[comp][comp_sal >= np.median(comp_sal)]
    cx, cy = (x0 + x1 + 1) / 2.0 / w, (y0 + y1 + 1) / 2.0 / h
    return Reading(color=_nearest_color(core), shape=_shape_from(fill, skew), position=_nearest_position(cx, cy),
                   fill_ratio=fill, row_skewness=skew, foreground_fraction=area / float(h * w),
                   saliency_peak=peak, center=(cx, cy))


def read_attributes(image: Image.Image | np.ndarray) -> Dict[str, str]:
    """{'color': ..., 'shape': ..., 'position': ...}: always a best guess, whatever the image shows."""
    return analyze(image).as_dict()
