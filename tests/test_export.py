"""export_model.py / sd/export.py: a checkpoint-like folder built from sd/tiny_init is exported to a diffusers
folder and an original-SD single file, and every written tensor is compared with its source file (read with
safetensors' numpy loader) after the paddle -> PyTorch layout change: linear weights transposed, the rest equal."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from sd.export import PREFIXES, ExportArguments, resolve, unet_key, vae_key
from sd.paths import REPO_ROOT, TINY_INIT_DIR

UNET_FILE = "diffusion_paddle_model.safetensors"


def make_checkpoint(root: str, with_ema: bool = False) -> str:
    """runs/x/checkpoint-N as training writes it: unet/ (safetensors + config.json) and scheduler/."""
    import paddle
    from ppdiffusers import UNet2DConditionModel

    with open(os.path.join(TINY_INIT_DIR, "unet_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    paddle.seed(1234)
    unet = UNet2DConditionModel.from_config(config)
    ckpt = os.path.join(root, "checkpoint-5")
    unet.save_pretrained(os.path.join(ckpt, "unet"))
    if with_ema:
        unet.save_pretrained(os.path.join(ckpt, "unet_ema"))
    shutil.copytree(os.path.join(TINY_INIT_DIR, "scheduler"), os.path.join(ckpt, "scheduler"))
    return ckpt


def linear_weights(model) -> set:
    import paddle.nn as nn

    return {name + ".weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def torch_layout(source: dict, linear: set) -> dict:
    """What PyTorch holds for a paddle state dict: paddle's Linear weight is [in, out], torch's [out, in]."""
    return {k: (v.T if k in linear else v).astype(np.float32) for k, v in source.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One float32 and one float16 export (both formats) of the same checkpoint, plus the expected tensors."""
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    from sd.export import main

    root = str(tmp_path_factory.mktemp("export"))
    ckpt = make_checkpoint(root)
    outs = {}
    for dtype in ("float32", "float16"):
        outs[dtype] = os.path.join(root, f"out-{dtype}")
        main(["--checkpoint", ckpt, "--model_dir", TINY_INIT_DIR, "--output_path", outs[dtype], "--dtype", dtype])
    sources = {"unet": (os.path.join(ckpt, "unet"), UNet2DConditionModel, UNET_FILE),
               "vae": (os.path.join(TINY_INIT_DIR, "vae"), AutoencoderKL, UNET_FILE),
               "text_encoder": (os.path.join(TINY_INIT_DIR, "text_encoder"), CLIPTextModel, "model.safetensors")}
    expected = {}
    for name, (folder, cls, weights) in sources.items():
        model = cls.from_pretrained(folder)
        expected[name] = torch_layout(load_file(os.path.join(folder, weights)), linear_weights(model))
    return {"ckpt": ckpt, "outs": outs, "expected": expected, "root": root}


