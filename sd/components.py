"""Where each model component (VAE, text encoder, tokenizer, scheduler, UNet) comes from, for training and eval.

One question, one answer: a root folder (an init folder such as sd/tiny_init, or a pipeline folder) plus explicit
per-component overrides. What differs between training and eval is written once, in RULES (one row per
component, one column set per purpose), and `resolve_components` only reads that table:

- training may start the UNet from scratch: a root's unet_config.json, or an override ending in .json, means
  "build from this config"; a root holding both unet/ and unet_config.json is ambiguous, hence an error. Its
  scheduler/ is optional (the model falls back to its own default schedule). The tokenizer, like the
  reference's, needs no flag of its own: the root's tokenizer/, else the tokenizer/ beside the text encoder.
- eval needs trained weights: a UNet folder must hold config.json; --use_ema takes the unet_ema/ beside it.
  A checkpoint's scheduler/ beside its unet/ wins over the root's (sampling matches the training schedule), and
  a trained text_encoder/ beside it must be chosen explicitly (pairing the UNet with the original encoder would
  silently give wrong images). A text_encoder/ whose weight files are byte-identical (sha256) to the root's is
  the same encoder, not a trained one: a finished run's pipeline folder holds such a copy.

Every path is checked here, before any weights load: a mistyped path is an error naming the flag the user
passed, never a silently random component.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from data_tools.fileio import sha256_file, write_json_atomic

PURPOSES = ("train", "eval")
ROOT = "root"  # the key of the root folder's flag in ROOT_FLAGS and in flag_names


@dataclass(frozen=True)
class Rule:
    """How one component is found for one purpose."""

    flag: Optional[str]  # the override's flag in this purpose's CLI; None: no override exists
    required: bool  # missing => error; else the component is None
    config_file: Optional[str] = None  # a root file (or an override ending in .json) meaning "build from config"
    needs_file: Optional[str] = None  # a folder of this component must hold this file
    sibling: str = "ignore"  # a same-named folder next to the UNet's: "ignore" | "wins" | "choose" (explicitly)
    ema_folder: Optional[str] = None  # use_ema takes this folder next to the UNet folder instead
    beside: Optional[str] = None  # else the same-named folder next to this (earlier) component's folder
    hint: str = ""  # appended to "the root has no <subfolder>/"


@dataclass(frozen=True)
class Row:
    component: str  # a field of Components
    subfolder: str  # its folder in a root
    label: str  # how messages name it
    train: Rule
    eval: Rule


# The one table. The UNet comes first: the scheduler's and text encoder's sibling rules look next to it.
RULES: Tuple[Row, ...] = (
    Row("unet", "unet", "UNet",
        train=Rule("--unet_name_or_path", True, config_file="unet_config.json"),
        eval=Rule("--unet_path", True, needs_file="config.json", ema_folder="unet_ema",
                  hint=" (an init folder holds only a config): pass --unet_path with a trained unet/ folder")),
    Row("vae", "vae", "VAE",
        train=Rule("--vae_name_or_path", True),
        eval=Rule(None, True)),
    Row("text_encoder", "text_encoder", "text encoder",
        train=Rule("--text_encoder_name_or_path", True),
        eval=Rule("--text_encoder_path", True, sibling="choose")),
    Row("tokenizer", "tokenizer", "tokenizer",
        train=Rule("--tokenizer_name", True, beside="text_encoder"),
        eval=Rule(None, True)),
    Row("scheduler", "scheduler", "scheduler",
        train=Rule(None, False),
        eval=Rule(None, True, sibling="wins")),
)
ROOT_FLAGS = {"train": "--pretrained_model_name_or_path", "eval": "--model_dir"}
ROOT_REQUIRED = {"train": False, "eval": True}
WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".bin", ".pt", ".pth", ".ckpt", ".msgpack")
# What StableDiffusionPipeline.from_pretrained needs in a pipeline folder's model_index.json (the sd/tiny_init
# folder and a finished run's output_dir). ppdiffusers 0.29 maps "paddlenlp.transformers" to
# ppdiffusers.transformers; naming it directly says which CLIPTextModel class reads the weights.
MODEL_INDEX: Dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.29.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["ppdiffusers", "DDPMScheduler"],
    "text_encoder": ["ppdiffusers.transformers", "CLIPTextModel"],
    "tokenizer": ["ppdiffusers.transformers", "CLIPTokenizer"],
    "unet": ["ppdiffusers", "UNet2DConditionModel"],
    "vae": ["ppdiffusers", "AutoencoderKL"],
}


@dataclass(frozen=True)
class Components:
    """The concrete location of each component. unet is a .json config iff unet_from_config (train from
    scratch); scheduler is None only for a training root without scheduler/."""

    vae: str
    text_encoder: str
    tokenizer: str
    scheduler: Optional[str]
    unet: str
    unet_from_config: bool = False

    def vae_config(self) -> dict:
        return read_config(os.path.join(self.vae, "config.json"))

    def unet_config(self) -> dict:
        return read_config(self.unet if self.unet_from_config else os.path.join(self.unet, "config.json"))


CLIP_MODEL_MAX_LENGTH = 77  # CLIPTokenizer's own default, when a tokenizer folder does not set it


def tokenizer_max_length(tokenizer_dir: str) -> int:
    """The padding length a tokenizer folder declares (tokenizer_config.json "model_max_length"): SD v1's is 77,
    the tiny default's 16. --model_max_length defaults to it, so the length a model trains with is the one its
    pipeline folder samples with."""
    return int(_tokenizer_config(tokenizer_dir).get("model_max_length", CLIP_MODEL_MAX_LENGTH))


def set_tokenizer_max_length(tokenizer_dir: str, length: int) -> None:
    """Make `length` the padding length of a tokenizer folder (model_max_length, and max_len, which older readers
    use), its other settings as they are: build_tiny_init.py's tiny tokenizer, and a run's pipeline folder when it
    trained with another --model_max_length than its tokenizer's."""
    write_json_atomic(os.path.join(tokenizer_dir, "tokenizer_config.json"),
                      {**_tokenizer_config(tokenizer_dir), "max_len": length, "model_max_length": length}, indent=2)


