"""The demo dataset's mixed-aspect variant (sd/tiny/make_demo_data.py --aspect_ratios): exact ratio counts, the
square default unchanged byte for byte, and the attribute reader reading the non-square images."""
import hashlib
import json
import os
from collections import Counter

import pytest
from PIL import Image

from sd.tiny.demo_attributes import read_attributes
from sd.tiny.make_demo_data import (DemoDataArguments, generate_demo_dataset, image_dims, main,
                                    parse_aspect_ratios)

pytestmark = pytest.mark.unit

# sha256 of images/*.png (sorted) then demo.jsonl for 6 images of 32 px, seed 0, as written before --aspect_ratios
# existed: the default output must not move.
SQUARE_DIGEST = "c9b955766620dad19d448c7b3c81a74072b898aa53fd56aed9e0d734a87211f9"


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(folder, "images"))):
        h.update(open(os.path.join(folder, "images", name), "rb").read())
    h.update(open(os.path.join(folder, "demo.jsonl"), "rb").read())
    return h.hexdigest()


def test_the_square_default_is_unchanged(tmp_path):
    generate_demo_dataset(str(tmp_path / "a"), 6, 32, seed=0)
    assert _digest(str(tmp_path / "a")) == SQUARE_DIGEST
    generate_demo_dataset(str(tmp_path / "b"), 6, 32, seed=0, aspect_ratios=parse_aspect_ratios("1:1"))
    assert _digest(str(tmp_path / "b")) == SQUARE_DIGEST


def test_mixed_aspect_images_are_read_back_exactly(tmp_path):
    ratios = parse_aspect_ratios("1:1,4:3,3:4,2:1,1:2")
    assert main(["--output_dir", str(tmp_path), "--num_images", "90", "--image_size", "32",
                 "--aspect_ratios", "1:1,4:3,3:4,2:1,1:2"]) == 0
    with open(tmp_path / "demo.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert Counter(r["aspect_ratio"] for r in records) == {f"{w}:{h}": 18 for w, h in ratios}
    wrong = Counter()
    for i, rec in enumerate(records):
        image = Image.open(tmp_path / rec["image"])
        assert image.size == image_dims(32, ratios[i % len(ratios)])
        got = read_attributes(image)
        wrong.update(a for a in ("color", "shape", "position") if got[a] != rec[a])
    assert not wrong, wrong  # positions are fractions of width and height, sizes of the shorter side


def test_aspect_ratio_flag_is_checked():
    assert image_dims(32, (2, 1)) == (64, 32) and image_dims(30, (3, 4)) == (30, 40)
    for bad in ("1", "0:1", "a:b", "5:1", "1:1,"):
        with pytest.raises(ValueError, match="aspect"):
            DemoDataArguments("out", aspect_ratios=bad)
