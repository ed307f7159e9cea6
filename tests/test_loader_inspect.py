"""data_tools/inspect_data.py: grid.png + samples.jsonl through the training dataset class."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools import inspect_data
from data_tools.part_format import encode_record
from helpers import image_bytes, write_filelist_list, write_source
from helpers import tiny_clip_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(root: str) -> str:
    """Solid-colour images so the grid can be checked pixel by pixel against the captions."""
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    lines = []
    for name, rgb in colours.items():
        img = Image.new("RGB", (20, 16), rgb)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        lines.append(encode_record(f"a {name} square", buf.getvalue()))
    lines.append(b"not a record\n")
    lines.append(encode_record("too small", image_bytes(4, 4)))
    fl = write_source(root, "colours", [lines], data_format="laion400m")
    return write_filelist_list(os.path.join(root, "c.filelist.list"), [(fl, None)])


def _check_outputs(out: str, n: int, res: int) -> list:
    rows = [json.loads(ln) for ln in open(os.path.join(out, "samples.jsonl"), encoding="utf-8")]
    assert len(rows) == n and [r["index"] for r in rows] == list(range(n))
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")).convert("RGB"))
    cols = int(np.ceil(np.sqrt(n)))
    expect = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for r in rows:
        assert r["part"].endswith("part-000000") and r["source"].endswith("colours.filelist")
        assert r["line"] in (1, 2, 3) and r["raw_caption"].split()[1] in expect
        y, x = 2 + (r["index"] // cols) * (res + 2), 2 + (r["index"] % cols) * (res + 2)
        tile = grid[y:y + res, x:x + res].reshape(-1, 3).mean(axis=0)
        assert np.abs(tile - expect[r["raw_caption"].split()[1]]).max() < 3, (r, tile)
    return rows


@pytest.mark.unit
def test_inspect_writes_grid_and_samples_with_tokens(tmp_path, capsys):
    fl = _data(str(tmp_path / "data"))
    tok_dir = tmp_path / "tok"
    os.makedirs(tok_dir)
    tiny_clip_tokenizer(str(tok_dir))  # writes vocab.json + merges.txt, loadable with from_pretrained
    out = str(tmp_path / "inspect")
    rc = inspect_data.main(["--file_list", fl, "--resolution", "12", "--num_samples", "7", "--output_dir", out,
                            "--min_image_size", "8", "--caption_dropout_prob", "0.5", "--seed", "3",
                            "--tokenizer", str(tok_dir), "--model_max_length", "10"])
    assert rc == 0
    rows = _check_outputs(out, 7, 12)
    assert any(r["caption_dropped"] for r in rows) and any(not r["caption_dropped"] for r in rows)
    assert all(len(r["input_ids"]) == 10 for r in rows)
    printed = capsys.readouterr().out
    skips = json.loads(printed.split("skipped records: ")[1].splitlines()[0])
    assert skips["bad_fields"] >= 1 and skips["too_small"] >= 1


@pytest.mark.smoke
def test_inspect_runs_as_a_script(tmp_path):
    fl = _data(str(tmp_path / "data"))
    out = str(tmp_path / "inspect")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "inspect_data.py"), "--file_list", fl,
                           "--resolution", "16", "--num_samples", "4", "--output_dir", out,
                           "--caption_dropout_prob", "0"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped records:" in proc.stdout and '"bad_fields"' in proc.stdout
    rows = _check_outputs(out, 4, 16)
    assert all(r["caption"] == r["raw_caption"] for r in rows)
