"""README's Python snippet samples a finished run as written: the run folder is a pipeline folder whose scheduler
carries the training schedule (v-prediction here), so nothing in the snippet needs to know it."""
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import PY, ROOT, TINY_INIT

pytestmark = pytest.mark.smoke


def readme_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    after = text[text.index("In Python, with ppdiffusers directly"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_snippet_samples_a_finished_run_as_written(tmp_path, demo_file_list):
    run_dir = tmp_path / "runs" / "tiny"
    flags = ["--do_train", "--pretrained_model_name_or_path", TINY_INIT, "--file_list", demo_file_list,
             "--output_dir", str(run_dir), "--resolution", "32", "--center_crop", "True",
             "--per_device_train_batch_size", "4", "--max_steps", "2", "--prediction_type", "v_prediction",
             "--image_logging_steps", "0", "--report_to", "none", "--use_ema", "True"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([PY, os.path.join(ROOT, "train.py"), *flags], check=True, capture_output=True, env=env, cwd=ROOT,
                   timeout=300)
    snippet = readme_snippet()
    assert 'from_pretrained("runs/tiny")' in snippet  # the snippet names the quickstart's run folder
    proc = subprocess.run([PY, "-c", snippet + "\nprint(pipe.scheduler.config.prediction_type)"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "v_prediction"
    image = np.asarray(Image.open(tmp_path / "red_circle.png"))
    assert image.shape == (32, 32, 3) and image.std() > 0
