"""Export a checkpoint of this recipe for PyTorch tools (export_model.py is the command line):

    python export_model.py --checkpoint runs/x/checkpoint-500 --model_dir sd/tiny_init --output_path exports/x

writes OUTPUT_PATH/diffusers/ (a diffusers StableDiffusionPipeline folder), OUTPUT_PATH/model.safetensors (the
original-SD single file that ComfyUI and AUTOMATIC1111 load) and OUTPUT_PATH/export_config.json (the resolved
configuration). The components are chosen by sd/components.py with eval's rules: the checkpoint's unet/ (or
unet_ema/ with --use_ema), its scheduler/ and its trained text_encoder/ when it has one; the rest from --model_dir.

- diffusers: ppdiffusers' own conversion, StableDiffusionPipeline.save_pretrained(to_diffusers=True): linear
  weights transposed to PyTorch's [out, in], diffusion_pytorch_model.safetensors / model.safetensors, configs
  tagged _diffusers_version and model_index.json naming the "diffusers"/"transformers" libraries. The scheduler is
  DDIM built from the training schedule, as a full-pipeline save of sd/model.py writes it.
- original: ppdiffusers 0.29 ships only the reverse mapping (original -> diffusers, in
  ppdiffusers/pipelines/stable_diffusion/convert_from_ckpt.py); its diffusers -> original converter is a PaddleMIX
  script outside the package. So the key mapping below is written per key from the SD v1 layout, starts from the
  package's paddle -> PyTorch layout conversion, and every export is checked against the package's own reader:
  converting the written UNet and VAE back with convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint must give
  the diffusers state dicts exactly, or nothing is written.

Only safetensors are read: a component folder holding pickle weights (.pdparams/.bin/.ckpt/.pt/.pth) is refused,
since unpickling runs code. Outputs are written to a temporary folder beside OUTPUT_PATH and renamed at the end.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from sd.components import Components, read_config, resolve_components
from sd.config import format_config, parse_args, save_config
from trainer.checkpoint import is_pickled

logger = logging.getLogger("sd.export")

FORMATS = ("diffusers", "original", "both")
DTYPES = ("float32", "float16", "bfloat16")
EXPORT_CONFIG_NAME = "export_config.json"
DIFFUSERS_DIR = "diffusers"
ORIGINAL_FILE = "model.safetensors"
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}


@dataclass(frozen=True)
class ExportArguments:
    checkpoint: str = field(metadata={"help": "a checkpoint folder (runs/x/checkpoint-N) or a finished run folder "
                                              "(runs/x), holding unet/ (+ scheduler/, unet_ema/, text_encoder/)"})
    output_path: str = field(metadata={"help": "a new (or empty) folder: diffusers/, model.safetensors, "
                                               "export_config.json"})
    model_dir: Optional[str] = field(default=None, metadata={
        "help": "init or pipeline folder for the parts the run did not train (vae/, text_encoder/, tokenizer/, "
                "scheduler/); None: the checkpoint itself, when it is a full pipeline folder"})
    format: str = field(default="both", metadata={"choices": list(FORMATS), "help": "diffusers folder, original-SD "
                                                                                      "single file, or both"})
    use_ema: bool = field(default=False, metadata={"help": "export unet_ema/ (next to unet/) instead of unet/"})
    dtype: str = field(default="float32", metadata={"choices": list(DTYPES), "help": "dtype of the written weights"})

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("--checkpoint must be a folder, got an empty value")
        if not self.output_path:
            raise ValueError("--output_path must be a folder, got an empty value")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")


@dataclass(frozen=True)
class ExportConfig:
    """What runs, is logged and is saved as OUTPUT_PATH/export_config.json."""

    args: ExportArguments
    checkpoint: str  # absolute
    model_dir: str  # absolute: --model_dir, or the checkpoint itself
    components: Components
    output_path: str  # absolute
    diffusers_dir: Optional[str]  # None: not exported
    original_file: Optional[str]
    notices: Tuple[str, ...] = ()


def resolve(args: ExportArguments) -> ExportConfig:
    """Every path checked before any weights load: one error naming the path on bad input."""
    ckpt = os.path.abspath(args.checkpoint)
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--checkpoint: no such folder: {ckpt}")
    unet_dir = os.path.join(ckpt, "unet")
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        hint = " (this is a model folder itself: pass its parent)" if os.path.isfile(
            os.path.join(ckpt, "config.json")) else ""
        raise FileNotFoundError(f"--checkpoint {ckpt} is not a checkpoint or run folder of this recipe: "
                                f"no unet/config.json{hint}")
    if args.model_dir is None and not os.path.isdir(os.path.join(ckpt, "vae")):
        raise ValueError(f"--model_dir is required: {ckpt} holds no vae/ (a checkpoint keeps only the trained "
                         "parts); pass the init or pipeline folder the run started from")
    model_dir = os.path.abspath(args.model_dir) if args.model_dir is not None else ckpt
    trained_te = os.path.join(ckpt, "text_encoder")
    components = resolve_components(
        "eval", model_dir, unet=unet_dir, use_ema=args.use_ema,
        text_encoder=trained_te if os.path.isdir(trained_te) else None,
        flag_names={"root": "--model_dir", "unet": "--checkpoint", "text_encoder": "--checkpoint"})
    for folder in (components.unet, components.vae, components.text_encoder):
        safetensors_weights(folder)
    formats = ("diffusers", "original") if args.format == "both" else (args.format,)
    if args.dtype == "bfloat16" and "diffusers" in formats and importlib.util.find_spec("torch") is None:
        raise ValueError("--dtype bfloat16 with --format diffusers/both needs torch installed: without it "
                         "ppdiffusers writes float16 instead; use --format original or another --dtype")
    out = os.path.abspath(args.output_path)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise FileExistsError(f"--output_path {out} exists and is not an empty folder")
    notices = []
    prediction = read_scheduler_config(components.scheduler).get("prediction_type", "epsilon")
    if "original" in formats and prediction != "epsilon":
        notices.append(f"the run predicts {prediction}: load {ORIGINAL_FILE} with a matching inference config "
                       "(e.g. a v-prediction yaml in AUTOMATIC1111); the single file does not record it")
    return ExportConfig(args=args, checkpoint=ckpt, model_dir=model_dir, components=components, output_path=out,
                        diffusers_dir=os.path.join(out, DIFFUSERS_DIR) if "diffusers" in formats else None,
                        original_file=os.path.join(out, ORIGINAL_FILE) if "original" in formats else None,
                        notices=tuple(notices))


def safetensors_weights(folder: str) -> List[str]:
    """The folder's .safetensors files; an error if it has none or holds pickles."""
    names = sorted(os.listdir(folder))
    pickles = [n for n in names if is_pickled(n)]  # the one rule (trainer/checkpoint.py)
    if pickles:
        raise ValueError(f"{folder} holds pickle weights {pickles}: export reads safetensors only (loading a "
                         "pickle can run code); re-save the model with safe_serialization=True")
    found = [n for n in names if n.endswith(".safetensors")]
    if not found:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return found


