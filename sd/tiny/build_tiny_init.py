"""Build sd/tiny_init/: the tiny, CPU-trainable counterpart of the reference's
`CompVis-stable-diffusion-v1-4-paddle-init` folder, deterministic from a seed.

    OUT/tokenizer/        real CLIP BPE tokenizer (sd/tiny/build_tokenizer.py)
    OUT/text_encoder/     tiny CLIPTextModel, random init (config.json + model.safetensors)
    OUT/vae/              AutoencoderKL: copied from --vae_dir (trained by train_vae.py), else untrained
    OUT/scheduler/        SD v1's DDPM noise schedule
    OUT/unet_config.json  copy of sd/configs/unet_tiny.json (the trainer builds the UNet from it)
    OUT/model_index.json  StableDiffusionPipeline components: loadable by the pipeline once OUT/unet/ exists

    python sd/tiny/build_tiny_init.py --output_dir sd/tiny_init [--bpe_file open_clip_torch-*.whl]
                                         [--vae_dir runs/vae/final | --reset_vae] [--seed 0]

The text encoder must be loaded with `ppdiffusers.transformers.CLIPTextModel` (HF parameter names), which is what
StableDiffusionPipeline uses: paddlenlp's own CLIPTextModel names its parameters differently and would silently
start from random weights. The folder is built in OUT.tmp and swapped in at the end, so sources inside OUT (the
committed tokenizer, a trained vae) can be reused and a failed build leaves OUT untouched.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from sd.components import MODEL_INDEX, set_tokenizer_max_length
from sd.paths import SCHEDULER_SD_V1, TINY_INIT_DIR, UNET_TINY_CONFIG, VAE_TINY_CONFIG


# SD v1's training noise schedule (sd/model.py falls back to the same file). set_alpha_to_one / skip_prk_steps are
# not DDPM arguments (DDPMScheduler ignores them) but make DDIMScheduler/PNDMScheduler.from_config(it) reproduce
# SD v1's samplers.
# (sd/configs/scheduler_sd_v1.json, sd.paths.SCHEDULER_SD_V1)


@dataclass
class TextEncoderConfig:
    """Tiny CLIP text transformer. The binding constraint is "no committed file over 5 MB": the token embedding
    alone is 49408 x hidden floats. hidden 48 stored in float16 is 4.74 MB for the embedding, 4.87 MB for the
    whole file, and twice the width that fits in float32 (hidden 24): a richer per-word embedding for the UNet's
    cross-attention, at no cost in precision that matters for a random, frozen init. Loading upcasts to float32
    (config.json says dtype float32), so training and inference on CPU run in float32."""

    hidden_size: int = 48
    intermediate_size: int = 192  # 4 x hidden, as CLIP
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"  # SD v1's text encoder (CLIP ViT-L/14) uses quick_gelu
    storage_dtype: str = "float16"


@dataclass
class TinyInitConfig:
    output_dir: str = field(default=TINY_INIT_DIR, metadata={"help": "The init folder to (re)build."})
    seed: int = field(default=0, metadata={"help": "Seed of the random text encoder (and of an untrained VAE)."})
    bpe_file: Optional[str] = field(
        default=None, metadata={"help": "open-clip-torch wheel or bpe_simple_vocab_16e6.txt.gz: build the tokenizer "
                                        "from the merge list (else copy --tokenizer_dir)."})
    tokenizer_dir: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder to copy (default OUT/tokenizer, the committed one)."})
    vae_dir: Optional[str] = field(default=None, metadata={"help": "Trained AutoencoderKL folder to copy in as vae/."})
    model_max_length: int = field(
        default=16, metadata={"help": "The tokenizer's padding length, which training and sampling default to. "
                              "The demo captions are at most 12 tokens: 16 keys instead of SD's 77 in every "
                              "cross-attention layer make a tiny training step cheaper (README, 'What the quickstart "
                              "learns')."})
    reset_vae: bool = field(default=False, metadata={"help": "Replace an existing OUT/vae with an untrained one."})
    unet_config: str = field(default=UNET_TINY_CONFIG, metadata={"help": "UNet config .json of the tiny UNet."})
    vae_config: str = field(default=VAE_TINY_CONFIG, metadata={"help": "AutoencoderKL config .json."})
    # The tiny text encoder's architecture: fixed by the recipe, not a flag.
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig, init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.model_max_length <= self.text_encoder.max_position_embeddings:
            raise ValueError(f"--model_max_length must be in [2, {self.text_encoder.max_position_embeddings}] (the "
                             f"text encoder's positions), got {self.model_max_length}")


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def vae_downsampling_factor(vae_config: Dict[str, Any]) -> int:
    """Every DownEncoderBlock2D but the last halves the resolution."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_compatible(unet_cfg: Dict[str, Any], vae_cfg: Dict[str, Any], text_hidden: int, where: str) -> None:
    """The three shapes that must agree, or the first training step fails deep inside paddle."""
    problems = []
    if unet_cfg["cross_attention_dim"] != text_hidden:
        problems.append(f"unet cross_attention_dim {unet_cfg['cross_attention_dim']} != text hidden {text_hidden}")
    if unet_cfg["in_channels"] != vae_cfg["latent_channels"]:
        problems.append(f"unet in_channels {unet_cfg['in_channels']} != vae latent_channels "
                        f"{vae_cfg['latent_channels']}")
    factor = vae_downsampling_factor(vae_cfg)
    if unet_cfg["sample_size"] * factor != vae_cfg["sample_size"]:
        problems.append(f"unet sample_size {unet_cfg['sample_size']} x vae factor {factor} != vae sample_size "
                        f"{vae_cfg['sample_size']}")
    if problems:
        raise ValueError(f"{where}: incompatible components: " + "; ".join(problems))


