"""The demo dataset (sd/tiny/make_demo_data.py) and its attribute reader (sd/tiny/demo_attributes.py)."""
import hashlib
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd.tiny.demo_attributes import analyze, read_attributes
from sd.tiny.make_demo_data import (COLORS, POSITIONS, SHAPES, attribute_sequence, caption_for,
                                       generate_demo_dataset, render)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTRS = ("color", "shape", "position")


def _tree_digest(folder):
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _records(jsonl_path):
    with open(jsonl_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _degrade(image, seed):
    """Mild blur (sigma 1 px per 64 px) + gray-independent RGB noise (std 8): what a soft sample looks like."""
    size = image.size[0]
    blurred = image.filter(ImageFilter.GaussianBlur(size / 64.0))
    noise = np.random.default_rng(seed).normal(0.0, 8.0, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(np.asarray(blurred, np.float32) + noise), 0, 255).astype(np.uint8))


def _accuracy(images, records):
    hits = {a: 0 for a in ATTRS}
    for image, rec in zip(images, records):
        got = read_attributes(image)
        for a in ATTRS:
            hits[a] += got[a] == rec[a]
    return {a: hits[a] / len(records) for a in ATTRS}


@pytest.mark.unit
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _tree_digest(os.path.dirname(generate_demo_dataset(str(tmp_path / "a"), 12, 32, seed=5)))
    b = _tree_digest(os.path.dirname(generate_demo_dataset(str(tmp_path / "b"), 12, 32, seed=5)))
    c = _tree_digest(os.path.dirname(generate_demo_dataset(str(tmp_path / "c"), 12, 32, seed=6)))
    assert len(a) == 13 and a == b
    assert a["images/000000.png"] != c["images/000000.png"]


@pytest.mark.unit
def test_smaller_dataset_is_a_prefix_of_a_larger_one(tmp_path):
    small = _records(generate_demo_dataset(str(tmp_path / "s"), 5, 32, seed=1))
    big = _records(generate_demo_dataset(str(tmp_path / "b"), 20, 32, seed=1))
    assert small == big[:5]
    first5 = {f"{i:06d}.png" for i in range(5)}
    big_images = _tree_digest(str(tmp_path / "b" / "images"))
    assert _tree_digest(str(tmp_path / "s" / "images")) == {k: v for k, v in big_images.items() if k in first5}


@pytest.mark.unit
def test_records_images_and_captions(tmp_path):
    jsonl = generate_demo_dataset(str(tmp_path), 100, image_size=40, seed=0)
    assert os.path.basename(jsonl) == "demo.jsonl"
    recs = _records(jsonl)
    assert len(recs) == 100
    for i, rec in enumerate(recs):
        assert set(rec) == {"caption", "image", *ATTRS}
        assert rec["image"] == f"images/{i:06d}.png"  # relative to the jsonl's folder
        assert rec["caption"] == caption_for(rec["color"], rec["shape"], rec["position"])
        assert rec["color"] in rec["caption"] and rec["shape"] in rec["caption"] and rec["position"] in rec["caption"]
        with Image.open(os.path.join(tmp_path, rec["image"])) as im:
            assert im.size == (40, 40) and im.mode == "RGB"
    # Balanced: the first full cycle holds each of the 6*3*5 combinations exactly once.
    first_cycle = {(r["color"], r["shape"], r["position"]) for r in recs[:90]}
    assert first_cycle == set(itertools.product(COLORS, SHAPES, POSITIONS))


@pytest.mark.unit
def test_caption_wording_and_bad_attributes():
    assert caption_for("red", "circle", "top left") == "a red circle at the top left"
    assert caption_for("blue", "square", "center") == "a blue square in the center"
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        caption_for("teal", "circle", "center")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render("red", "hexagon", "center", 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        render("red", "circle", "middle", 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fmt must be one of"):
        generate_demo_dataset("/nonexistent-not-created", 1, fmt="gif")


@pytest.mark.unit
def test_palette_is_saturated_and_far_from_gray():
    # The reader separates shapes from the gray background by chroma; every color must have plenty of it.
    for name, rgb in COLORS.items():
        assert max(rgb) - min(rgb) >= 140, name
    assert len(attribute_sequence(181, 0)) == 181


@pytest.mark.unit
@pytest.mark.parametrize("size,min_acc", [(64, 0.98), (32, 0.95)])
def test_reader_accuracy_clean_and_degraded(tmp_path, size, min_acc):
    jsonl = generate_demo_dataset(str(tmp_path), 180, image_size=size, seed=11)
    recs = _records(jsonl)
    images = [Image.open(os.path.join(tmp_path, r["image"])).convert("RGB") for r in recs]
    clean = _accuracy(images, recs)
    degraded = _accuracy([_degrade(im, i) for i, im in enumerate(images)], recs)
    assert all(v >= min_acc for v in clean.values()), clean
    assert all(v >= min_acc for v in degraded.values()), degraded


@pytest.mark.unit
def test_reader_on_jpeg_and_float_chw_arrays(tmp_path):
    jsonl = generate_demo_dataset(str(tmp_path), 30, image_size=32, seed=2, fmt="jpg")
    recs = _records(jsonl)
    assert recs[0]["image"].endswith(".jpg")
    images = [Image.open(os.path.join(tmp_path, r["image"])) for r in recs]
    assert all(v >= 0.95 for v in _accuracy(images, recs).values())
    # Pipelines hand back float arrays in [0, 1], sometimes channels-first.
    arrays = [np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0 for im in images]
    assert all(v >= 0.95 for v in _accuracy(arrays, recs).values())


@pytest.mark.unit
def test_reader_always_guesses_on_weird_images():
    rng = np.random.default_rng(0)
    weird = [np.full((32, 32, 3), 128, np.uint8), rng.integers(0, 256, (32, 32, 3)).astype(np.uint8),
             np.zeros((16, 16)), np.full((8, 8, 3), np.nan, np.float32), rng.random((200, 300, 4)),
             Image.new("L", (32, 32), 40)]
    for image in weird:
        got = read_attributes(image)
        assert got["color"] in COLORS and got["shape"] in SHAPES and got["position"] in POSITIONS
    # A flat image is told apart from a real read by its saliency peak.
    assert analyze(weird[0]).saliency_peak == 0.0
    assert analyze(render("red", "circle", "center", 32, rng)).saliency_peak > 100.0
    with pytest.raises(ValueError, match="image array"):
        read_attributes(np.zeros((2, 3, 4, 5)))


@pytest.mark.unit
def test_cli_writes_the_dataset(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sd", "tiny", "make_demo_data.py"),
                           "--output_dir", str(out), "--num_images", "7", "--image_size", "32", "--seed", "3",
                           "--format", "png"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recs = _records(out / "demo.jsonl")
    assert len(recs) == 7 and all((out / r["image"]).is_file() for r in recs)
    assert _tree_digest(str(out)) == _tree_digest(os.path.dirname(generate_demo_dataset(str(tmp_path / "api"), 7,
                                                                                        32, seed=3)))
