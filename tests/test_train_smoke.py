"""Smoke tier: real train.py runs of a few steps on the tiny init: checkpoint layout, exact resume, EMA, the
text encoder, a whole-pipeline save, the pipeline folder a finished run leaves, and train.sh's pass-through."""
import glob
import json
import os
import re
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import PY, ROOT, TINY_INIT

pytestmark = pytest.mark.smoke


def train(out_dir, file_list, *extra, check=True):
    cmd = [PY, os.path.join(ROOT, "train.py"), "--do_train", "--pretrained_model_name_or_path", TINY_INIT,
           "--file_list", file_list, "--output_dir", str(out_dir), "--resolution", "32",
           "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
           "--seed", "23", "--disable_tqdm", "True", "--num_inference_steps", "2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def weights(folder):
    """The folder's weights (not a variant: unet/ also holds the EMA as diffusion_paddle_model.ema.safetensors)."""
    (path,) = [p for p in glob.glob(os.path.join(folder, "*.safetensors")) if ".ema." not in os.path.basename(p)]
    return load_file(path)


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= atol, f"weights differ by {worst}"


RESUME_FLAGS = ["--use_ema", "True", "--snr_gamma", "5", "--noise_offset", "0.05", "--input_perturbation", "0.1",
                "--random_flip", "True", "--dataloader_num_workers", "2", "--save_steps", "5",
                "--image_logging_steps", "5", "--report_to", "visualdl"]


def test_resume_is_exact_and_checkpoints_are_complete(tmp_path, demo_file_list):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, demo_file_list, "--max_steps", "10", "--save_total_limit", "1", *RESUME_FLAGS)
    # 5 batches consumed with 2 workers: the resumed loader must start at the *second* worker's stream.
    train(resumed, demo_file_list, "--max_steps", "5", *RESUME_FLAGS)
    proc = train(resumed, demo_file_list, "--max_steps", "10", *RESUME_FLAGS)
    assert "resumed weights and loader position" in proc.stderr + proc.stdout
    for sub in ("unet", "unet_ema"):
        assert_same(weights(straight / sub), weights(resumed / sub))
    assert not np.array_equal(weights(straight / "unet")["conv_out.weight"],
                              weights(straight / "unet_ema")["conv_out.weight"]), "EMA did not move separately"

    # save_total_limit 1 keeps only the last checkpoint; each holds what resume and from_pretrained need.
    # A finished run is a pipeline folder: the untrained parts copied in, model_index.json, EMA as unet/'s variant.
    assert sorted(os.listdir(straight)) == sorted(
        ["checkpoint-10", "model_index.json", "runs", "samples", "scheduler", "text_encoder", "tokenizer",
         "train_config.json", "training_args.bin", "unet", "unet_ema", "vae"])
    assert_same(load_file(str(straight / "unet" / "diffusion_paddle_model.ema.safetensors")),
                weights(straight / "unet_ema"), atol=0)
    ckpt = straight / "checkpoint-10"
    # The model's part of a checkpoint (the Trainer's resume state is trainer/checkpoint.py's, tested there).
    for name in ("unet/config.json", "unet/diffusion_paddle_model.ema.safetensors", "unet_ema/config.json",
                 "scheduler/scheduler_config.json", "loader_state_rank0.json", "trainer_state.json",
                 "train_config.json", ".complete"):
        assert (ckpt / name).exists(), name
    state = json.loads((ckpt / "loader_state_rank0.json").read_text())
    assert state["format"] == "text_image_loader_state" and state["batches_consumed"] == 10
    # The resolved config travels with the checkpoint: what ran, as run (the device's precision, the EMA).
    config = json.loads((ckpt / "train_config.json").read_text())
    assert config["model"]["use_ema"] is True and config["training"]["max_steps"] == 10
    assert config["components"]["unet"].endswith("unet_config.json")
    # Image logging on rank 0: reconstructions and samples at guidance 1.0 and 7.5, as PNG and in VisualDL.
    pngs = sorted(os.path.basename(p) for p in glob.glob(str(straight / "samples" / "*.png")))
    assert "step-0000005_reconstruction.png" in pngs and "step-0000010_samples_cfg7.5.png" in pngs
    assert glob.glob(str(straight / "runs" / "*" / "vdlrecords*"))


