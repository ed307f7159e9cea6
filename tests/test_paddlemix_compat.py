"""A PaddleMIX user's habits, run as its README (ppdiffusers/examples/stable_diffusion, sections 4.2 and 4.3)
writes them, with only paths and sizes changed: the FLAG_* exports, no --tokenizer_name, the reference's entry
name through `python -u`, `sh train.sh` and `python -m paddle.distributed.launch`. A finished run must be a
pipeline folder StableDiffusionPipeline.from_pretrained loads and samples from, with the EMA weights loadable the
reference's way (variant "ema")."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from helpers import PY, ROOT, TINY_INIT

pytestmark = pytest.mark.smoke

ENTRY = os.path.join(ROOT, "train_txt2img_laion400m_trainer.py")
# The README's exports; EMA switched on here, so that the test can see it take effect.
EXPORTS = {"FLAG_FUSED_LINEAR": "0", "FLAGS_conv_workspace_size_limit": "4096", "FLAG_USE_EMA": "1",
           "FLAG_RECOMPUTE": "1", "FLAG_XFORMERS": "1"}


def reference_layout(folder):
    """What the reference's command points at, laid out as its README has it under `folder`: the pretrained
    CompVis/stable-diffusion-v1-4/{vae,text_encoder,tokenizer} (here the tiny init's), the UNet config at
    ./sd/unet_config.json (4.2) and ./unet_config.json (4.3)."""
    sd14 = folder / "CompVis" / "stable-diffusion-v1-4"
    sd14.mkdir(parents=True)
    for part in ("vae", "text_encoder", "tokenizer"):
        os.symlink(os.path.join(TINY_INIT, part), sd14 / part)
    (folder / "sd").mkdir()
    for target in (folder / "sd" / "unet_config.json", folder / "unet_config.json"):
        shutil.copy(os.path.join(TINY_INIT, "unet_config.json"), target)
    return folder


def reference_flags(file_list, output_dir="./laion400m_pretrain_output_trainer", unet="./sd/unet_config.json",
                    prefix="."):
    """The 4.2 command's flags, sizes shrunk: batch 32 -> 2, 200000 steps -> 2, 256 px -> 32, 4 workers -> 1.
    --prediction_type (a flag of its list) makes the pipeline's scheduler checkable."""
    return ["--do_train", "--output_dir", output_dir, "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4", "--weight_decay", "0.01",
            "--max_steps", "2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
            "--image_logging_steps", "1000", "--logging_steps", "1", "--resolution", "32", "--save_steps", "10000",
            "--save_total_limit", "20", "--seed", "23", "--dataloader_num_workers", "1",
            "--vae_name_or_path", f"{prefix}/CompVis/stable-diffusion-v1-4/vae",
            "--text_encoder_name_or_path", f"{prefix}/CompVis/stable-diffusion-v1-4/text_encoder",
            "--unet_name_or_path", unet, "--file_list", file_list, "--model_max_length", "77",
            "--max_grad_norm", "-1", "--disable_tqdm", "True", "--bf16", "False",
            "--prediction_type", "v_prediction"]


def run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAG_")}
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          env={**env, "OMP_NUM_THREADS": "1", **EXPORTS})
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def assert_environment_took_effect(output_dir):
    config = json.loads((output_dir / "train_config.json").read_text())
    assert config["model"]["use_ema"] is True and config["training"]["recompute"] is True
    assert config["features"]["recompute"] is True
    assert config["model"]["enable_xformers_memory_efficient_attention"] is True  # asked (a CPU cannot: notice)
    assert "--use_ema True from the environment (FLAG_USE_EMA=1)" in config["aliases"]
    assert config["components"]["tokenizer"].endswith(os.path.join("stable-diffusion-v1-4", "tokenizer"))
    assert config["training"]["report_to"] == ["visualdl"]  # the default; custom_visualdl resolves to it too


def assert_pipeline_folder_samples(output_dir):
    import paddle
    from ppdiffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(str(output_dir))
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the schedule it was trained with
    # --model_max_length 77 over a tokenizer that pads to 16 (the tiny one): the folder samples as it trained
    assert pipe.tokenizer.model_max_length == 77
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle at the top left", height=32, width=32, num_inference_steps=2,
                 generator=paddle.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    ema = UNet2DConditionModel.from_pretrained(str(output_dir / "unet"), variant="ema").state_dict()
    ema_dir = UNet2DConditionModel.from_pretrained(str(output_dir / "unet_ema")).state_dict()
    plain = pipe.unet.state_dict()
    assert all(np.array_equal(ema[k].numpy(), ema_dir[k].numpy()) for k in ema)
    assert any(not np.array_equal(ema[k].numpy(), plain[k].numpy()) for k in ema), "variant ema is not the EMA"


@pytest.mark.parametrize("launcher", ["python -u", "sh train.sh"])
def test_reference_single_card_command(tmp_path, demo_file_list, launcher):
    """4.2 as written (`python -u train_txt2img_laion400m_trainer.py ...` from the folder holding its paths), and
    the same flags through train.sh (which runs from the recipe's folder: absolute paths)."""
    folder = reference_layout(tmp_path / "recipe")
    if launcher == "python -u":
        run([PY, "-u", ENTRY, *reference_flags(demo_file_list)], cwd=folder)
    else:
        flags = reference_flags(demo_file_list, output_dir=str(folder / "laion400m_pretrain_output_trainer"),
                                unet=str(folder / "sd" / "unet_config.json"), prefix=str(folder))
        run(["sh", os.path.join(ROOT, "train.sh"), *flags], cwd=folder)
    out = folder / "laion400m_pretrain_output_trainer"
    assert_environment_took_effect(out)
    assert_pipeline_folder_samples(out)


def test_reference_multi_card_launch(tmp_path, demo_file_list):
    """4.3's launch line, `--gpus "0,...,7"` replaced by `--nproc_per_node 2` (CPU, gloo)."""
    folder = reference_layout(tmp_path / "recipe")
    run([PY, "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "2", ENTRY,
         *reference_flags(demo_file_list, unet="./unet_config.json")], cwd=folder, timeout=900)
    out = folder / "laion400m_pretrain_output_trainer"
    assert_environment_took_effect(out)
    # Every rank read the environment itself (the launcher passes it on; nothing translated it to flags).
    for rank in (0, 1):
        log = (folder / "log" / f"workerlog.{rank}").read_text()
        assert "--recompute True from the environment (FLAG_RECOMPUTE=1)" in log, log[-2000:]
    for name in ("model_index.json", "vae", "text_encoder", "tokenizer", "scheduler", "unet"):
        assert (out / name).exists(), name
