"""The VAE pretraining stage: a few real steps of train_vae.py, then the saved vae/ reloads and reconstructs, with
the latent scaling factor it measured written into its config."""
import json
import os
import subprocess

import numpy as np
import paddle
import pytest

from helpers import PY, ROOT, make_parts

pytestmark = pytest.mark.smoke


def test_vae_stage_trains_saves_reloads_and_reconstructs(tmp_path, demo_file_list):
    held_out = make_parts(str(tmp_path / "held_out"), 16, seed=7, per_part=16)
    out = tmp_path / "vae_run"
    cmd = [PY, os.path.join(ROOT, "train_vae.py"), "--vae_config", os.path.join(ROOT, "sd", "configs", "vae_tiny.json"),
           "--file_list", demo_file_list, "--eval_file_list", held_out, "--resolution", "32", "--center_crop", "True",
           "--output_dir", str(out), "--max_steps", "3", "--save_steps", "3", "--learning_rate", "1e-3",
           "--per_device_train_batch_size", "4", "--logging_steps", "1", "--num_eval_images", "8", "--seed", "0",
           "--disable_tqdm", "True", "--report_to", "visualdl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]

    report = json.loads((out / "vae_report.json").read_text())
    assert report["held_out"] and report["images"] == 8 and report["steps"] == 3
    assert report["psnr_db"] > 0 and report["scaling_factor"] == pytest.approx(1 / report["latent_std"])
    assert (out / "vae_reconstructions.png").exists() and (out / "checkpoint-3" / "vae" / "config.json").exists()
    assert list((out / "runs").glob("*/vdlrecords*")), "VisualDL logs"

    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    initial = AutoencoderKL.from_config(json.load(open(os.path.join(ROOT, "sd", "configs", "vae_tiny.json"))))
    trained_w = vae.encoder.conv_in.weight.numpy()
    assert trained_w.shape == initial.encoder.conv_in.weight.shape
    images = paddle.rand([2, 3, 32, 32]) * 2 - 1
    with paddle.no_grad():
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.mode()).sample
    assert posterior.mode().shape == [2, 4, 8, 8] and recon.shape == images.shape
    assert np.isfinite(recon.numpy()).all()


def test_vae_arguments_are_explicit(tmp_path, demo_file_list):
    """Exactly one of --vae_config (from scratch) and --vae_name_or_path (fine-tune), and no silent fallback."""
    base = [PY, os.path.join(ROOT, "train_vae.py"), "--file_list", demo_file_list, "--output_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--resolution", "32"]
    for extra, message in [([], "exactly one of --vae_config"),
                           (["--vae_config", "sd/configs/vae_tiny.jsn"], "no such .json file"),
                           (["--vae_name_or_path", "sd/tiny_init/vea"], "no such folder")]:
        proc = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr[-2000:])


def test_vae_resume_is_exact_through_the_json_rng_state(tmp_path, demo_file_list):
    """The VAE's posterior sample draws from paddle's generator, so only a restored RNG state (rng_state.json,
    no pickle) makes 2 + resume + 2 steps equal 4 straight."""
    from safetensors.numpy import load_file

    def run(out, steps):
        cmd = [PY, os.path.join(ROOT, "train_vae.py"), "--vae_config",
               os.path.join(ROOT, "sd", "configs", "vae_tiny.json"), "--file_list", demo_file_list,
               "--resolution", "32", "--output_dir", str(out), "--max_steps", str(steps), "--save_steps", "2",
               "--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--num_eval_images", "4",
               "--seed", "0", "--disable_tqdm", "True", "--report_to", "none", "--dataloader_num_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-5000:]
        return proc

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    assert (tmp_path / "resumed" / "checkpoint-2" / "rng_state.json").exists()
    assert "resumed weights and loader position" in run(tmp_path / "resumed", 4).stderr
    a, b = (load_file(str(tmp_path / r / "checkpoint-4" / "vae" / "diffusion_paddle_model.safetensors"))
            for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
