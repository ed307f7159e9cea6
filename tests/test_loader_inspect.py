"""data_tools/inspect_data.py: grid.png + samples.jsonl + inspect_config.json through the training dataset class,
and its command line generated from training's DataArguments plus its own InspectArguments."""
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
from helpers import ROOT, image_bytes, tiny_clip_tokenizer, write_filelist_list, write_source
from sd.config import parse_args
from trainer.loader.config import DataArguments


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
    rc = inspect_data.main(["--file_list", fl, "--resolution", "16", "--num_samples", "7", "--output_dir", out,
                            "--min_image_size", "8", "--caption_dropout_prob", "0.5", "--seed", "3",
                            "--tokenizer", str(tok_dir), "--model_max_length", "10"])
    assert rc == 0
    rows = _check_outputs(out, 7, 16)
    assert any(r["caption_dropped"] for r in rows) and any(not r["caption_dropped"] for r in rows)
    assert all(len(r["input_ids"]) == 10 for r in rows)
    printed = capsys.readouterr().out
    skips = json.loads(printed.split("skipped records: ")[1].splitlines()[0])
    assert skips["bad_fields"] >= 1 and skips["too_small"] >= 1
    with open(os.path.join(out, "inspect_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["data"]["resolution"] == 16 and saved["data"]["caption_dropout_prob"] == 0.5
    assert saved["inspect"]["seed"] == 3 and saved["inspect"]["model_max_length"] == 10
    assert saved["file_list"] == os.path.abspath(fl) and saved["tokenizer"] == os.path.abspath(tok_dir)


@pytest.mark.unit
def test_parser_accepts_every_flag_it_accepted_before(tmp_path):
    """Every flag of tests/golden/entry_flags.json for inspect, bare booleans included, parsed into the
    dataclasses; unset flags take training's defaults."""
    with open(os.path.join(ROOT, "tests", "golden", "entry_flags.json"), encoding="utf-8") as f:
        golden = json.load(f)["entries"]["data_tools/inspect_data.py"]
    fl = _data(str(tmp_path / "data"))
    os.makedirs(tmp_path / "tok")
    argv = ["--file_list", fl, "--output_dir", str(tmp_path / "o"), "--center_crop", "--random_flip",
            "--caption_dropout_prob", "0.2", "--data_format", "laion_aes", "--interpolation", "bicubic",
            "--min_image_size", "4", "--model_max_length", "12", "--num_samples", "3", "--resolution", "256",
            "--seed", "7", "--shuffle_buffer_size", "8", "--tokenizer", str(tmp_path / "tok")]
    assert sorted(a for a in argv if a.startswith("--")) == sorted(golden)
    data, inspect = parse_args((DataArguments, inspect_data.InspectArguments), argv)
    assert data == DataArguments(fl, resolution=256, data_format="laion_aes", interpolation="bicubic",
                                 center_crop=True, random_flip=True, min_image_size=4, caption_dropout_prob=0.2,
                                 buffer_size=8)
    assert inspect == inspect_data.InspectArguments(str(tmp_path / "o"), num_samples=3, seed=7,
                                                    tokenizer=str(tmp_path / "tok"), model_max_length=12)
    data, inspect = parse_args((DataArguments, inspect_data.InspectArguments),
                               ["--file_list", fl, "--output_dir", "o", "--center_crop", "False"])
    assert data == DataArguments(fl) and data.resolution == 512 and not data.center_crop
    assert inspect.num_samples == 16 and inspect.seed == 42 and inspect.tokenizer is None


@pytest.mark.unit
@pytest.mark.parametrize("flag,value,error", [("--num_samples", "0", ValueError), ("--seed", "-1", ValueError),
                                              ("--model_max_length", "1", ValueError),
                                              ("--tokenizer", "no/such/folder", FileNotFoundError)])
def test_bad_inspect_values_are_one_clear_error(tmp_path, flag, value, error):
    fl = _data(str(tmp_path / "data"))
    with pytest.raises(error, match=f"{flag}.*{value}"):
        inspect_data.main(["--file_list", fl, "--output_dir", str(tmp_path / "o"), flag, value])
    assert not os.path.exists(tmp_path / "o")


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
