"""Builders of small real datasets for the loader tests (imported by the other test_loader_* modules), and
tests that what they write reads back through part_format."""
from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from PIL import Image

from data_tools.part_format import (DATA_DIR_NAME, FILELIST_DIR_NAME, FORMAT_VERSION, encode_record,
                                    iter_part_lines, manifest_path, parse_record, write_text_atomic)


def image_bytes(w: int, h: int, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small image whose pixels depend on `seed`, so different records hash differently."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def aes_line(caption_en: Optional[str], blip: Optional[str], img: bytes) -> bytes:
    """A laion_aes record: field 3 a JSON object with the captions, field 6 the base64 image."""
    meta = {k: v for k, v in (("caption_en", caption_en), ("blip_caption_en", blip)) if v is not None}
    fields = ["http://x/img.jpg", "NONE", json.dumps(meta), "0.9", "6.1", base64.b64encode(img).decode()]
    return "\t".join(fields).encode() + b"\n"


def write_part(path: str, lines: Sequence[bytes], gzipped: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"".join(lines)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gzipped else data)
    return path


def write_source(root: str, name: str, parts: Sequence[Sequence[bytes]], gzipped: bool = False,
                 data_format: Optional[str] = None, repeat: int = 1) -> str:
    """Parts under root/<name>/laion400m_format_data, a filelist naming them (relative paths, each part
    `repeat` times as the reference's num_repeat) and, when data_format is given, a manifest. Returns the
    .filelist path."""
    out = os.path.join(root, name)
    paths = [write_part(os.path.join(out, DATA_DIR_NAME, f"part-{i:06d}" + (".gz" if gzipped else "")),
                        lines, gzipped) for i, lines in enumerate(parts)]
    fl = os.path.join(out, FILELIST_DIR_NAME, f"{name}.filelist")
    os.makedirs(os.path.dirname(fl), exist_ok=True)
    rel = [os.path.relpath(p, os.path.dirname(fl)) for p in paths for _ in range(repeat)]
    write_text_atomic(fl, "\n".join(rel) + "\n")
    if data_format is not None:
        manifest = {"format_version": FORMAT_VERSION, "data_format": data_format,
                    "parts": [os.path.basename(p) for p in paths]}
        write_text_atomic(manifest_path(out, name), json.dumps(manifest))
    return fl


def write_filelist_list(path: str, entries: Sequence[Tuple[str, Optional[float]]]) -> str:
    lines = [fl if w is None else f"{fl} {w}" for fl, w in entries]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def records(tag: str, n: int, size: Tuple[int, int] = (24, 20), seed0: int = 0) -> List[bytes]:
    """n laion400m lines with captions `<tag>-<i>` and distinct tiny JPEGs."""
    return [encode_record(f"{tag}-{i}", image_bytes(size[0], size[1], seed=seed0 + i)) for i in range(n)]


def simple_dataset(root: str, sources: Sequence[Tuple[str, int, int, Optional[float]]], res_size=(24, 20),
                   gzipped: bool = False) -> Tuple[str, Dict[str, int]]:
    """A .filelist.list over sources (name, n_parts, records_per_part, weight) of laion400m parts whose
    captions are `<name>/p<part>-<i>`. Returns (path, records per source)."""
    entries, counts = [], {}
    for k, (name, n_parts, per_part, weight) in enumerate(sources):
        parts = [records(f"{name}/p{p}", per_part, res_size, seed0=1000 * k + 100 * p) for p in range(n_parts)]
        entries.append((write_source(root, name, parts, gzipped), weight))
        counts[name] = n_parts * per_part
    return write_filelist_list(os.path.join(root, "train.filelist.list"), entries), counts


@contextlib.contextmanager
def open_loader(dataset) -> Iterator:
    """An iterator over build_dataloader(dataset) whose worker processes are stopped on exit. Paddle's
    multi-process iterator is referenced by its own reader thread, so dropping it never collects it and its
    workers would live until the interpreter exits; _try_shutdown_all is what its __del__ would call."""
    from trainer.text_image_dataset import build_dataloader

    it = iter(build_dataloader(dataset))
    try:
        yield it
    finally:
        shutdown = getattr(it, "_try_shutdown_all", None)
        if shutdown is not None:
            shutdown()


@pytest.mark.unit
def test_written_parts_read_back(tmp_path):
    fl = write_source(str(tmp_path), "a", [records("a", 3)], gzipped=True)
    part = os.path.join(os.path.dirname(os.path.dirname(fl)), DATA_DIR_NAME, "part-000000.gz")
    got = [parse_record(raw, "laion400m")[0] for _, raw in iter_part_lines(part)]
    assert got == ["a-0", "a-1", "a-2"]
    caption, img = parse_record(aes_line(None, "blip words", image_bytes(8, 8)), "laion_aes")
    assert caption == "blip words" and Image.open(io.BytesIO(img)).size == (8, 8)
