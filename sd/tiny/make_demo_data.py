"""Deterministic synthetic captioned-image dataset: one saturated shape on a neutral gray background.

It is the embedded default of the quickstart and of the tests, so it must be (a) byte-for-byte reproducible from a
seed, (b) learnable by a tiny diffusion model at 32 px in a few hundred steps, and (c) machine-checkable: every
jsonl line carries the attributes its caption states, and sd/tiny/demo_attributes.py reads them back from pixels
so a generated image can be judged against its prompt.

Design choices (why):
- 6 colors 60 degrees apart in hue, all highly saturated: they survive blur and noise (hue is kept when a color
  mixes with gray) and the background, which is gray, has no chroma at all, so the two can never be confused.
- 3 axis-aligned shapes whose bounding-box fill ratios are far apart (square 1.0, circle 0.785, triangle 0.5):
  one scalar tells them apart even on a blurry image.
- 5 positions whose anchors are >= 0.25 of the side apart; the shape is 35-45% of the side with a little jitter.
- Attribute combinations (6*3*5 = 90) are drawn in shuffled full cycles, so any 90 consecutive images hold every
  combination once; cycle k is shuffled by its own rng, so a smaller dataset is a prefix of a larger one.
- Mixed aspect ratios (--aspect_ratios 1:1,4:3,3:4,2:1, for aspect-ratio buckets): image i takes the list's
  (i mod n)-th ratio, so the count of each is exact; the shorter side is --image_size. Positions are fractions of
  the width and the height, and the shape's size a fraction of the shorter side (a circle stays round), so the
  attribute reader reads them alike. The default (1:1) writes exactly the square dataset.

    python sd/tiny/make_demo_data.py --output_dir D --num_images N --image_size S --seed K [--format png|jpg] \
        [--aspect_ratios 1:1,4:3,3:4,2:1]
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from sd.paths import REPO_ROOT

# name -> RGB. Hues 0/60/120/180/240/300 degrees; chroma (max - min) >= 145 for every entry (gray has 0).
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (225, 205, 30),
    "green": (40, 185, 50),
    "cyan": (30, 195, 205),
    "blue": (40, 70, 225),
    "magenta": (205, 45, 200),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# name -> shape center as a fraction of the image side (x, y), y growing downwards.
POSITIONS: Dict[str, Tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}

SHAPE_SIZE_RANGE = (0.35, 0.45)  # side of the shape's bounding box / image side
POSITION_JITTER = 0.03  # max center shift, fraction of the side: variety without leaving the anchor's cell
COLOR_JITTER = 12  # max per-channel shift of the shape color, keeps samples varied but never near another color
BACKGROUND_GRAY_RANGE = (70, 180)  # mid grays: both dark (blue) and light (yellow) shapes stand out
BACKGROUND_GRADIENT = 12.0  # max top-to-bottom brightness change of the background
BACKGROUND_NOISE_STD = 2.0  # mild, gray (same on all channels, so it adds no chroma)
SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges at any size, even 16 px
JPEG_QUALITY = 95
FORMATS = ("png", "jpg")
SQUARE = ((1, 1),)
JSONL_NAME = "demo.jsonl"
IMAGES_DIR = "images"


def caption_for(color: str, shape: str, position: str) -> str:
    """'a red circle at the top left' / 'a red circle in the center'."""
    _check_attributes(color, shape, position)
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {color} {shape} {where}"


def _check_attributes(color: str, shape: str, position: str) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {sorted(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {list(POSITIONS)}")


def parse_aspect_ratios(text: str) -> Tuple[Tuple[int, int], ...]:
    """"1:1,4:3" -> ((1, 1), (4, 3)): width:height pairs of positive integers, each at most 4:1."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"aspect ratio {item.strip()!r} is not W:H with positive integers (e.g. 4:3)")
        w, h = int(parts[0]), int(parts[1])
        if max(w, h) > 4 * min(w, h):
            raise ValueError(f"aspect ratio {w}:{h} is beyond 4:1")
        out.append((w, h))
    return tuple(out)


