"""Resolution stages end to end, offline: the mixed-aspect demo dataset through create_pretraining_data.py, 2
steps at 32 px, then a resume at 64 px, refused without --allow_resolution_change (one line) and, with it, trained
with aspect-ratio buckets on non-square batches while weights, EMA, optimizer and schedule continue."""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from helpers import PY, ROOT, TINY_INIT
from sd.tiny.make_demo_data import make_demo_parts

pytestmark = pytest.mark.smoke

MIXED = ((1, 1), (4, 3), (3, 4), (2, 1))


def train(out_dir, file_list, *extra):
    cmd = [PY, os.path.join(ROOT, "train.py"), "--do_train", "--pretrained_model_name_or_path", TINY_INIT,
           "--file_list", file_list, "--output_dir", str(out_dir), "--per_device_train_batch_size", "4",
           "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "23", "--disable_tqdm", "True",
           "--save_steps", "2", "--image_logging_steps", "0", "--report_to", "none", "--use_ema", "True",
           "--dataloader_num_workers", "0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resolution_stage_is_explicit_and_keeps_the_training_state(tmp_path):
    fl = make_demo_parts(str(tmp_path / "data"), 48, image_size=32, aspect_ratios=MIXED)
    out = tmp_path / "run"
    first = train(out, fl, "--resolution", "32", "--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]

    refused = train(out, fl, "--resolution", "64", "--max_steps", "4")
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--allow_resolution_change" in last and "32 px" in last, last
    assert not (out / "checkpoint-4").exists()
    # Refused at start, before a model exists: the run's saved config is still the first stage's.
    assert "loading" not in refused.stderr.lower().split("error: ")[-1]
    assert json.loads((out / "train_config.json").read_text())["data"]["resolution"] == 32

    staged = train(out, fl, "--resolution", "64", "--max_steps", "4", "--aspect_ratio_buckets", "64",
                   "--bucket_step", "16", "--allow_resolution_change", "True")
    log = staged.stdout + staged.stderr
    assert staged.returncode == 0, log[-3000:]
    assert "resumed weights and loader position" in log
    assert "32 px square crops -> buckets 48x80,64x64,80x48" in log and "no longer" not in log.split("resumed")[0]
    ckpt = out / "checkpoint-4"
    # Weights and EMA continue: the EMA counts 4 updates; the optimizer continues: AdamW's beta1 power is beta1^5
    # after 4 steps (paddle starts it at beta1), not beta1^3 as after a restart.
    with safe_open(str(ckpt / "ema_state.safetensors"), "np") as f:
        assert json.loads(f.metadata()["json"])["num_updates"] == 4
    pow1 = [v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items() if "beta1_pow_acc" in k]
    assert pow1 and np.allclose(pow1[0], 0.9 ** 5)
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4
    # The new stage's loader: per-bucket counts in the state and in the training log (batches of one bucket).
    state = json.loads((ckpt / "loader_state_rank0.json").read_text())
    assert state["geometry"] == {"resolution": 64, "buckets": ["48x80", "64x64", "80x48"]}
    assert sum(state["bucket_samples"].values()) == 8 and set(state["bucket_samples"]) <= {"48x80", "64x64", "80x48"}
    assert "data_bucket_" in log
    assert json.loads((ckpt / "train_config.json").read_text())["data"]["aspect_ratio_buckets"] == "64"