def _tokenizer_config(tokenizer_dir: str) -> dict:
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    return read_config(path) if os.path.isfile(path) else {}


def read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing config file: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_components(purpose: str, root: Optional[str], *, vae: Optional[str] = None,
                       text_encoder: Optional[str] = None, tokenizer: Optional[str] = None,
                       unet: Optional[str] = None, use_ema: bool = False,
                       flag_names: Optional[Mapping[str, str]] = None) -> Components:
    """Components for `purpose` ("train" or "eval") from `root` and explicit overrides (which win). flag_names
    maps a component (or "root") to the flag a caller's CLI calls it, when that differs from RULES."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    names = {ROOT: ROOT_FLAGS[purpose], **{row.component: getattr(row, purpose).flag for row in RULES},
             **(flag_names or {})}
    explicit = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    root_flag = names[ROOT]
    if root is None:
        if ROOT_REQUIRED[purpose]:
            raise ValueError(f"{root_flag} is required")
    elif not os.path.isdir(root):
        raise FileNotFoundError(f"{root_flag}: no such folder: {root}")

    found: Dict[str, Optional[str]] = {}
    unet_base = from_config = None
    for row in RULES:
        rule: Rule = getattr(row, purpose)
        flag, given = names[row.component], explicit.get(row.component)
        if given is not None and flag is None:
            raise ValueError(f"{purpose} takes no override for the {row.label}")
        if given is not None:
            path = _check_explicit(row, rule, flag, os.path.normpath(given))
        else:
            path = _from_root(row, rule, root, root_flag, flag, unet_base, found)
        if path is not None and rule.needs_file and not os.path.isfile(os.path.join(path, rule.needs_file)):
            hint = os.path.join(path, row.subfolder)
            hint = f" (did you mean {hint}?)" if os.path.isdir(hint) else ""
            raise FileNotFoundError(f"{flag if given is not None else root_flag} {path} is not a {row.label} "
                                    f"folder: no {rule.needs_file}{hint}")
        if row.component == "unet":
            unet_base = path
            from_config = bool(rule.config_file) and path.endswith(".json")
            if use_ema:
                if rule.ema_folder is None:
                    raise ValueError(f"use_ema picks an EMA {row.label} folder for eval only, not for {purpose}")
                path = os.path.join(os.path.dirname(unet_base), rule.ema_folder)
                if not os.path.isdir(path):
                    raise FileNotFoundError(f"--use_ema: no {rule.ema_folder}/ next to {unet_base} (was the run "
                                            f"trained with --use_ema?): expected {path}")
        found[row.component] = path
    return Components(vae=found["vae"], text_encoder=found["text_encoder"], tokenizer=found["tokenizer"],
                      scheduler=found["scheduler"], unet=found["unet"], unet_from_config=from_config)


def _check_explicit(row: Row, rule: Rule, flag: str, path: str) -> str:
    if rule.config_file and path.endswith(".json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: no such config file: {path}")
    elif not os.path.isdir(path):
        also = " (and not a .json config)" if rule.config_file else ""
        raise FileNotFoundError(f"{flag}: no such folder{also}: {path}")
    return path


def _from_root(row: Row, rule: Rule, root: Optional[str], root_flag: str, flag: Optional[str],
               unet_base: Optional[str], found: Mapping[str, Optional[str]]) -> Optional[str]:
    """The component's location when no override names it: a sibling of the UNet folder (per rule.sibling),
    else the root's subfolder (or config file), else (rule.beside) the folder next to another component's."""
    sub = os.path.join(root, row.subfolder) if root is not None else None
    default = sub if sub is not None and os.path.isdir(sub) else None
    if default is None and rule.beside and found.get(rule.beside):
        beside = os.path.join(os.path.dirname(found[rule.beside]), row.subfolder)
        default = beside if os.path.isdir(beside) else None
    if rule.config_file and root is not None:
        config = os.path.join(root, rule.config_file)
        if os.path.isfile(config):
            if default is not None:
                raise ValueError(f"{root} has both {row.subfolder}/ and {rule.config_file}: pass {flag} explicitly")
            default = config
    sibling = os.path.join(os.path.dirname(unet_base), row.subfolder) if unet_base else None
    if rule.sibling != "ignore" and sibling is not None and os.path.isdir(sibling):
        if rule.sibling == "wins":
            return sibling
        same = default is not None and (os.path.abspath(sibling) == os.path.abspath(default)
                                        or same_weights(sibling, default))
        if not same:
            raise ValueError(f"{os.path.dirname(unet_base)} holds a trained {row.subfolder}/: pass {flag} "
                             f"{sibling} (or {flag} {sub} to use the original on purpose)")
    if default is None and rule.required:
        wanted = row.subfolder + "/" + (f" or {rule.config_file}" if rule.config_file else "")
        beside = f", or a {row.subfolder}/ beside the {rule.beside.replace('_', ' ')}" if rule.beside else ""
        if root is None:
            raise ValueError(f"{flag} is required (or a {root_flag} with {wanted}{beside})")
        if flag is None or rule.hint:
            raise FileNotFoundError(f"{root_flag} {root} has no {wanted}" + (rule.hint or " folder"))
        raise FileNotFoundError(f"{root_flag} {root} has no {wanted}: pass {flag}")
    return default


def weight_digests(folder: str) -> Dict[str, str]:
    """{file name: sha256} of the weight files directly in `folder` (what from_pretrained reads)."""
    return {name: sha256_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, name))}


def same_weights(a: str, b: str) -> bool:
    """Two component folders hold the same weights: the same weight file names, byte for byte."""
    digests = weight_digests(a)
    return bool(digests) and digests == weight_digests(b)
