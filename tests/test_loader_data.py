"""The loader tests' dataset builders (tests/helpers.py) write what part_format reads back."""
from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from data_tools.part_format import DATA_DIR_NAME, iter_part_lines, parse_record
from helpers import aes_line, image_bytes, records, write_source


@pytest.mark.unit
def test_written_parts_read_back(tmp_path):
    fl = write_source(str(tmp_path), "a", [records("a", 3)], gzipped=True)
    part = os.path.join(os.path.dirname(os.path.dirname(fl)), DATA_DIR_NAME, "part-000000.gz")
    got = [parse_record(raw, "laion400m")[0] for _, raw in iter_part_lines(part)]
    assert got == ["a-0", "a-1", "a-2"]
    caption, img = parse_record(aes_line(None, "blip words", image_bytes(8, 8)), "laion_aes")
    assert caption == "blip words" and Image.open(io.BytesIO(img)).size == (8, 8)