def read_scheduler_config(folder: str) -> dict:
    return read_config(os.path.join(folder, "scheduler_config.json"))


# ------------------------------------------------------------------------------------------ diffusers -> original
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet(rest: str, table: Dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key(key: str, layers_per_block: int, up_attentions: frozenset) -> str:
    """The original LDM name of a diffusers UNet key. Each down block is layers_per_block input blocks plus a
    downsampler block; each up block is layers_per_block + 1 output blocks, the last one carrying the upsampler
    after its resnet (and attention, when the up block has them)."""
    n = layers_per_block + 1
    for old, new in UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = MID.fullmatch(key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{2 * j}.{_resnet(rest, RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = BLOCK.fullmatch(key)
    if not m:
        raise ValueError(f"UNet key {key} has no original-SD name (an architecture other than SD v1/v2?)")
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * n}.0.op.{rest.partition('.')[2]}"
        slot = "0." + _resnet(rest, RESNET) if kind == "resnets" else "1." + rest
        return f"input_blocks.{1 + b * n + j}.{slot}"
    if kind == "upsamplers":
        return f"output_blocks.{b * n + layers_per_block}.{2 if b in up_attentions else 1}.{rest}"
    slot = "0." + _resnet(rest, RESNET) if kind == "resnets" else "1." + rest
    return f"output_blocks.{b * n + j}.{slot}"


def vae_key(key: str, num_up_blocks: int) -> str:
    """The original LDM name of a diffusers VAE key (the decoder's up blocks are numbered in reverse)."""
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    m = MID.fullmatch(rest)
    if m:
        kind, j, tail = m.groups()
        if kind == "resnets":
            return f"{coder}.mid.block_{int(j) + 1}.{_resnet(tail, {'conv_shortcut': 'nin_shortcut'})}"
        head, tail = next((h, tail[len(h):]) for h in VAE_ATTENTION if tail.startswith(h + "."))
        return f"{coder}.mid.attn_1.{VAE_ATTENTION[head]}{tail}"
    m = BLOCK.fullmatch(rest)
    if m:
        side, b, kind, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        level = b if side == "down_blocks" else num_up_blocks - 1 - b
        name = "down" if side == "down_blocks" else "up"
        if kind in ("downsamplers", "upsamplers"):
            return f"{coder}.{name}.{level}.{name}sample.{tail}"
        return f"{coder}.{name}.{level}.block.{j}.{_resnet(tail, {'conv_shortcut': 'nin_shortcut'})}"
    head, _, tail = rest.partition(".")
    return f"{coder}.{VAE_TOP.get(head, head)}.{tail}"


def torch_layout(model) -> Dict[str, np.ndarray]:
    """The model's float32 state dict in PyTorch layout, by ppdiffusers' own paddle -> PyTorch conversion."""
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_paddle_state_dict_to_pytorch

    state = {k: v.astype("float32").numpy() for k, v in model.state_dict().items()}
    shapes = {k: v.shape for k, v in state.items()}
    state = {k: np.asarray(v) for k, v in convert_paddle_state_dict_to_pytorch(model, state).items()}
    squeezed = [k for k, v in state.items() if v.ndim == 0 and shapes[k] == (1,)]
    if squeezed:  # the package squeezes every 1-d tensor; a [1] parameter would load with the wrong shape
        raise ValueError(f"{type(model).__name__} has one-element parameters {squeezed}: not exportable as is")
    return state


def original_state_dict(unet, vae, text_encoder) -> Dict[str, np.ndarray]:
    """The single-file checkpoint (float32), checked against ppdiffusers' original -> diffusers reader."""
    lpb = unet.config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"the original-SD format needs one layers_per_block for all blocks, got {lpb}")
    up_attn = frozenset(i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t)
    unet_sd, vae_sd, te_sd = torch_layout(unet), torch_layout(vae), torch_layout(text_encoder)
    out = {PREFIXES["unet"] + unet_key(k, lpb, up_attn): v for k, v in unet_sd.items()}
    for k, v in vae_sd.items():
        # the original VAE attention is 1x1 convolutions
        is_attn = ".mid_block.attentions." in k and k.endswith(".weight") and v.ndim == 2
        out[PREFIXES["vae"] + vae_key(k, len(vae.config.up_block_types))] = v[:, :, None, None] if is_attn else v
    out.update({PREFIXES["text_encoder"] + k: v for k, v in te_sd.items()})
    positions = text_encoder.config.max_position_embeddings  # SD v1 releases carry the ids; old loaders want them
    out[PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    if len(out) != len(unet_sd) + len(vae_sd) + len(te_sd) + 1:
        raise RuntimeError("two diffusers keys mapped to one original key")
    _check_with_package(out, unet, unet_sd, vae, vae_sd)
    return out


def _check_with_package(original, unet, unet_sd, vae, vae_sd) -> None:
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_unet_checkpoint,
                                                                          convert_ldm_vae_checkpoint)

    # the reader takes configs shaped like its own create_unet_diffusers_config: num_class_embeds only when set
    unet_config = {k: v for k, v in unet.config.items() if not (k == "num_class_embeds" and v is None)}
    back = {"UNet": (convert_ldm_unet_checkpoint(dict(original), unet_config), unet_sd),
            "VAE": (convert_ldm_vae_checkpoint(dict(original), dict(vae.config)), vae_sd)}
    for label, (read, expected) in back.items():
        wrong = sorted(set(read) ^ set(expected)) or [k for k in expected if not np.array_equal(read[k], expected[k])]
        if wrong:
            raise RuntimeError(f"{label}: ppdiffusers' convert_from_ckpt reads the original-SD keys back differently "
                               f"({len(wrong)} keys, first {wrong[0]}); this architecture is not exportable as is")


def cast(state: Dict[str, np.ndarray], dtype: str) -> Dict[str, np.ndarray]:
    """Floating tensors to dtype with paddle's cast (the diffusers export's cast); bfloat16 stays as uint16 bits."""
    import paddle

    if dtype == "float32":
        return state
    return {k: paddle.to_tensor(v).cast(dtype).numpy() if v.dtype == np.float32 else v for k, v in state.items()}


def save_safetensors(state: Dict[str, np.ndarray], path: str, dtype: str) -> None:
    """safetensors.numpy cannot write bfloat16 (numpy has none), so the tensor specs are built here."""
    from safetensors import TensorSpec, serialize_file

    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    specs = {k: TensorSpec(dtype="bfloat16" if dtype == "bfloat16" and v.dtype == np.uint16 else v.dtype.name,
                           shape=list(v.shape), data_ptr=v.ctypes.data, data_len=v.nbytes) for k, v in arrays.items()}
    serialize_file(specs, path, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ the run
def export(config: ExportConfig) -> ExportConfig:
    import paddle
    from sd.eval.evaluation import load_pipeline

    pipe = load_pipeline(config.components, "ddim")
    parent = os.path.dirname(config.output_path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(config.output_path)}.", dir=parent)
    try:
        if config.original_file is not None:
            state = original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
            save_safetensors(cast(state, config.args.dtype), os.path.join(tmp, ORIGINAL_FILE), config.args.dtype)
        if config.diffusers_dir is not None:
            for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                module.to(dtype=getattr(paddle, config.args.dtype))
            pipe.save_pretrained(os.path.join(tmp, DIFFUSERS_DIR), to_diffusers=True)
        save_config(os.path.join(tmp, EXPORT_CONFIG_NAME), config)
        _usual_permissions(tmp)
        if os.path.isdir(config.output_path):
            os.rmdir(config.output_path)  # empty, checked by resolve
        os.replace(tmp, config.output_path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return config


def _usual_permissions(root: str) -> None:
    """mkdtemp and the safetensors writer create owner-only entries; an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~umask)


def main(argv: Optional[List[str]] = None) -> ExportConfig:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_args([ExportArguments], argv)
    config = resolve(args)
    logger.info("export config:\n%s", format_config(config))
    for notice in config.notices:
        logger.info("%s", notice)
    export(config)
    written = [p for p in (config.diffusers_dir, config.original_file) if p is not None]
    print(f"exported {config.components.unet} ({config.args.dtype}) to: {', '.join(written)}")
    return config