def image_dims(image_size: int, aspect: Tuple[int, int]) -> Tuple[int, int]:
    """(width, height) of an image of ratio aspect (w:h) whose shorter side is image_size."""
    w, h = aspect
    return (round(image_size * w / h), image_size) if w >= h else (image_size, round(image_size * h / w))


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Gray level + vertical gradient + gray noise, as float32 HxWx3 in [0, 255]."""
    level = rng.uniform(*BACKGROUND_GRAY_RANGE)
    slope = rng.uniform(-BACKGROUND_GRADIENT, BACKGROUND_GRADIENT)
    ramp = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None] * slope
    gray = level + ramp + rng.normal(0.0, BACKGROUND_NOISE_STD, (height, width)).astype(np.float32)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _shape_mask(shape: str, cx: float, cy: float, side: float, width: int, height: int) -> np.ndarray:
    """Antialiased coverage in [0, 1] (HxW float32) of the shape, drawn at SUPERSAMPLE x and box-downsampled."""
    s = SUPERSAMPLE
    x0, y0 = (cx - side / 2) * s, (cy - side / 2) * s
    x1, y1 = (cx + side / 2) * s, (cy + side / 2) * s
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    else:  # triangle: apex up, base at the bottom of the box, so its bbox fill ratio is 0.5
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(color: str, shape: str, position: str, image_size: int, rng: np.random.Generator,
           aspect: Tuple[int, int] = (1, 1)) -> Image.Image:
    """One RGB image of `image_size` x `image_size`, or of ratio `aspect` (w:h) with that shorter side. All
    randomness (background, jitter) comes from `rng`, drawn in the same order whatever the ratio."""
    _check_attributes(color, shape, position)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    width, height = image_dims(image_size, aspect)
    side = rng.uniform(*SHAPE_SIZE_RANGE) * min(width, height)
    ax, ay = POSITIONS[position]
    cx = (ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * width
    cy = (ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * height
    rgb = np.asarray(COLORS[color], dtype=np.float32) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
    bg = _background(width, height, rng)
    alpha = _shape_mask(shape, cx, cy, side, width, height)[:, :, None]
    out = bg * (1.0 - alpha) + rgb[None, None, :] * alpha
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def attribute_sequence(num_images: int, seed: int) -> List[Tuple[str, str, str]]:
    """(color, shape, position) for images 0..num_images-1: shuffled full cycles over all combinations."""
    combos = list(itertools.product(COLORS, SHAPES, POSITIONS))
    out: List[Tuple[str, str, str]] = []
    cycle = 0
    while len(out) < num_images:
        order = np.random.default_rng([seed, 1, cycle]).permutation(len(combos))
        out.extend(combos[i] for i in order)
        cycle += 1
    return out[:num_images]


def generate_demo_dataset(output_dir: str, num_images: int, image_size: int = 64, seed: int = 0,
                          fmt: str = "png", aspect_ratios: Sequence[Tuple[int, int]] = SQUARE) -> str:
    """Write OUTPUT_DIR/images/NNNNNN.<fmt> and OUTPUT_DIR/demo.jsonl; return the jsonl path.

    Image i is rendered from rng seeded with (seed, 0, i), so any image can be regenerated alone and the output
    does not depend on num_images beyond its length. With `aspect_ratios` other than square, image i has the
    (i mod n)-th ratio and its record says which ("aspect_ratio": "4:3")."""
    aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
    mixed = aspect_ratios != SQUARE
    if not aspect_ratios:
        raise ValueError("aspect_ratios must name at least one ratio")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    image_dir = os.path.join(output_dir, IMAGES_DIR)
    os.makedirs(image_dir, exist_ok=True)
    jsonl_path = os.path.join(output_dir, JSONL_NAME)
    tmp_path = jsonl_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        for i, (color, shape, position) in enumerate(attribute_sequence(num_images, seed)):
            aspect = aspect_ratios[i % len(aspect_ratios)]
            image = render(color, shape, position, image_size, np.random.default_rng([seed, 0, i]), aspect)
            rel = f"{IMAGES_DIR}/{i:06d}.{fmt}"
            if fmt == "png":
                image.save(os.path.join(output_dir, rel), format="PNG")
            else:
                image.save(os.path.join(output_dir, rel), format="JPEG", quality=JPEG_QUALITY)
            record = {"caption": caption_for(color, shape, position), "image": rel,
                      "color": color, "shape": shape, "position": position}
            if mixed:  # the square dataset's records stay as they were, byte for byte
                record["aspect_ratio"] = f"{aspect[0]}:{aspect[1]}"
            f.write(json.dumps(record) + "\n")
    # The jsonl appears only once every image it names exists: a reader never sees a half-written dataset.
    os.replace(tmp_path, jsonl_path)
    return jsonl_path


def make_demo_parts(out_dir: str, num_images: int, image_size: int = 32, seed: int = 0, per_part: int = 24,
                    name: str = "demo", aspect_ratios: Sequence[Tuple[int, int]] = SQUARE) -> str:
    """A demo dataset written as part files by the real data tool (its own process, as a user runs it); returns
    the .filelist.list path. Tests and benchmarks build their data through here."""
    jsonl = generate_demo_dataset(os.path.join(out_dir, "raw"), num_images, image_size=image_size, seed=seed,
                                  aspect_ratios=aspect_ratios)
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "create_pretraining_data.py"), "--input_path", jsonl,
                    "--output_path", out_dir, "--output_name", name, "--per_part_file_num", str(per_part),
                    "--save_gzip_file", "--num_workers", "1"], check=True, capture_output=True, cwd=REPO_ROOT)
    return os.path.join(out_dir, "filelist", f"{name}.filelist.list")


@dataclass
class DemoDataArguments:
    output_dir: str = field(metadata={"help": "Folder for images/ and demo.jsonl."})
    num_images: int = field(default=900, metadata={"help": "900 = 10 images of each of the 90 combinations."})
    image_size: int = field(default=64, metadata={"help": "Side of the square images (the shorter side), pixels."})
    seed: int = field(default=0, metadata={"help": "Seed of the shapes' jitter and backgrounds."})
    format: str = field(default="png", metadata={"help": "Image file format.", "choices": list(FORMATS)})
    aspect_ratios: str = field(
        default="1:1", metadata={"help": "Width:height ratios, cycled over the images (e.g. 1:1,4:3,3:4,2:1 for "
                                         "aspect-ratio buckets); 1:1 is the square dataset."})

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"--num_images must be >= 1, got {self.num_images}")
        try:
            parse_aspect_ratios(self.aspect_ratios)
        except ValueError as e:
            raise ValueError(f"--aspect_ratios {self.aspect_ratios!r}: {e}") from None


def main(argv: List[str] | None = None) -> int:
    from sd.config import parse_args

    (args,) = parse_args([DemoDataArguments], argv)
    path = generate_demo_dataset(args.output_dir, args.num_images, args.image_size, args.seed, args.format,
                                 parse_aspect_ratios(args.aspect_ratios))
    print(f"wrote {args.num_images} images of {args.image_size}px (aspect ratios {args.aspect_ratios}) and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