def _build_text_encoder(cfg: TextEncoderConfig, seed: int, out_dir: str) -> None:
    import paddle
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    paddle.seed(seed)
    config = CLIPTextConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                            max_position_embeddings=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
                            hidden_act=cfg.hidden_act, projection_dim=cfg.hidden_size)
    model = CLIPTextModel(config)
    model.to(dtype=cfg.storage_dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained records the storage dtype in config.json, and from_pretrained would then build a float16
    # model (slow and lossy on CPU). Declaring float32 makes loading upcast the stored float16 values.
    path = os.path.join(out_dir, "config.json")
    saved = _read_json(path)
    saved["dtype"] = "float32"
    _write_json(path, saved)


def _copy_vae(src: str, dst: str) -> Dict[str, Any]:
    cfg = _read_json(os.path.join(src, "config.json"))
    if cfg.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"--vae_dir {src}: config.json _class_name is {cfg.get('_class_name')!r}, "
                         "expected 'AutoencoderKL'")
    weights = [f for f in os.listdir(src) if f.endswith((".safetensors", ".pdparams"))]
    if not weights:
        raise ValueError(f"--vae_dir {src}: no .safetensors or .pdparams weights file")
    shutil.copytree(src, dst)
    return cfg


def _build_vae(vae_config_path: str, seed: int, out_dir: str) -> Dict[str, Any]:
    import paddle
    from ppdiffusers import AutoencoderKL

    paddle.seed(seed)
    vae = AutoencoderKL.from_config(_read_json(vae_config_path))
    vae.save_pretrained(out_dir, safe_serialization=True)
    return _read_json(os.path.join(out_dir, "config.json"))


def build_tiny_init(cfg: TinyInitConfig) -> str:
    """Write the init folder at cfg.output_dir (replacing it); return its path."""
    from sd.tiny.build_tokenizer import build_tokenizer

    out = os.path.abspath(cfg.output_dir)
    existing_vae = os.path.join(out, "vae")
    if cfg.vae_dir is None and os.path.isdir(existing_vae) and not cfg.reset_vae:
        raise FileExistsError(f"{existing_vae} exists and may be a trained VAE: pass --vae_dir {existing_vae} "
                              "to keep it, or --reset_vae to replace it with an untrained one")
    tokenizer_src = cfg.tokenizer_dir or os.path.join(out, "tokenizer")
    if cfg.bpe_file is None and not os.path.isfile(os.path.join(tokenizer_src, "vocab.json")):
        raise FileNotFoundError(f"no tokenizer at {tokenizer_src}: pass --bpe_file (the open-clip-torch wheel "
                                "or bpe_simple_vocab_16e6.txt.gz) or --tokenizer_dir")
    unet_cfg = _read_json(cfg.unet_config)

    stage = out + ".tmp"
    if os.path.exists(stage):
        shutil.rmtree(stage)  # a previous failed build of ours
    os.makedirs(stage)
    if cfg.bpe_file is not None:
        build_tokenizer(cfg.bpe_file, os.path.join(stage, "tokenizer"))
    else:
        shutil.copytree(tokenizer_src, os.path.join(stage, "tokenizer"))
    set_tokenizer_max_length(os.path.join(stage, "tokenizer"), cfg.model_max_length)
    _build_text_encoder(cfg.text_encoder, cfg.seed, os.path.join(stage, "text_encoder"))
    if cfg.vae_dir is not None:
        vae_cfg = _copy_vae(cfg.vae_dir, os.path.join(stage, "vae"))
        # train_vae.py writes its measurements (PSNR, latent scale) beside vae/: they travel with the weights.
        report = os.path.join(os.path.dirname(os.path.abspath(cfg.vae_dir)), "vae_report.json")
        if os.path.isfile(report):
            shutil.copyfile(report, os.path.join(stage, "vae_report.json"))
    else:
        vae_cfg = _build_vae(cfg.vae_config, cfg.seed, os.path.join(stage, "vae"))
    check_compatible(unet_cfg, vae_cfg, cfg.text_encoder.hidden_size, where=cfg.unet_config)
    os.makedirs(os.path.join(stage, "scheduler"))
    shutil.copyfile(SCHEDULER_SD_V1, os.path.join(stage, "scheduler", "scheduler_config.json"))
    _write_json(os.path.join(stage, "unet_config.json"), unet_cfg)
    _write_json(os.path.join(stage, "model_index.json"), MODEL_INDEX)

    # Swap: the old folder is removed only once the new one is complete.
    old = out + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(stage, out)
    if os.path.exists(old):
        shutil.rmtree(old)
    return out


def main(argv: List[str] | None = None) -> int:
    from sd.config import parse_args

    (cfg,) = parse_args([TinyInitConfig], argv)
    print(f"wrote {build_tiny_init(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
