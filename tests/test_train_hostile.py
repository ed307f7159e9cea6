"""The training job itself against hostile input: a data source that yields nothing usable ends train.py (and the
reference's entry name) within seconds with one line and exit code 1, with 0 or more DataLoader workers; a bad flag
or path is one line too. Nothing hangs: every run has a timeout."""
import os
import subprocess

import pytest

from data_tools.part_format import encode_record
from helpers import PY, ROOT, TINY_INIT, truncated_jpeg, write_filelist_list, write_source

pytestmark = pytest.mark.smoke


def train(entry: str, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, entry, *flags], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def base_flags(file_list: str, out: str, workers: int):
    return ["--do_train", "--pretrained_model_name_or_path", TINY_INIT, "--file_list", file_list,
            "--output_dir", out, "--resolution", "32", "--per_device_train_batch_size", "2", "--max_steps", "3",
            "--image_logging_steps", "0", "--report_to", "none", "--dataloader_num_workers", str(workers),
            "--max_consecutive_skips", "20"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_source_of_truncated_images_ends_the_run_with_one_line(tmp_path, workers):
    bad = [[encode_record(f"cut {i}", truncated_jpeg(i)) for i in range(30)]]
    fl = write_filelist_list(str(tmp_path / "bad.filelist.list"), [(write_source(str(tmp_path), "bad", bad), None)])
    proc = train("train.py", *base_flags(fl, str(tmp_path / "out"), workers))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith("error: ") and "bad.filelist" in last and "bad_image" in last, last
    assert "Traceback" not in proc.stderr


def test_configuration_errors_are_one_line_through_the_reference_entry(tmp_path):
    fl = write_filelist_list(str(tmp_path / "x.filelist.list"), [("nowhere.filelist", None)])
    proc = train("train_txt2img_laion400m_trainer.py", *base_flags(fl, str(tmp_path / "out"), 0))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nowhere.filelist" in proc.stderr
    proc = train("train.py", *base_flags(fl, str(tmp_path / "o2"), 0), "--gradient_accumulation_steps", "0")
    assert proc.returncode == 1 and "--gradient_accumulation_steps must be >= 1" in proc.stderr.splitlines()[-1]
