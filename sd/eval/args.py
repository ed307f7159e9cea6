"""eval.py's configuration: typed arguments declared once (the command line is generated from them), and the
resolve step that turns them into the frozen EvalConfig that runs, is logged and is saved as
OUTPUT_DIR/eval_config.json.

    generate:   ModelSourceArguments + SamplingArguments + PromptArguments
    adherence:  ModelSourceArguments + AdherenceSamplingArguments + AdherenceArguments

The two commands share every sampling field; adherence only changes some defaults (ADHERENCE_DEFAULTS).
generate_images.py (the reference's entry name) translates its own flags into these same dataclasses.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Tuple

import paddle

from sd.components import Components, read_config, resolve_components
from sd.device import DeviceFacts
from sd.eval import sampling
from sd.tiny.make_demo_data import COLORS, POSITIONS, SHAPES

NUM_COMBINATIONS = len(COLORS) * len(SHAPES) * len(POSITIONS)
PIPELINE_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs rejects sizes that are not multiples of 8
VARIANT_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # ppdiffusers puts it inside a file name: no dots, no slashes
DEVICE_PATTERN = re.compile(r"cpu|gpu(:[0-9]+)?")
# Output layouts of a generate run (sd/eval/evaluation.py writes them):
#   eval:        g<scale>/<prompt:05d>_<image:02d>.png, a grid per prompt, index.json
#   ppdiffusers: mscoco.en_g<scale>/<prompt:05d>_000.png and nothing else in the folder, as the reference's
#                generate_images.py writes it and its scripts/fid_clip_score reads it (images paired with the
#                caption rows by sorted position), index.json beside the folders.
LAYOUTS = ("eval", "ppdiffusers")


@dataclass(frozen=True)
class ModelSourceArguments:
    _argument_group_name = "model"

    model_dir: str = field(metadata={"help": "init or pipeline folder with vae/, text_encoder/, tokenizer/, "
                                             "scheduler/ (and unet/)"})
    unet_path: Optional[str] = field(default=None, metadata={"help": "a checkpoint's unet/ folder (None: "
                                                                      "MODEL_DIR/unet)"})
    use_ema: bool = field(default=False, metadata={"help": "use the unet_ema/ folder next to the unet/ folder"})
    text_encoder_path: Optional[str] = field(
        default=None, metadata={"help": "a trained text encoder folder (None: MODEL_DIR/text_encoder)"})
    variant: Optional[str] = field(
        default=None, metadata={"help": "the UNet's weight variant, as ppdiffusers' from_pretrained(variant=...): "
                                        "ema loads unet/diffusion_paddle_model.ema.safetensors"})

    def __post_init__(self) -> None:
        if self.variant is not None and not VARIANT_PATTERN.fullmatch(self.variant):
            raise ValueError(f"--variant must be a name of letters, digits, _ or - (e.g. ema, bf16), "
                             f"got {self.variant!r}")
        if self.variant is not None and self.use_ema:
            raise ValueError(f"--use_ema (the unet_ema/ folder) and --variant {self.variant} (a file in unet/) "
                             "pick different weights: pass one of them")

    def resolve(self, flag_names: Optional[Mapping[str, str]] = None) -> Components:
        """Each component's folder (sd/components.py, purpose "eval"): checked before any weights load.
        flag_names: how another entry's command line names these flags (generate_images.py)."""
        return resolve_components("eval", self.model_dir, unet=self.unet_path, text_encoder=self.text_encoder_path,
                                  use_ema=self.use_ema, flag_names=flag_names)


