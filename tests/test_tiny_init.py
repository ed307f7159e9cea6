"""The committed init folder sd/tiny_init/ (sd/tiny/build_tiny_init.py) and the UNet configs."""
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from ppdiffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,
                         UNet2DConditionModel)
from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer
from safetensors.numpy import load_file

from sd.tiny.build_tiny_init import (SCHEDULER_SD_V1, TinyInitConfig, build_tiny_init, check_compatible,
                                        vae_downsampling_factor)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT = os.path.join(ROOT, "sd", "tiny_init")
CONFIGS = os.path.join(ROOT, "sd", "configs")
MAX_COMMITTED_BYTES = 5 * 1000 * 1000  # "no committed file over 5 MB", read strictly (decimal MB)


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _unet_cfg():
    return _json(os.path.join(INIT, "unet_config.json"))


@pytest.fixture(scope="module")
def text_encoder():
    model = CLIPTextModel.from_pretrained(os.path.join(INIT, "text_encoder"))
    model.eval()
    return model


@pytest.mark.unit
def test_layout_and_file_sizes():
    for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
        assert os.path.isdir(os.path.join(INIT, name)), name
    assert _unet_cfg() == _json(os.path.join(CONFIGS, "unet_tiny.json"))
    for folder in (INIT, CONFIGS):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                assert os.path.getsize(path) <= MAX_COMMITTED_BYTES, path


@pytest.mark.unit
def test_text_encoder_loads_stored_weights_in_float32(text_encoder):
    stored = load_file(os.path.join(INIT, "text_encoder", "model.safetensors"))
    state = text_encoder.state_dict()
    assert set(stored) == set(state)  # every parameter came from the file: nothing was randomly re-initialised
    for name, value in stored.items():
        assert value.dtype == np.float16, name  # stored half precision to fit the 5 MB limit
        assert state[name].dtype == paddle.float32, name
        np.testing.assert_array_equal(state[name].numpy(), value.astype(np.float32), err_msg=name)
    tok = CLIPTokenizer.from_pretrained(os.path.join(INIT, "tokenizer"))
    ids = tok(["a red circle at the top left", "a blue square in the center"], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pd")["input_ids"]
    with paddle.no_grad():
        hidden = text_encoder(ids)[0]
    assert hidden.dtype == paddle.float32 and hidden.shape == [2, 16, 48]  # the tiny tokenizer pads to 16
    h = hidden.numpy()
    assert np.isfinite(h).all() and np.abs(h[0] - h[1]).max() > 1e-3  # different captions, different states


@pytest.mark.unit
def test_components_agree(text_encoder):
    unet_cfg = _unet_cfg()
    assert text_encoder.config.hidden_size == unet_cfg["cross_attention_dim"]
    vae = AutoencoderKL.from_pretrained(os.path.join(INIT, "vae"))
    vae.eval()
    factor = vae_downsampling_factor(dict(vae.config))
    assert factor == 4 and vae.config.latent_channels == unet_cfg["in_channels"]
    image = paddle.rand([1, 3, 32, 32]) * 2 - 1
    with paddle.no_grad():
        latents = vae.encode(image).latent_dist.sample()
    assert latents.shape == [1, unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"]]
    unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.eval()
    with paddle.no_grad():
        out = unet(latents, paddle.to_tensor([10]), paddle.rand([1, 77, text_encoder.config.hidden_size])).sample
    assert out.shape == latents.shape
    assert 0.5e6 < sum(int(p.numel()) for p in unet.parameters()) < 1.5e6  # the measured ~0.8M budget


@pytest.mark.unit
def test_scheduler_is_sd_v1():
    sched = DDPMScheduler.from_pretrained(os.path.join(INIT, "scheduler"))
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "scaled_linear"
    assert sched.config.prediction_type == "epsilon" and sched.config.clip_sample is False
    # scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    expected = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    np.testing.assert_allclose(sched.betas.numpy(), expected, rtol=1e-5)
    ddim = DDIMScheduler.from_config(sched.config)  # the sampler settings survive the round trip
    assert ddim.config.set_alpha_to_one is False and ddim.config.steps_offset == 1
    assert PNDMScheduler.from_config(sched.config).config.skip_prk_steps is True
    assert _json(os.path.join(INIT, "scheduler", "scheduler_config.json")) == _json(SCHEDULER_SD_V1)


@pytest.mark.unit
def test_pipeline_generates_with_a_random_unet(tmp_path):
    folder = tmp_path / "init"
    shutil.copytree(INIT, folder)
    paddle.seed(0)
    UNet2DConditionModel.from_config(_unet_cfg()).save_pretrained(str(folder / "unet"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle at the top left", height=32, width=32, num_inference_steps=2,
               generator=paddle.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


@pytest.mark.unit
def test_sd_v1_unet_config_parses_without_weights():
    cfg = UNet2DConditionModel.load_config(os.path.join(CONFIGS, "unet_sd_v1.json"))
    init, unused, _ = UNet2DConditionModel.extract_init_dict(cfg)
    assert not unused, unused  # every key is a real UNet2DConditionModel argument
    assert init["block_out_channels"] == [320, 640, 1280, 1280] and init["cross_attention_dim"] == 768
    assert init["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert init["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert init["layers_per_block"] == 2 and init["attention_head_dim"] == 8 and init["norm_num_groups"] == 32
    init_tiny, unused_tiny, _ = UNet2DConditionModel.extract_init_dict(_json(os.path.join(CONFIGS, "unet_tiny.json")))
    assert not unused_tiny, unused_tiny


@pytest.mark.unit
def test_rebuild_matches_committed_and_guards(tmp_path):
    out = str(tmp_path / "init")
    build_tiny_init(TinyInitConfig(output_dir=out, seed=0, tokenizer_dir=os.path.join(INIT, "tokenizer")))
    for rel in ("model_index.json", "unet_config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json"):
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(INIT, rel), "rb") as b:
            assert a.read() == b.read(), rel  # same seed, same bytes (vae/ may be the trained one: not compared)
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")
    # A second build would silently drop a trained VAE: it must be asked for explicitly.
    with pytest.raises(FileExistsError, match="--vae_dir"):
        build_tiny_init(TinyInitConfig(output_dir=out, tokenizer_dir=os.path.join(INIT, "tokenizer")))
    # Incompatible sizes are refused, naming them, and the existing folder is left as it was.
    bad = dict(_unet_cfg(), cross_attention_dim=64)
    bad_path = tmp_path / "bad_unet.json"
    bad_path.write_text(json.dumps(bad))
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match="cross_attention_dim 64 != text hidden 48"):
        build_tiny_init(TinyInitConfig(output_dir=out, vae_dir=os.path.join(out, "vae"), unet_config=str(bad_path)))
    assert sorted(os.listdir(out)) == before and os.path.isfile(os.path.join(out, "vae", "config.json"))


@pytest.mark.unit
def test_check_compatible_names_each_mismatch():
    unet = {"cross_attention_dim": 48, "in_channels": 4, "sample_size": 8}
    vae = {"latent_channels": 4, "block_out_channels": [32, 64, 64], "sample_size": 32}
    check_compatible(unet, vae, 48, where="x")
    with pytest.raises(ValueError, match="in_channels 4 != vae latent_channels 8"):
        check_compatible(unet, dict(vae, latent_channels=8), 48, where="x")
    with pytest.raises(ValueError, match="sample_size 8 x vae factor 8 != vae sample_size 32"):
        check_compatible(unet, dict(vae, block_out_channels=[8, 8, 8, 8]), 48, where="x")
