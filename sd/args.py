"""The training stage's configuration: typed arguments (PdArgumentParser dataclasses), then one resolve step.

Every flag of the reference's sd_args.py is declared here once, on the dataclass that owns it, or inherited from
paddlenlp's TrainingArguments; the data section is the loader's own config (trainer/loader/config.py). Each
__post_init__ only validates its own values.

`parse_train` is the one place the reference's environment switches are read (FLAG_USE_EMA, FLAG_RECOMPUTE,
FLAG_XFORMERS, FLAG_FUSED_LINEAR, FLAG_BENCHMARK, FLAG_TO_STATIC: ENV_ALIASES), so every launch path honours them
(train.sh, `python -u train_txt2img_laion400m_trainer.py`, `python -m paddle.distributed.launch ...`): each becomes
its flag placed before the command line's, so an explicit flag still wins.

`resolve_train` then turns the parsed arguments and the device into a new, frozen `TrainRun`: where every model
component comes from (sd/components.py, the one resolver shared with eval), the precision and model features this
device runs, the learning rates, the notices, and what each reference spelling became (`aliases`: the FLAG_*
variables taken or overridden, `--report_to custom_visualdl`), and whether --file_list is a latent dataset that fits
the run (check_latents: its manifest against the resolved VAE, text encoder, tokenizer and data flags, refused in
one line). The parsed arguments are never changed; the
TrainRun is what runs, what is logged, and what is saved as train_config.json in output_dir and in every
checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Mapping, NamedTuple, Optional, Tuple

from paddlenlp.trainer import TrainingArguments

from sd.components import Components, read_config, resolve_components, tokenizer_max_length
from sd.config import build_parser, parse_args, save_config
from sd.device import DeviceFacts, resolve_model_features, resolve_precision
from trainer.loader.config import DataArguments

logger = logging.getLogger("sd")

PREDICTION_TYPES = ("epsilon", "v_prediction")
SNR_WEIGHTINGS = ("min_snr", "capped_x0")
TRAIN_CONFIG_NAME = "train_config.json"
# The reference's environment switches (its sd_args.py, exported by its README's 4.2/4.3 commands) -> our field.
ENV_ALIASES: Tuple[Tuple[str, str], ...] = (
    ("FLAG_USE_EMA", "use_ema"),
    ("FLAG_RECOMPUTE", "recompute"),
    ("FLAG_XFORMERS", "enable_xformers_memory_efficient_attention"),
    ("FLAG_FUSED_LINEAR", "use_fused_linear"),
    ("FLAG_BENCHMARK", "benchmark"),
    ("FLAG_TO_STATIC", "to_static"),
)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "t", "yes", "y"), ("0", "false", "f", "no", "n")  # the reference's str2bool
# The reference's default logger (VisualDL scalars plus its image logging) is ours under paddlenlp's name.
REPORT_TO_ALIASES = {"custom_visualdl": "visualdl"}


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
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Folder of a CLIPTokenizer (default: the root's tokenizer/, else the "
                                "tokenizer/ beside the text encoder)."})
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "Tokenizer padding/truncation length (default: the tokenizer's own "
                                "model_max_length: 77 for SD v1's, 16 for the tiny default's)."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train the text encoder."})
    unet_learning_rate: Optional[float] = field(default=None, metadata={"help": "Overrides --learning_rate for the UNet."})
    text_encoder_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the text encoder (default: the UNet's)."})
    prediction_type: str = field(default="epsilon", metadata={"help": "What the UNet predicts.", "choices": list(PREDICTION_TYPES)})
    noise_offset: float = field(default=0.0, metadata={"help": "Offset noise scale (0 = off); 0.05-0.1 typical."})
    snr_gamma: Optional[float] = field(default=None, metadata={"help": "Min-SNR-gamma weighting (5.0 recommended)."})
    snr_weighting: str = field(
        default="min_snr",
        metadata={"help": "What --snr_gamma caps. min_snr: the x0 error weighted min(SNR, gamma) (Hang et al.), which "
                  "drops the high-noise steps; capped_x0 (v_prediction only): weighted min(SNR + 1, gamma), the plain "
                  "v loss with its low-noise weight capped, high-noise steps kept.", "choices": list(SNR_WEIGHTINGS)})
    input_perturbation: float = field(default=0.0, metadata={"help": "Input perturbation scale (0.1 recommended)."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the UNet (ppdiffusers LitEma)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (warmed up as (1+n)/(10+n))."})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "Memory-efficient attention (needs a CUDA device)."})
    use_fused_linear: bool = field(default=False, metadata={"help": "Fused Linear layers (needs a CUDA device)."})
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps of the logged samples."})

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"--prediction_type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        for name in ("noise_offset", "input_perturbation"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if self.snr_weighting not in SNR_WEIGHTINGS:
            raise ValueError(f"--snr_weighting {self.snr_weighting!r} not in {SNR_WEIGHTINGS}")
        if self.snr_weighting == "capped_x0" and self.prediction_type != "v_prediction":
            raise ValueError("--snr_weighting capped_x0 needs --prediction_type v_prediction (for epsilon its weight "
                             "min(SNR + 1, gamma) / SNR is unbounded at high noise)")
        for name in ("unet_learning_rate", "text_encoder_learning_rate"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.model_max_length is not None and self.model_max_length < 2:
            raise ValueError(f"--model_max_length must be >= 2, got {self.model_max_length}")
        if self.num_inference_steps < 1:
            raise ValueError(f"--num_inference_steps must be >= 1, got {self.num_inference_steps}")


@dataclass
class SDTrainingArguments(TrainingArguments):
    image_logging_steps: int = field(
        default=1000, metadata={"help": "Log samples every N steps (0 or less = never, as the reference's -1)."})
    only_save_updated_model: bool = field(
        default=True, metadata={"help": "Save only trained parts (unet, unet_ema, text_encoder) in checkpoints."})
    benchmark: bool = field(default=False, metadata={"help": "Print ips, reader cost and peak memory."})
    profiler_options: Optional[str] = field(default=None, metadata={"help": "paddle profiler options string."})
    sample_prompts: List[str] = field(
        default_factory=lambda: ["a photo of an astronaut riding a horse on mars",
                                 "a little girl dances in the cherry blossom rain"],
        metadata={"help": "Fixed prompts of the logged samples."})
    trust_pickled_checkpoint: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint (or load a model folder) holding pickled files (.pdparams, .pdopt, "
                  "...) or an unverified older checkpoint: unpickling runs code, so only for files you made."})
    max_nonfinite_steps: int = field(
        default=20, metadata={"help": "Consecutive non-finite losses/gradients that stop the run."})
    # The reference's defaults: a constant schedule, no clipping unless asked.
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning rate schedule."})
    # Prompt-set evaluation every --eval_steps (paddlenlp's field; sd/eval/in_training.py): every rank draws its
    # slice of --eval_prompts; scored with what is given (CLIP, FID; demo captions: adherence).
    eval_prompts: Optional[str] = field(
        default=None, metadata={"help": "Prompts evaluated every --eval_steps: a .txt, or a .csv/.tsv with "
                                "--eval_prompt_column (PaddleMIX's coco csv: caption_en)."})
    eval_prompt_column: Optional[str] = field(default=None, metadata={"help": "Column of a .csv/.tsv --eval_prompts."})
    eval_guidance_scale: float = field(default=7.5, metadata={"help": "Guidance of the evaluation images."})
    eval_num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps of the evaluation images."})
    clip_model: Optional[str] = field(
        default=None, metadata={"help": "Local CLIP model folder: CLIP score of the evaluation images."})
    inception_weights: Optional[str] = field(
        default=None, metadata={"help": "FID Inception weights (scripts/convert_inception_weights.py); with "
                                "--eval_reference_stats: FID of the evaluation images."})
    eval_reference_stats: Optional[str] = field(
        default=None, metadata={"help": "Reference statistics .npz (eval.py score --save_stats) for the FID."})

    def __post_init__(self):
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 are exclusive: pick one")
        if self.fp16_opt_level not in ("O1", "O2"):
            raise ValueError(f"--fp16_opt_level must be O1 or O2, got {self.fp16_opt_level!r}")
        if self.image_logging_steps > 0 and self.logging_steps and self.image_logging_steps % self.logging_steps:
            raise ValueError(f"--image_logging_steps ({self.image_logging_steps}) must be a multiple of "
                             f"--logging_steps ({self.logging_steps}), as in the reference")
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError("--max_steps must be > 0: the data stream is infinite")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0 (it keys numpy SeedSequences), got {self.seed}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"--per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        self._check_eval_fields()
        super().__post_init__()

    def _check_eval_fields(self):
        """The prompt-set evaluation's flags (their files' contents: sd/eval/in_training.plan_eval, at start)."""
        if self.eval_steps is not None and self.eval_steps < 0:
            raise ValueError(f"--eval_steps must be > 0, got {self.eval_steps}")
        if self.eval_prompts and not self.eval_steps:
            raise ValueError("--eval_prompts needs --eval_steps N (evaluate the prompts every N steps)")
        if self.eval_steps and not self.eval_prompts and str(getattr(self.evaluation_strategy, "value",
                                                                     self.evaluation_strategy)) == "no":
            raise ValueError(f"--eval_steps {self.eval_steps} needs --eval_prompts FILE (the prompts to evaluate)")
        if bool(self.inception_weights) != bool(self.eval_reference_stats):
            raise ValueError("--inception_weights and --eval_reference_stats go together (the FID needs both)")
        if self.eval_prompt_column is not None and not self.eval_prompts:
            raise ValueError("--eval_prompt_column goes with a .csv/.tsv --eval_prompts")
        if not self.eval_guidance_scale >= 1.0:
            raise ValueError(f"--eval_guidance_scale must be >= 1, got {self.eval_guidance_scale}")
        if self.eval_num_inference_steps < 1:
            raise ValueError(f"--eval_num_inference_steps must be >= 1, got {self.eval_num_inference_steps}")
        for name in ("eval_prompts", "inception_weights", "eval_reference_stats"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                raise FileNotFoundError(f"--{name}: no such file: {getattr(self, name)}")
        if self.clip_model and not os.path.isdir(self.clip_model):
            raise FileNotFoundError(f"--clip_model: no such folder: {self.clip_model}")


@dataclass(frozen=True)
class RunFeatures:
    """How the model runs on this device: what was asked, less what the device cannot do."""

    recompute: bool
    memory_efficient_attention: bool
    fused_linear: bool
    static_unet: bool  # --to_static: the UNet compiled (sd/model.py compile_unet), the wrapper stays dynamic


@dataclass(frozen=True)
class TrainRun:
    """The resolved training configuration: what runs, what is logged, what is saved."""

    model: ModelArguments  # as parsed
    data: DataArguments  # as parsed: the loader's config
    training: SDTrainingArguments  # the effective Trainer arguments (device precision, the UNet's learning rate)
    components: Components
    features: RunFeatures
    unet_learning_rate: float
    text_encoder_learning_rate: float
    notices: Tuple[str, ...]  # what this device cannot do, and what runs instead
    aliases: Tuple[str, ...] = ()  # the reference's spellings taken here (FLAG_* variables, custom_visualdl)
    latents: bool = False  # --file_list is a latent dataset (precompute_latents.py): the VAE is not run
    data_notices: Tuple[str, ...] = ()  # what training from that latent dataset means for this run

    def save(self, folder: str) -> str:
        return save_config(f"{folder.rstrip('/')}/{TRAIN_CONFIG_NAME}", self)


def resolve_train(model: ModelArguments, data: DataArguments, training: SDTrainingArguments,
                  device: Optional[DeviceFacts] = None, env: Tuple["EnvAlias", ...] = ()) -> TrainRun:
    """Parsed arguments + this device -> the run's resolved config. Raises on a missing or ambiguous component;
    everything the device cannot do becomes a notice and the mode it can do. `env`: the FLAG_* variables
    parse_train read, recorded as aliases."""
    device = device or DeviceFacts.detect()
    report_to = list(dict.fromkeys(REPORT_TO_ALIASES.get(r, r) for r in training.report_to))
    aliases = [a.notice() for a in env] + [
        f"--report_to {r} (the reference's logger) runs as {REPORT_TO_ALIASES[r]}: scalars, and images every "
        "--image_logging_steps" for r in training.report_to if r in REPORT_TO_ALIASES]
    components = resolve_components(
        "train", model.pretrained_model_name_or_path, vae=model.vae_name_or_path,
        text_encoder=model.text_encoder_name_or_path, tokenizer=model.tokenizer_name, unet=model.unet_name_or_path)
    model = dataclasses.replace(
        model, model_max_length=model.model_max_length or tokenizer_max_length(components.tokenizer))
    check_model_max_length(model.model_max_length, components)
    latents, latent_notices = check_latents(model, data, components)
    precision, precision_notices = resolve_precision(training.fp16, training.bf16, training.fp16_opt_level, device)
    features, feature_notices = resolve_model_features(
        model.enable_xformers_memory_efficient_attention, model.use_fused_linear, device)
    unet_lr = model.unet_learning_rate or training.learning_rate
    effective = dataclasses.replace(
        training, fp16=precision.fp16, bf16=precision.bf16, fp16_opt_level=precision.fp16_opt_level,
        # The scheduler's base value is the UNet's rate (--unet_learning_rate wins over --learning_rate).
        learning_rate=unet_lr, report_to=report_to,
        # The Trainer's to_static would capture the whole wrapper, whose keyed random draws are host-side numpy;
        # the recipe compiles the UNet instead (RunFeatures.static_unet).
        to_static=False,
        # Our loader restores its exact position from the checkpoint; the Trainer's skip-by-iterating would
        # re-read data for nothing (and for an infinite stream, forever).
        ignore_data_skip=True)
    return TrainRun(
        model=model, data=data, training=effective, components=components,
        features=RunFeatures(recompute=training.recompute,
                             memory_efficient_attention=features.memory_efficient_attention,
                             fused_linear=features.fused_linear, static_unet=bool(training.to_static)),
        unet_learning_rate=unet_lr, text_encoder_learning_rate=model.text_encoder_learning_rate or unet_lr,
        notices=tuple(precision_notices + feature_notices), aliases=tuple(aliases),
        latents=latents, data_notices=tuple(latent_notices))


def check_latents(model: ModelArguments, data: DataArguments, components: Components) -> Tuple[bool, List[str]]:
    """Whether --file_list is a latent dataset, and the notices of training from it. A dataset made with another
    VAE, scaling factor, resolution, interpolation, tokenizer, text encoder or length, without the mirrored
    moments --random_flip needs, or with cached embeddings under --train_text_encoder, is refused in one line.
    --center_crop False is a notice: the cache holds the center crop, which is what trains."""
    from data_tools.latent_format import check_compatible
    from trainer.loader.latent_stream import listed_latent_manifests, refuse_buckets

    listed = listed_latent_manifests(data.file_list)
    if not listed or listed[0][1] is None:
        return False, []
    refuse_buckets(data)
    scaling = read_config(os.path.join(components.vae, "config.json")).get("scaling_factor", 0.18215)
    for filelist, manifest in listed:
        problems = check_compatible(
            manifest, components.vae, components.text_encoder, components.tokenizer, data.resolution, scaling,
            model_max_length=model.model_max_length, center_crop=True, random_flip=data.random_flip,
            interpolation=data.interpolation, train_text_encoder=model.train_text_encoder)
        if problems:
            raise ValueError(f"--file_list: the latent dataset {filelist} does not fit this run: "
                             + "; ".join(problems))
    notices = ["training from cached latents (--file_list is a latent dataset): the VAE"
               + (" and the text encoder are" if listed[0][1]["dependencies"]["text_embeddings"] else " is")
               + " not run"]
    if not data.center_crop:
        notices.append("--center_crop False: the latent dataset holds the center crop, which is what trains")
    return True, notices


def check_model_max_length(model_max_length: int, components: Components) -> None:
    """The tokenizer pads to --model_max_length and the text encoder must embed that many positions: a longer
    length would fail at the first step with a shape error deep in the text encoder, so it is refused here."""
    positions = read_config(os.path.join(components.text_encoder, "config.json")).get("max_position_embeddings")
    if positions is not None and model_max_length > positions:
        raise ValueError(f"--model_max_length {model_max_length} exceeds the text encoder's max_position_embeddings "
                         f"{positions} ({components.text_encoder}): use --model_max_length {positions} or less")


@dataclass(frozen=True)
class EnvAlias:
    """One FLAG_* variable found set, and whether it was taken or an explicit flag won."""

    variable: str
    raw: str
    flag: str
    value: bool
    overridden: bool  # the command line names the flag itself: it wins

    def notice(self) -> str:
        if self.overridden:
            return f"{self.variable}={self.raw} not taken: --{self.flag} on the command line wins"
        return f"--{self.flag} {self.value} from the environment ({self.variable}={self.raw})"


def read_env_aliases(environ: Mapping[str, str], argv: List[str]) -> Tuple[EnvAlias, ...]:
    """The FLAG_* variables set in `environ` (empty = unset), each checked as the reference's str2bool reads it."""
    given = {tok[2:].split("=", 1)[0] for tok in argv if tok.startswith("--")}
    found = []
    for variable, name in ENV_ALIASES:
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        if raw.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"{variable} must be 1 or 0 (or true/false, yes/no), got {raw!r}")
        found.append(EnvAlias(variable, raw, name, raw.lower() in TRUE_WORDS, name in given))
    return tuple(found)


class TrainArgs(NamedTuple):
    model: ModelArguments
    data: DataArguments
    training: SDTrainingArguments
    env: Tuple[EnvAlias, ...]


def parse_train(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> TrainArgs:
    """train.py's arguments as parsed (not resolved): the command line (or a single .json of flags), with each
    FLAG_* variable of `environ` (default os.environ) placed before it as its flag, so an explicit flag wins."""
    types = (ModelArguments, DataArguments, SDTrainingArguments)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        argv = build_parser(types).read_json(os.path.abspath(argv[0]))
    env = read_env_aliases(os.environ if environ is None else environ, argv)
    prefix = [tok for a in env if not a.overridden for tok in (f"--{a.flag}", str(a.value))]
    model, data, training = parse_args(types, prefix + argv)
    return TrainArgs(model, data, training, env)


def parse_train_args(argv: Optional[List[str]] = None):
    """(ModelArguments, DataArguments, SDTrainingArguments) of train.py, as parsed (FLAG_* variables included)."""
    return tuple(parse_train(argv)[:3])
