"""eval.py's configuration: typed arguments declared once (the command line is generated from them), and the
resolve step that turns them into the frozen EvalConfig that runs, is logged and is saved as
OUTPUT_DIR/eval_config.json.

    generate:   ModelSourceArguments + SamplingArguments + PromptArguments
    adherence:  ModelSourceArguments + AdherenceSamplingArguments + AdherenceArguments

The two commands share every sampling field; adherence only changes some defaults (ADHERENCE_DEFAULTS).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from sd.components import Components, resolve_components
from sd.eval import sampling
from sd.tiny.make_demo_data import COLORS, POSITIONS, SHAPES

NUM_COMBINATIONS = len(COLORS) * len(SHAPES) * len(POSITIONS)
PIPELINE_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs rejects sizes that are not multiples of 8


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

    def resolve(self) -> Components:
        """Each component's folder (sd/components.py, purpose "eval"): checked before any weights load."""
        return resolve_components("eval", self.model_dir, unet=self.unet_path, text_encoder=self.text_encoder_path,
                                  use_ema=self.use_ema)


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

    def __post_init__(self) -> None:
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
    negative_prompt: Optional[str] = field(default=None, metadata={"help": "one negative prompt for every image"})
    num_images_per_prompt: int = field(default=1, metadata={"help": "images per prompt and guidance scale"})

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.prompt_file):
            raise ValueError("pass either --prompt (repeatable) or --prompt_file, exactly one of them")
        for i, p in enumerate(self.prompt):
            if not p.strip():
                raise ValueError(f"--prompt #{i + 1} is empty")
        if self.prompt_column is not None and not self.prompt_file:
            raise ValueError("--prompt_column goes with a .csv/.tsv --prompt_file")
        if self.num_images_per_prompt < 1:
            raise ValueError(f"--num_images_per_prompt must be >= 1, got {self.num_images_per_prompt}")


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
    """What an eval run runs: the parsed arguments, each component's folder, and sampling at its resolved size
    (a dataclasses.replace of the parsed sampling arguments). Never mutated."""

    command: str  # "generate" | "adherence"
    model: ModelSourceArguments
    components: Components
    sampling: SamplingArguments
    prompts: Optional[PromptArguments] = None
    adherence: Optional[AdherenceArguments] = None
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


def resolve(model: ModelSourceArguments, sampling_args: SamplingArguments,
            prompts: Optional[PromptArguments] = None, adherence: Optional[AdherenceArguments] = None) -> EvalConfig:
    """The run's EvalConfig. Components and sizes come from the model's config files, before any weights load,
    so a bad path or size fails in a second, not after a 4 GB load."""
    if (prompts is None) == (adherence is None):
        raise ValueError("an eval run is either generate (prompts) or adherence, exactly one")
    if not sampling_args.output_dir:
        raise ValueError("--output_dir is required")
    components = model.resolve()
    height, width = resolve_size(components.vae_config(), components.unet_config(), sampling_args.height,
                                 sampling_args.width)
    notices = []
    if sampling_args.scheduler in sampling.STOCHASTIC_SCHEDULERS and sampling_args.batch_size > 1:
        notices.append(f"{sampling_args.scheduler} draws noise at every step: one prompt per pipeline call, so "
                       "images do not depend on --batch_size")
    return EvalConfig(command="generate" if prompts is not None else "adherence", model=model,
                      components=components, sampling=dataclasses.replace(sampling_args, height=height, width=width),
                      prompts=prompts, adherence=adherence, notices=tuple(notices))