DIFFUSERS_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                   "text_encoder": "model.safetensors"}


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_diffusers_tensors_equal_source(exported, dtype):
    folder = os.path.join(exported["outs"][dtype], "diffusers")
    for name, file in DIFFUSERS_FILES.items():
        written, expected = load_file(os.path.join(folder, name, file)), exported["expected"][name]
        assert set(written) == set(expected), name
        for key, value in expected.items():
            assert written[key].dtype == np.dtype(dtype), key
            np.testing.assert_array_equal(written[key], value.astype(dtype), err_msg=key)
    assert sorted(os.listdir(folder)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        scheduler = json.load(f)
    with open(os.path.join(exported["ckpt"], "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        trained = json.load(f)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert scheduler[key] == trained[key], key


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_original_single_file(exported, dtype):
    written = load_file(os.path.join(exported["outs"][dtype], "model.safetensors"))
    expected = exported["expected"]
    counts = {name: sum(k.startswith(prefix) for k in written) for name, prefix in PREFIXES.items()}
    # the text encoder also carries its position ids, as SD v1 releases do
    assert counts == {"unet": len(expected["unet"]), "vae": len(expected["vae"]),
                      "text_encoder": len(expected["text_encoder"]) + 1}
    assert len(written) == sum(counts.values())
    ids = written["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    np.testing.assert_array_equal(ids, np.arange(77, dtype=np.int64)[None])

    # ppdiffusers' own original -> diffusers reader gives back exactly the source tensors
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_unet_checkpoint,
                                                                          convert_ldm_vae_checkpoint)
    with open(os.path.join(exported["ckpt"], "unet", "config.json"), encoding="utf-8") as f:
        unet_config = {k: v for k, v in json.load(f).items() if k != "num_class_embeds"}
    with open(os.path.join(TINY_INIT_DIR, "vae", "config.json"), encoding="utf-8") as f:
        vae_config = json.load(f)
    read = {"unet": convert_ldm_unet_checkpoint(dict(written), unet_config),
            "vae": convert_ldm_vae_checkpoint(dict(written), vae_config),
            "text_encoder": {k[len(PREFIXES["text_encoder"]):]: v for k, v in written.items()
                             if k.startswith(PREFIXES["text_encoder"]) and not k.endswith("position_ids")}}
    for name, tensors in read.items():
        assert set(tensors) == set(expected[name]), name
        for key, value in expected[name].items():
            assert tensors[key].dtype == np.dtype(dtype), key
            np.testing.assert_array_equal(tensors[key], value.astype(dtype), err_msg=key)

    # a few names and shapes written out by hand, independent of both mappings
    unet, vae = expected["unet"], expected["vae"]
    np.testing.assert_array_equal(written["model.diffusion_model.input_blocks.0.0.weight"],
                                  unet["conv_in.weight"].astype(dtype))
    np.testing.assert_array_equal(written["model.diffusion_model.time_embed.0.weight"],
                                  unet["time_embedding.linear_1.weight"].astype(dtype))
    np.testing.assert_array_equal(written["model.diffusion_model.output_blocks.1.1.conv.weight"],
                                  unet["up_blocks.0.upsamplers.0.conv.weight"].astype(dtype))
    np.testing.assert_array_equal(written["first_stage_model.decoder.up.0.block.0.conv1.weight"],
                                  vae["decoder.up_blocks.2.resnets.0.conv1.weight"].astype(dtype))
    q = vae["encoder.mid_block.attentions.0.to_q.weight"]
    np.testing.assert_array_equal(written["first_stage_model.encoder.mid.attn_1.q.weight"],
                                  q[:, :, None, None].astype(dtype))


@pytest.mark.smoke
def test_diffusers_folder_reimports_into_ppdiffusers(exported):
    """ppdiffusers reads PyTorch weights without torch (from_diffusers=True): the round trip is exact."""
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    folder = os.path.join(exported["outs"]["float32"], "diffusers")
    pairs = [(UNet2DConditionModel, os.path.join(exported["ckpt"], "unet"), "unet"),
             (AutoencoderKL, os.path.join(TINY_INIT_DIR, "vae"), "vae"),
             (CLIPTextModel, os.path.join(TINY_INIT_DIR, "text_encoder"), "text_encoder")]
    for cls, source, sub in pairs:
        back = cls.from_pretrained(os.path.join(folder, sub), from_diffusers=True).state_dict()
        original = cls.from_pretrained(source).state_dict()
        assert set(back) == set(original), sub
        diff = max(float((back[k].astype("float32") - original[k].astype("float32")).abs().max()) for k in back)
        assert diff == 0.0, sub


@pytest.mark.smoke
def test_export_config_and_help(exported):
    with open(os.path.join(exported["outs"]["float16"], "export_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["args"]["dtype"] == "float16" and saved["components"]["unet"].endswith("unet")
    assert saved["components"]["scheduler"] == os.path.join(exported["ckpt"], "scheduler")
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "export_model.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    for flag in ("--checkpoint", "--model_dir", "--output_path", "--format", "--use_ema", "--dtype"):
        assert flag in done.stdout


# ------------------------------------------------------------------------------------------ bad input (no weights)
def _args(ckpt: str, out: str, **kw) -> ExportArguments:
    return ExportArguments(checkpoint=ckpt, output_path=out, model_dir=kw.pop("model_dir", TINY_INIT_DIR), **kw)


def _fake_checkpoint(root, unet_weights: str = UNET_FILE) -> str:
    """Config and weight files by name only: resolve never reads weights."""
    ckpt = os.path.join(root, "checkpoint-1")
    os.makedirs(os.path.join(ckpt, "unet"))
    shutil.copy(os.path.join(TINY_INIT_DIR, "unet_config.json"), os.path.join(ckpt, "unet", "config.json"))
    open(os.path.join(ckpt, "unet", unet_weights), "wb").close()
    shutil.copytree(os.path.join(TINY_INIT_DIR, "scheduler"), os.path.join(ckpt, "scheduler"))
    return ckpt


@pytest.mark.unit
def test_resolve_picks_the_checkpoint_parts(tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    config = resolve(_args(ckpt, str(tmp_path / "out"), format="original"))
    assert config.components.unet == os.path.join(ckpt, "unet")
    assert config.components.scheduler == os.path.join(ckpt, "scheduler")
    assert config.components.vae == os.path.join(TINY_INIT_DIR, "vae")
    assert config.diffusers_dir is None and config.original_file == str(tmp_path / "out" / "model.safetensors")


@pytest.mark.unit
def test_bad_input_names_the_path(tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"--checkpoint: no such folder: {missing}"):
        resolve(_args(missing, str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="not a checkpoint or run folder.*pass its parent"):
        resolve(_args(os.path.join(ckpt, "unet"), str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match=f"expected {os.path.join(ckpt, 'unet_ema')}"):
        resolve(_args(ckpt, str(tmp_path / "out"), use_ema=True))
    with pytest.raises(ValueError, match="--model_dir is required"):
        resolve(_args(ckpt, str(tmp_path / "out"), model_dir=None))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        resolve(_args(ckpt, str(tmp_path / "busy")))
    with pytest.raises(ValueError, match="--dtype must be one of"):
        _args(ckpt, str(tmp_path / "out"), dtype="float64")


@pytest.mark.unit
def test_pickle_weights_are_refused(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, unet_weights="diffusion_paddle_model.pdparams")
    with pytest.raises(ValueError, match="pickle weights.*diffusion_paddle_model.pdparams"):
        resolve(_args(ckpt, str(tmp_path / "out")))


@pytest.mark.unit
def test_key_names_follow_the_sd_v1_layout():
    """SD v1.x: two layers per block, up block 0 without attention."""
    up_attn = frozenset({1, 2, 3})
    assert unet_key("down_blocks.1.resnets.0.norm1.weight", 2, up_attn) == "input_blocks.4.0.in_layers.0.weight"
    assert unet_key("down_blocks.2.downsamplers.0.conv.bias", 2, up_attn) == "input_blocks.9.0.op.bias"
    assert unet_key("up_blocks.0.upsamplers.0.conv.weight", 2, up_attn) == "output_blocks.2.1.conv.weight"
    assert unet_key("up_blocks.2.upsamplers.0.conv.weight", 2, up_attn) == "output_blocks.8.2.conv.weight"
    assert unet_key("up_blocks.3.attentions.2.proj_out.weight", 2, up_attn) == "output_blocks.11.1.proj_out.weight"
    assert unet_key("mid_block.resnets.1.time_emb_proj.bias", 2, up_attn) == "middle_block.2.emb_layers.1.bias"
    assert vae_key("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", 4) == "decoder.up.3.block.2.nin_shortcut.weight"
    assert vae_key("encoder.mid_block.attentions.0.to_out.0.bias", 4) == "encoder.mid.attn_1.proj_out.bias"
    assert vae_key("decoder.conv_norm_out.weight", 4) == "decoder.norm_out.weight"


def raw_safetensors(path: str) -> dict:
    """name -> (dtype tag, uint16/other raw array): numpy has no bfloat16, so safetensors' numpy loader refuses it."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    kinds = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I64": np.int64}
    return {k: (v["dtype"], np.frombuffer(data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]],
                                          dtype=kinds[v["dtype"]]).reshape(v["shape"]))
            for k, v in header.items() if k != "__metadata__"}


@pytest.mark.smoke
def test_bfloat16_original_is_paddles_cast(exported):
    import paddle

    from sd.export import main

    out = os.path.join(exported["root"], "out-bf16")
    main(["--checkpoint", exported["ckpt"], "--model_dir", TINY_INIT_DIR, "--output_path", out,
          "--format", "original", "--dtype", "bfloat16"])
    assert sorted(os.listdir(out)) == ["export_config.json", "model.safetensors"]
    written = raw_safetensors(os.path.join(out, "model.safetensors"))
    conv_in = exported["expected"]["unet"]["conv_in.weight"]
    dtype, bits = written["model.diffusion_model.input_blocks.0.0.weight"]
    assert dtype == "BF16"
    np.testing.assert_array_equal(bits, paddle.to_tensor(conv_in).cast("bfloat16").numpy())
    assert {d for d, _ in written.values()} == {"BF16", "I64"}


@pytest.mark.unit
@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch writes bfloat16 itself")
def test_bfloat16_diffusers_needs_torch(tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--dtype bfloat16 with --format diffusers/both needs torch"):
        resolve(_args(ckpt, str(tmp_path / "out"), dtype="bfloat16"))
