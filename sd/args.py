"""Typed arguments of the UNet pretraining job (PdArgumentParser dataclasses), checked in __post_init__.

Every flag of the reference's section 4.2 is here or inherited from paddlenlp's TrainingArguments. Paths are
resolved once, here, with an explicit rule (see ModelArguments.resolve), so a mistyped path is an error at start
and never a silent random init.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from paddlenlp.trainer import PdArgumentParser, TrainingArguments

logger = logging.getLogger("sd")

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _dir_or_none(root: Optional[str], sub: str) -> Optional[str]:
    return os.path.join(root, sub) if root and os.path.isdir(os.path.join(root, sub)) else None


@dataclass
class ModelArguments:
    pretrained_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A pipeline or init folder (vae/, text_encoder/, tokenizer/, scheduler/, and unet/ or "
                  "unet_config.json). The *_name_or_path flags take precedence for their component."})
    vae_name_or_path: Optional[str] = field(default=None, metadata={"help": "Folder of a pretrained AutoencoderKL."})
    text_encoder_name_or_path: Optional[str] = field(default=None, metadata={"help": "Folder of a CLIPTextModel."})
    unet_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A UNet folder (pretrained weights) or a UNet config .json (train from scratch with the "
                  "reference's zero init)."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Folder of a CLIPTokenizer."})
    model_max_length: int = field(default=77, metadata={"help": "Tokenizer padding/truncation length."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train the text encoder."})
    unet_learning_rate: Optional[float] = field(default=None, metadata={"help": "Overrides --learning_rate for the UNet."})
    text_encoder_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the text encoder (default: the UNet's)."})
    prediction_type: str = field(default="epsilon", metadata={"help": "epsilon | v_prediction"})
    noise_offset: float = field(default=0.0, metadata={"help": "Offset noise scale (0 = off); 0.05-0.1 typical."})
    snr_gamma: Optional[float] = field(default=None, metadata={"help": "Min-SNR-gamma weighting (5.0 recommended)."})
    input_perturbation: float = field(default=0.0, metadata={"help": "Input perturbation scale (0.1 recommended)."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the UNet (ppdiffusers LitEma)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (warmed up as (1+n)/(10+n))."})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "Memory-efficient attention (needs a CUDA device)."})
    use_fused_linear: bool = field(default=False, metadata={"help": "Fused Linear layers (needs a CUDA device)."})
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps of the logged samples."})
    max_nonfinite_steps: int = field(
        default=20, metadata={"help": "Consecutive non-finite losses/gradients that stop the run."})

    # Filled by resolve(): the concrete location of each component.
    vae_path: str = field(default="", init=False)
    text_encoder_path: str = field(default="", init=False)
    tokenizer_path: str = field(default="", init=False)
    scheduler_path: Optional[str] = field(default=None, init=False)
    unet_path: str = field(default="", init=False)
    unet_from_config: bool = field(default=False, init=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"--prediction_type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        for name in ("noise_offset", "input_perturbation"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.model_max_length < 2:
            raise ValueError(f"--model_max_length must be >= 2, got {self.model_max_length}")
        self.resolve()

    def resolve(self) -> None:
        """Concrete component paths. Explicit flags win over --pretrained_model_name_or_path; every path must
        exist. The UNet is from scratch iff its path is a .json config."""
        root = self.pretrained_model_name_or_path
        if root is not None and not os.path.isdir(root):
            raise FileNotFoundError(f"--pretrained_model_name_or_path: no such folder: {root}")

        def pick(flag: str, explicit: Optional[str], sub: str) -> str:
            path = explicit or _dir_or_none(root, sub)
            if path is None:
                raise ValueError(f"--{flag} is required (or a --pretrained_model_name_or_path with {sub}/)")
            if not os.path.isdir(path):
                raise FileNotFoundError(f"--{flag}: no such folder: {path}")
            return path

        self.vae_path = pick("vae_name_or_path", self.vae_name_or_path, "vae")
        self.text_encoder_path = pick("text_encoder_name_or_path", self.text_encoder_name_or_path, "text_encoder")
        self.tokenizer_path = pick("tokenizer_name", self.tokenizer_name, "tokenizer")
        self.scheduler_path = _dir_or_none(root, "scheduler")
        unet = self.unet_name_or_path
        if unet is None and root is not None:
            # An init folder carries unet_config.json; a pipeline folder carries unet/. Both present is ambiguous.
            cfg, sub = os.path.join(root, "unet_config.json"), os.path.join(root, "unet")
            if os.path.isfile(cfg) and os.path.isdir(sub):
                raise ValueError(f"{root} has both unet/ and unet_config.json: pass --unet_name_or_path explicitly")
            unet = cfg if os.path.isfile(cfg) else sub if os.path.isdir(sub) else None
        if unet is None:
            raise ValueError("--unet_name_or_path is required (a UNet folder, or a .json config to train from scratch)")
        if unet.endswith(".json"):
            if not os.path.isfile(unet):
                raise FileNotFoundError(f"--unet_name_or_path: no such config file: {unet}")
            self.unet_from_config = True
        elif not os.path.isdir(unet):
            raise FileNotFoundError(f"--unet_name_or_path: no such folder (and not a .json config): {unet}")
        self.unet_path = unet


@dataclass
class DataArguments:
    file_list: str = field(default=None, metadata={"help": "A .filelist.list (each line: x.filelist [weight])."})
    resolution: int = field(default=512, metadata={"help": "Training image size (shorter side resized, then cropped)."})
    data_format: Optional[str] = field(
        default=None, metadata={"help": "laion400m | laion_aes (default: the dataset manifest, else laion400m)."})
    interpolation: str = field(default="lanczos", metadata={"help": "lanczos | bicubic | bilinear | nearest"})
    center_crop: bool = field(default=False, metadata={"help": "Center crop instead of random crop."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    min_image_size: int = field(default=0, metadata={"help": "Skip (and count) images with a smaller shorter side."})
    caption_dropout_prob: float = field(default=0.1, metadata={"help": "Probability of an empty caption (for CFG)."})
    shuffle_buffer_size: int = field(default=256, metadata={"help": "Per-worker shuffle buffer (records)."})

    def __post_init__(self):
        if not self.file_list:
            raise ValueError("--file_list is required (a .filelist.list written by create_pretraining_data.py)")
        if not os.path.isfile(self.file_list):
            raise FileNotFoundError(f"--file_list: no such file: {self.file_list}")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 <= self.caption_dropout_prob <= 1.0:
            raise ValueError(f"--caption_dropout_prob must be in [0, 1], got {self.caption_dropout_prob}")


@dataclass
class SDTrainingArguments(TrainingArguments):
    image_logging_steps: int = field(default=1000, metadata={"help": "Log samples every N steps (0 = never)."})
    only_save_updated_model: bool = field(
        default=True, metadata={"help": "Save only trained parts (unet, unet_ema, text_encoder) in checkpoints."})
    benchmark: bool = field(default=False, metadata={"help": "Print ips, reader cost and peak memory."})
    profiler_options: Optional[str] = field(default=None, metadata={"help": "paddle profiler options string."})
    sample_prompts: List[str] = field(
        default_factory=lambda: ["a photo of an astronaut riding a horse on mars",
                                 "a little girl dances in the cherry blossom rain"],
        metadata={"help": "Fixed prompts of the logged samples."})
    # The reference's defaults: a constant schedule, no clipping unless asked.
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning rate schedule."})

    notices: List[str] = field(default_factory=list, init=False)
    static_unet: bool = field(default=False, init=False)

    def __post_init__(self):
        # Our loader restores its own exact position from the checkpoint; the Trainer's skip-by-iterating would
        # re-read data for nothing (and for an infinite stream, forever).
        self.ignore_data_skip = True
        # The Trainer's to_static would capture the whole wrapper, whose keyed random draws are host-side numpy;
        # the recipe compiles the UNet instead (sd/model.py compile_unet).
        self.static_unet, self.to_static = bool(self.to_static), False
        if self.image_logging_steps < 0:
            raise ValueError(f"--image_logging_steps must be >= 0, got {self.image_logging_steps}")
        if self.image_logging_steps and self.logging_steps and self.image_logging_steps % self.logging_steps:
            raise ValueError(f"--image_logging_steps ({self.image_logging_steps}) must be a multiple of "
                             f"--logging_steps ({self.logging_steps}), as in the reference")
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError("--max_steps must be > 0: the data stream is infinite")
        from sd.device import resolve_precision

        self.notices.extend(resolve_precision(self))
        super().__post_init__()


def parse_args(dataclass_types, argv: Optional[List[str]] = None):
    """The dataclasses of an entry point from command-line flags (default sys.argv[1:]), or from a single .json
    argument holding them. train.py, train_vae.py and scripts/preflight.py all parse through here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = PdArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def parse_train_args(argv: Optional[List[str]] = None):
    """(ModelArguments, DataArguments, SDTrainingArguments) of train.py."""
    return parse_args((ModelArguments, DataArguments, SDTrainingArguments), argv)
