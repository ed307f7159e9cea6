"""Shared helpers of tests/test_create_data*.py: tiny real images and jsonl files, reading a dataset back."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Dict, Iterable, List, Tuple, Union

import numpy as np
from PIL import Image

from data_tools.create_data import CreateConfig, run
from data_tools.part_format import iter_part_lines, parse_record, read_filelist, read_filelist_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "create_pretraining_data.py")


def image_bytes(w: int = 40, h: int = 32, fmt: str = "JPEG", seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def write_image(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_jsonl(path: str, lines: Iterable[Union[dict, str]]) -> str:
    """dict lines are JSON-encoded; str lines are written verbatim (for malformed and blank lines)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ln in lines:
            f.write((json.dumps(ln, ensure_ascii=False) if isinstance(ln, dict) else ln) + "\n")
    return path


def good_corpus(folder: str, n: int) -> Tuple[str, List[Tuple[str, bytes]]]:
    """n valid records (mixed JPEG/PNG, RGB/L/RGBA/P) -> (jsonl path, [(caption, image bytes)])."""
    fmts = [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "L")]
    expect, lines = [], []
    for i in range(n):
        fmt, mode = fmts[i % len(fmts)]
        data = image_bytes(32 + i % 7, 24 + i % 5, fmt, seed=i, mode=mode)
        rel = f"img/{i:04d}.{fmt.lower()}"
        write_image(os.path.join(folder, rel), data)
        caption = f"a photo number {i}"
        lines.append({"caption": caption, "image": rel, "image_id": f"id_{i}"})
        expect.append((caption, data))
    return write_jsonl(os.path.join(folder, "data.jsonl"), lines), expect


def make(inputs: List[str], out: str, **kw) -> dict:
    """Run in-process with no pool (fast) unless num_workers is given; returns the manifest."""
    kw.setdefault("num_workers", 0)
    return run(CreateConfig(input_path=inputs, output_path=out, **kw), log=lambda m: None).manifest


def read_dataset(out: str, name: str = "custom_dataset") -> List[Tuple[str, bytes]]:
    """Every record the filelist.list of NAME leads to, via part_format's reader (one per listed part)."""
    sources = read_filelist_list(os.path.join(out, "filelist", f"{name}.filelist.list"))
    records = []
    for src in sources:
        for part in dict.fromkeys(src.parts):  # num_repeat lists a part several times
            for _, raw in iter_part_lines(part):
                assert raw.count(b"\t") == 2 and raw.endswith(b"\n") and b"\n" not in raw[:-1]
                records.append(parse_record(raw, "laion400m"))
    return records


def read_rejects(out: str, name: str = "custom_dataset") -> List[dict]:
    with open(os.path.join(out, f"{name}.rejects.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def part_files(out: str) -> Dict[str, bytes]:
    folder = os.path.join(out, "laion400m_format_data")
    return {fn: open(os.path.join(folder, fn), "rb").read() for fn in sorted(os.listdir(folder))}


def filelist_names(out: str, name: str = "custom_dataset") -> List[str]:
    return [os.path.basename(p) for p in read_filelist(os.path.join(out, "filelist", f"{name}.filelist"))]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