@dataclass(frozen=True)
class SamplingArguments:
    _argument_group_name = "sampling"

    scheduler: str = field(default="ddim", metadata={"choices": sorted(sampling.SCHEDULERS),
                                                     "help": "sampling scheduler (the training schedule's betas)"})
    num_inference_steps: int = field(default=50, metadata={"help": "denoising steps"})
    guidance_scales: List[float] = field(
        default_factory=lambda: [7.5], metadata={"help": "a sweep: every prompt at every scale, with the same seeds"})
    height: Optional[int] = field(
        default=None, metadata={"help": "pixels; a multiple of the VAE factor and of 8 (None: the model's native)"})
    width: Optional[int] = field(
        default=None, metadata={"help": "pixels; a multiple of the VAE factor and of 8 (None: the model's native)"})
    seed: int = field(default=42, metadata={"help": "per-image seeds derive from it and the prompt index"})
    batch_size: int = field(default=8, metadata={"help": "prompts per pipeline call"})
    output_dir: Optional[str] = field(default="outputs/eval", metadata={"help": "where images and JSON go"})
    device: Optional[str] = field(
        default=None, metadata={"help": "cpu, gpu or gpu:N (None: gpu when a CUDA device is visible, else cpu); "
                                        "gpu on a machine without CUDA runs on cpu, announced"})

    def __post_init__(self) -> None:
        if self.device is not None and not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"--device must be cpu, gpu or gpu:N, got {self.device!r}")
        if self.scheduler not in sampling.SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r} not in {sorted(sampling.SCHEDULERS)}")
        for name in ("num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not self.guidance_scales:
            raise ValueError("--guidance_scales needs at least one value")
        for g in self.guidance_scales:
            # StableDiffusionPipeline skips classifier-free guidance for any scale <= 1, so 0.5 would silently
            # produce the same images as 1.0 in a sweep.
            if not math.isfinite(g) or g < 1.0:
                raise ValueError(f"--guidance_scales: {g} is not >= 1 (scales <= 1 all mean 'no guidance')")
        if len(set(self.guidance_scales)) != len(self.guidance_scales):
            raise ValueError(f"--guidance_scales has duplicates: {self.guidance_scales}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be positive, got {value}")


def with_defaults(cls, name: str, doc: str, **defaults):
    """A frozen subclass of dataclass `cls` whose named fields take other defaults and keep their type, help and
    checks: a command's variant of shared arguments without a second list of fields."""
    hints = typing.get_type_hints(cls)
    base = {f.name: f for f in dataclasses.fields(cls)}
    namespace = {"__annotations__": {k: hints[k] for k in defaults}, "__module__": cls.__module__,
                 "__qualname__": name, "__doc__": doc}
    for key, value in defaults.items():
        if isinstance(value, list):
            namespace[key] = field(default_factory=functools.partial(list, value), metadata=base[key].metadata)
        else:
            namespace[key] = field(default=value, metadata=base[key].metadata)
    return dataclass(frozen=True)(type(name, (cls,), namespace))


# The adherence command's defaults: the demo's 32 px, a quick 20 steps, and the guidance pair it compares.
ADHERENCE_DEFAULTS = {"num_inference_steps": 20, "guidance_scales": [1.0, 7.5], "height": 32, "width": 32,
                      "batch_size": 32, "output_dir": "outputs/adherence"}
AdherenceSamplingArguments = with_defaults(SamplingArguments, "AdherenceSamplingArguments",
                                           "SamplingArguments with eval.py adherence's defaults.",
                                           **ADHERENCE_DEFAULTS)


@dataclass(frozen=True)
class PromptArguments:
    _argument_group_name = "prompts"

    # "extend": `--prompt a --prompt b` (as before) and `--prompt a b` both give [a, b].
    prompt: List[str] = field(default_factory=list,
                              metadata={"action": "extend", "help": "one or more prompts; the flag may repeat"})
    prompt_file: Optional[str] = field(
        default=None, metadata={"help": "a .txt (one prompt a line) or a .csv/.tsv with --prompt_column"})
    prompt_column: Optional[str] = field(
        default=None, metadata={"help": "column of a .csv/.tsv prompt file, e.g. caption_en (coco30k)"})
    prompt_format: Optional[str] = field(
        default=None, metadata={"choices": ["txt", "csv", "tsv"],
                                "help": "how to read --prompt_file (None: by its extension, .csv/.tsv or text)"})
    negative_prompt: Optional[str] = field(default=None, metadata={"help": "one negative prompt for every image"})
    num_images_per_prompt: int = field(default=1, metadata={"help": "images per prompt and guidance scale"})
    layout: str = field(default="eval", metadata={
        "choices": list(LAYOUTS), "help": "eval: g<scale>/<prompt>_<image>.png with grids; ppdiffusers: "
                                          "mscoco.en_g<scale>/<prompt>_000.png only, as the reference's "
                                          "generate_images.py writes them for its FID/CLIP script"})

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.prompt_format not in (None, "txt", "csv", "tsv"):
            raise ValueError(f"--prompt_format must be txt, csv or tsv, got {self.prompt_format!r}")
        if bool(self.prompt) == bool(self.prompt_file):
            raise ValueError("pass either --prompt (repeatable) or --prompt_file, exactly one of them")
        for i, p in enumerate(self.prompt):
            if not p.strip():
                raise ValueError(f"--prompt #{i + 1} is empty")
        if self.prompt_column is not None and not self.prompt_file:
            raise ValueError("--prompt_column goes with a .csv/.tsv --prompt_file")
        if self.prompt_format is not None and not self.prompt_file:
            raise ValueError("--prompt_format goes with --prompt_file")
        if self.num_images_per_prompt < 1:
            raise ValueError(f"--num_images_per_prompt must be >= 1, got {self.num_images_per_prompt}")
        if self.layout == "ppdiffusers" and self.num_images_per_prompt != 1:
            # compute_fid_clip_score.py pairs the folder's sorted images with the caption rows one to one.
            raise ValueError(f"--layout ppdiffusers writes one image per prompt: --num_images_per_prompt must be "
                             f"1, got {self.num_images_per_prompt}")


@dataclass(frozen=True)
class AdherenceArguments:
    _argument_group_name = "adherence"

    num_per_combination: int = field(default=4, metadata={"help": "images per attribute combination (K)"})
    max_combinations: Optional[int] = field(
        default=None, metadata={"help": f"a deterministic, balanced subset of the {NUM_COMBINATIONS} combinations"})

    def __post_init__(self) -> None:
        if self.num_per_combination < 1:
            raise ValueError(f"--num_per_combination must be >= 1, got {self.num_per_combination}")
        if self.max_combinations is not None and not 1 <= self.max_combinations <= NUM_COMBINATIONS:
            raise ValueError(f"--max_combinations must be in [1, {NUM_COMBINATIONS}], got {self.max_combinations}")


@dataclass(frozen=True)
class EvalConfig:
    """What an eval run runs: the parsed arguments, each component's folder and weight variant, and sampling at
    its resolved size and device (a dataclasses.replace of the parsed sampling arguments). Never mutated."""

    command: str  # "generate" | "adherence"
    model: ModelSourceArguments
    components: Components
    sampling: SamplingArguments
    prompts: Optional[PromptArguments] = None
    adherence: Optional[AdherenceArguments] = None
    unet_variant: Optional[str] = None
    text_encoder_variant: Optional[str] = None
    entry: Optional[object] = None  # the arguments of the entry that translated its flags into these (if any)
    notices: Tuple[str, ...] = ()


def resolve_size(vae_config, unet_config, height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
    """(height, width): defaults to the UNet's native size; each must be a multiple of the VAE's downsampling
    factor 2**(len(block_out_channels)-1) and of the pipeline's 8."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    native = int(unet_config["sample_size"]) * factor
    multiple = max(factor, PIPELINE_SIZE_MULTIPLE)  # both powers of two: the max is their lcm
    out = []
    for name, value in (("height", height), ("width", width)):
        value = native if value is None else value
        if value % multiple:
            raise ValueError(f"--{name} {value} is not a multiple of {multiple} (the VAE downsamples by {factor} "
                             f"and StableDiffusionPipeline needs multiples of {PIPELINE_SIZE_MULTIPLE}); this "
                             f"model's native size is {native}")
        out.append(value)
    return out[0], out[1]


def resolve_device(requested: Optional[str], facts: DeviceFacts, gpu_count: int) -> Tuple[str, List[str]]:
    """The paddle device to sample on, and a notice when it is not the one asked for (never silent)."""
    if requested is None:
        return ("gpu" if facts.cuda else "cpu"), []
    if requested == "cpu":
        return "cpu", []
    if not facts.cuda:
        return "cpu", [f"--device {requested}: this machine has no CUDA device (paddle built without CUDA or no GPU "
                       "visible): sampling on cpu"]
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= gpu_count:
        raise ValueError(f"--device {requested}: only {gpu_count} GPU(s) visible (gpu:0..gpu:{gpu_count - 1})")
    return requested, []


def weight_variants(folder: str) -> List[str]:
    """The variants of the weight files in a component folder: 'ema' for diffusion_paddle_model.ema.safetensors
    (ppdiffusers' _add_variant puts the variant before the last suffix)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted({part for name in names for part in name.split(".")[1:-1]
                   if part not in ("safetensors", "index", "bin", "pdparams")})


def resolve_variants(model: ModelSourceArguments, components: Components,
                     flag_names: Mapping[str, str]) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(UNet variant, text encoder variant, notices). ppdiffusers falls back to the plain weights, with only a log
    line, when the variant's file is missing, which would quietly sample the non-EMA UNet: checked here instead.
    A text encoder passed explicitly gets the variant too when it has that file (as the reference passes its
    variant to both); the recipe writes variants (ema) for the UNet only, so otherwise it loads its plain weights,
    announced."""
    if model.variant is None:
        return None, None, []
    flag = flag_names.get("variant", "--variant")
    have = weight_variants(components.unet)
    if model.variant not in have:
        raise FileNotFoundError(f"{flag} {model.variant}: the UNet folder {components.unet} holds no "
                                f"*.{model.variant}.* weight file (variants there: {have or 'none'})")
    if model.text_encoder_path is None:
        return model.variant, None, []
    if model.variant in weight_variants(components.text_encoder):
        return model.variant, model.variant, []
    return model.variant, None, [f"{flag} {model.variant}: the text encoder {components.text_encoder} has no such "
                                 "variant: loading its plain weights"]


def resolve(model: ModelSourceArguments, sampling_args: SamplingArguments,
            prompts: Optional[PromptArguments] = None, adherence: Optional[AdherenceArguments] = None, *,
            flag_names: Optional[Mapping[str, str]] = None, entry: Optional[object] = None,
            notices: Tuple[str, ...] = (), device: Optional[DeviceFacts] = None) -> EvalConfig:
    """The run's EvalConfig. Components and sizes come from the model's config files, before any weights load,
    so a bad path or size fails in a second, not after a 4 GB load. flag_names maps an eval field (or component,
    as sd/components.py names them) to the flag another entry calls it, so its messages name the user's flag;
    entry and notices come from that entry's translation (generate_images.py)."""
    names = dict(flag_names or {})
    if (prompts is None) == (adherence is None):
        raise ValueError("an eval run is either generate (prompts) or adherence, exactly one")
    out_flag = names.get("output_dir", "--output_dir")
    if not sampling_args.output_dir:
        raise ValueError(f"{out_flag} is required")
    if os.path.exists(sampling_args.output_dir) and not os.path.isdir(sampling_args.output_dir):
        raise NotADirectoryError(f"{out_flag} {sampling_args.output_dir} is a file, not a folder")
    components = model.resolve(names)
    height, width = resolve_size(components.vae_config(), components.unet_config(), sampling_args.height,
                                 sampling_args.width)
    train_steps = int(read_config(os.path.join(components.scheduler, "scheduler_config.json"))
                      .get("num_train_timesteps", 1000))
    if sampling_args.num_inference_steps > train_steps:
        raise ValueError(f"--num_inference_steps {sampling_args.num_inference_steps} is more than the "
                         f"{train_steps} timesteps the model was trained with ({components.scheduler})")
    unet_variant, text_encoder_variant, variant_notices = resolve_variants(model, components, names)
    facts = DeviceFacts.detect() if device is None else device
    gpu_count = paddle.device.cuda.device_count() if facts.cuda else 0
    device_name, device_notices = resolve_device(sampling_args.device, facts, gpu_count)
    all_notices = list(notices) + variant_notices + device_notices
    if sampling_args.scheduler in sampling.STOCHASTIC_SCHEDULERS and sampling_args.batch_size > 1:
        all_notices.append(f"{sampling_args.scheduler} draws noise at every step: one prompt per pipeline call, "
                           "so images do not depend on --batch_size")
    return EvalConfig(command="generate" if prompts is not None else "adherence", model=model,
                      components=components, prompts=prompts, adherence=adherence,
                      sampling=dataclasses.replace(sampling_args, height=height, width=width, device=device_name),
                      unet_variant=unet_variant, text_encoder_variant=text_encoder_variant, entry=entry,
                      notices=tuple(all_notices))