def test_text_encoder_v_prediction_and_full_pipeline_save(tmp_path, demo_file_list):
    out = tmp_path / "te"
    # From scratch the UNet's proj_out and conv_out start at zero (the reference's init): the text encoder gets
    # its first non-zero gradient at step 3.
    proc = train(out, demo_file_list, "--max_steps", "4", "--save_steps", "4", "--image_logging_steps", "0",
                 "--train_text_encoder", "True", "--text_encoder_learning_rate", "1e-2",
                 "--prediction_type", "v_prediction", "--recompute", "True", "--only_save_updated_model", "False",
                 "--fp16", "True", "--report_to", "none")
    # fp16 on a CPU: one clear line at start, then float32.
    assert "DEVICE: fp16 needs a CUDA device" in proc.stderr + proc.stdout
    from ppdiffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    before = weights(os.path.join(TINY_INIT, "text_encoder"))
    after = weights(out / "checkpoint-4" / "text_encoder")
    assert not np.allclose(before["text_model.final_layer_norm.weight"].astype(np.float32),
                           after["text_model.final_layer_norm.weight"].astype(np.float32))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_output_dir_without_checkpoint_is_an_error(tmp_path, demo_file_list):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's files")
    proc = train(out, demo_file_list, "--max_steps", "1", "--report_to", "none", check=False)
    assert proc.returncode != 0 and "already exists and is not empty" in proc.stderr


def test_train_sh_passes_flags_and_environment_through_unchanged():
    """train.sh no longer translates FLAG_* itself: train.py reads them (sd/args.py parse_train), whatever
    launched it (tests/test_paddlemix_compat.py runs each launch path)."""
    env = {**os.environ, "DRY_RUN": "1", "FLAG_USE_EMA": "1", "FLAG_RECOMPUTE": "1"}
    out = subprocess.run(["sh", "train.sh", "--max_steps", "3", "--use_ema", "False"], capture_output=True,
                         text=True, cwd=ROOT, env=env, check=True).stdout.split()
    assert out[-5:] == ["train.py", "--max_steps", "3", "--use_ema", "False"]
    assert "--recompute" not in out


def test_to_static_unet_and_benchmark_figures(tmp_path, demo_file_list):
    out = tmp_path / "static"
    proc = train(out, demo_file_list, "--max_steps", "3", "--save_steps", "3", "--image_logging_steps", "0",
                 "--to_static", "True", "--benchmark", "True", "--report_to", "none")
    log = proc.stdout + proc.stderr
    assert "to_static: the UNet runs as a static graph" in log
    assert "benchmark: step 2 ips" in log and "reader_cost" in log and "peak_mem" in log
    assert (out / "checkpoint-3" / "unet" / "config.json").exists()


def test_bad_records_are_skipped_counted_and_logged(tmp_path):
    """Bad images and bad base64 in a part do not stop training; their counts reach the training log."""
    import io

    from PIL import Image

    from data_tools import part_format as pf

    parts = tmp_path / "parts"
    parts.mkdir()
    with pf.open_part_writer(str(parts / "part-000001"), gzipped=False) as w:
        for i in range(24):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (10 * i, 100, 200)).save(buf, "PNG")
            w.write(pf.encode_record(f"a blue square number {i}", buf.getvalue()))
            if i % 8 == 0:
                w.write(pf.encode_record("not an image", b"\x00garbage" * 10))
        w.write(b"caption\tNONE\t###not base64###\n")
    (tmp_path / "x.filelist").write_text(str(parts / "part-000001") + "\n")
    (tmp_path / "x.filelist.list").write_text("x.filelist\n")
    proc = train(tmp_path / "run", str(tmp_path / "x.filelist.list"), "--max_steps", "2", "--save_steps", "2",
                 "--image_logging_steps", "0", "--report_to", "none", "--shuffle_buffer_size", "64")
    log = proc.stdout + proc.stderr
    # Counted per encounter: the stream is infinite and re-reads this small part every epoch.
    bad_image = [int(n) for n in re.findall(r"data_skipped_bad_image: (\d+)", log)]
    bad_base64 = [int(n) for n in re.findall(r"data_skipped_bad_base64: (\d+)", log)]
    assert bad_image and bad_image[-1] >= 3 and bad_base64 and bad_base64[-1] >= 1, log[-3000:]
    assert "part-000001:28: Only base64 data is allowed" in log  # the warning names the part and line


def test_reference_entry_name_is_an_alias(tmp_path):
    proc = subprocess.run([PY, "train_txt2img_laion400m_trainer.py", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "--unet_name_or_path" in proc.stdout and "--file_list" in proc.stdout
