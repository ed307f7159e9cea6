"""Inference from a trained checkpoint: model loading, prompts, per-image seeds, PNGs, grids and index.json.

eval.py is the command line over this module; sd/eval/adherence.py reuses `sample_images` to score the demo captions.

Reproducibility (why the seeds work this way):
- Every image gets its own seed, derived from (--seed, prompt index, image index) with numpy's SeedSequence, and
  its initial latents are drawn from that seed with numpy and handed to the pipeline. So an image depends on its
  prompt's position in the list, never on --batch_size or on which other prompts share its pipeline call, and the
  same seeds are reused at every guidance scale, which makes a guidance sweep a paired comparison. ("Never" up to
  float rounding: a matmul over another batch size may round the last bit, so a pixel can differ by 1/255.)
- `paddle.Generator().manual_seed()` cannot give per-image streams here: ppdiffusers replaces paddle.Generator by a
  tracker of CUDA RNG states, which on CPU reseeds paddle's *global* generator, so a list of generators collapses
  into one stream shared by the whole batch.
- Schedulers that add noise at every step (STOCHASTIC_SCHEDULERS) draw it from paddle's global RNG; for them each
  prompt gets its own pipeline call with the global RNG reseeded from the prompt's seed (and restored after), which
  keeps results independent of --batch_size at the price of smaller batches. This is announced in the log.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle
from PIL import Image
from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer  # the classes StableDiffusionPipeline expects

from sd.eval import sampling

logger = logging.getLogger("sd.eval")

# Schedulers whose step() draws fresh noise (see the module docstring). DDIM (eta=0), PNDM, LMS, Euler (s_churn=0)
# and DPM-Solver++ (non-SDE) are deterministic given the initial latents.
STOCHASTIC_SCHEDULERS = frozenset({"euler-ancestral"})
PROMPT_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
INDEX_NAME = "index.json"
PIPELINE_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs rejects sizes that are not multiples of 8
_LATENTS, _STEP_NOISE = 0, 1  # purpose tags mixed into derived seeds so the two streams never coincide


@dataclass
class ModelSource:
    """Where each component comes from. Resolved and checked at construction, so a wrong path fails before any
    weights are loaded, and a missing UNet is an error (never a randomly initialised one)."""

    model_dir: str  # init or pipeline folder: vae/, text_encoder/, tokenizer/, scheduler/ (+ unet/)
    unet_path: Optional[str] = None  # a checkpoint's unet/ folder; default model_dir/unet
    use_ema: bool = False  # use the sibling unet_ema/ of the UNet folder
    text_encoder_path: Optional[str] = None  # a trained text encoder; default model_dir/text_encoder
    unet_dir: str = field(default="", init=False)
    text_encoder_dir: str = field(default="", init=False)
    scheduler_dir: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"--model_dir: no such folder: {self.model_dir}")
        for sub in ("vae", "tokenizer", "scheduler"):
            self._need_dir(os.path.join(self.model_dir, sub), f"--model_dir {self.model_dir} has no {sub}/ folder")
        if self.unet_path is None:
            base = os.path.join(self.model_dir, "unet")
            self._need_dir(base, f"--model_dir {self.model_dir} has no unet/ (an init folder holds only a config): "
                                 "pass --unet_path with a trained unet/ folder")
        else:
            base = os.path.normpath(self.unet_path)
            self._need_dir(base, f"--unet_path: no such folder: {self.unet_path}")
            if not os.path.isfile(os.path.join(base, "config.json")):
                hint = os.path.join(base, "unet")
                hint = f" (did you mean {hint}?)" if os.path.isdir(hint) else ""
                raise FileNotFoundError(f"--unet_path {self.unet_path} is not a UNet folder: no config.json{hint}")
        self.unet_dir = base
        if self.use_ema:
            self.unet_dir = os.path.join(os.path.dirname(base), "unet_ema")
            self._need_dir(self.unet_dir, f"--use_ema: no unet_ema/ next to {base} (was the run trained with "
                                          f"--use_ema?): expected {self.unet_dir}")
        self.text_encoder_dir = self._resolve_text_encoder(base)
        # A checkpoint carries the schedule it was trained with (e.g. v_prediction) next to unet/; it wins over
        # the model_dir's, so sampling always matches training.
        trained = os.path.join(os.path.dirname(base), "scheduler")
        self.scheduler_dir = trained if os.path.isdir(trained) else os.path.join(self.model_dir, "scheduler")

    def _resolve_text_encoder(self, unet_base: str) -> str:
        if self.text_encoder_path is not None:
            self._need_dir(self.text_encoder_path, f"--text_encoder_path: no such folder: {self.text_encoder_path}")
            return self.text_encoder_path
        # A checkpoint of a --train_text_encoder run keeps its text encoder next to unet/; pairing that UNet with
        # the original encoder would silently give wrong images, so the choice must be made explicitly.
        trained = os.path.join(os.path.dirname(unet_base), "text_encoder")
        default = os.path.join(self.model_dir, "text_encoder")
        if os.path.isdir(trained) and os.path.abspath(trained) != os.path.abspath(default):
            raise ValueError(f"{os.path.dirname(unet_base)} holds a trained text_encoder/: pass --text_encoder_path "
                             f"{trained} (or --text_encoder_path {default} to use the original on purpose)")
        self._need_dir(default, f"--model_dir {self.model_dir} has no text_encoder/ and no --text_encoder_path")
        return default

    @staticmethod
    def _need_dir(path: str, message: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(message)

    def vae_config(self) -> dict:
        return _read_json(os.path.join(self.model_dir, "vae", "config.json"))

    def unet_config(self) -> dict:
        return _read_json(os.path.join(self.unet_dir, "config.json"))


@dataclass
class SamplingConfig:
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scales: List[float] = field(default_factory=lambda: [7.5])
    height: Optional[int] = None  # None: the model's native size, unet sample_size * VAE factor
    width: Optional[int] = None
    seed: int = 42
    batch_size: int = 8  # prompts per pipeline call
    num_images_per_prompt: int = 1
    negative_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if self.scheduler not in sampling.SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r} not in {sorted(sampling.SCHEDULERS)}")
        for name in ("num_inference_steps", "batch_size", "num_images_per_prompt"):
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


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing config file: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


def read_prompts(path: str, column: Optional[str] = None) -> Tuple[List[str], Dict[str, int]]:
    """Prompts of a .txt (one a line) or a .csv/.tsv (the `column` of each row, e.g. coco30k's caption_en), and the
    count of skipped rows by reason (blank lines or cells)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompt_file: no such file: {path}")
    delimiter = PROMPT_TABLE_DELIMITERS.get(os.path.splitext(path)[1].lower())
    skipped = {"blank": 0}
    prompts: List[str] = []
    with open(path, encoding="utf-8", newline="" if delimiter else None) as f:
        if delimiter is None:
            if column is not None:
                raise ValueError(f"--prompt_column needs a .csv or .tsv --prompt_file, got {path}")
            cells = (line.strip() for line in f)
        else:
            if column is None:
                raise ValueError(f"--prompt_file {path} is a table: pass --prompt_column (e.g. caption_en)")
            reader = csv.DictReader(f, delimiter=delimiter)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise ValueError(f"{path}: no column {column!r}; columns: {reader.fieldnames}")
            cells = ((row[column] or "").strip() for row in reader)
        for cell in cells:
            if cell:
                prompts.append(cell)
            else:
                skipped["blank"] += 1
    if not prompts:
        raise ValueError(f"--prompt_file {path}: no prompts (skipped {skipped['blank']} blank)")
    return prompts, skipped


def load_pipeline(source: ModelSource, scheduler: str):
    """A StableDiffusionPipeline (eval mode, no safety checker) with the chosen sampling scheduler built from the
    model_dir's scheduler config, so the sampler shares the training noise schedule."""
    vae = AutoencoderKL.from_pretrained(os.path.join(source.model_dir, "vae"))
    text_encoder = CLIPTextModel.from_pretrained(source.text_encoder_dir)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(source.model_dir, "tokenizer"))
    unet = UNet2DConditionModel.from_pretrained(source.unet_dir)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"UNet {source.unet_dir} expects text features of size {unet.config.cross_attention_dim} "
                         f"but the text encoder {source.text_encoder_dir} gives {text_encoder.config.hidden_size}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"UNet {source.unet_dir} takes {unet.config.in_channels} channels but the VAE of "
                         f"{source.model_dir} has {vae.config.latent_channels} latent channels")
    train_config = DDPMScheduler.load_config(source.scheduler_dir)
    for module in (vae, text_encoder, unet):
        module.eval()
    pipe = sampling.make_pipeline(vae, text_encoder, tokenizer, unet,
                                  sampling.make_scheduler(scheduler, train_config))
    logger.info("model: %s, unet %s, text encoder %s, scheduler %s (%s, %s)", source.model_dir, source.unet_dir,
                source.text_encoder_dir, scheduler, source.scheduler_dir, train_config.get("prediction_type"))
    return pipe


def derive_seed(seed: int, purpose: int, prompt_index: int, image_index: int = 0) -> int:
    """A well-mixed 32-bit seed, a pure function of its inputs (nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([seed, purpose, prompt_index, image_index]).generate_state(1)[0])


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return derive_seed(seed, _LATENTS, prompt_index, image_index)


def initial_latents(seeds: Sequence[int], shape: Sequence[int]) -> paddle.Tensor:
    """N(0, 1) latents of shape [len(seeds), *shape], row i drawn from seeds[i] with numpy (device independent)."""
    rows = [np.random.default_rng(s).standard_normal(tuple(shape), dtype=np.float32) for s in seeds]
    return paddle.to_tensor(np.stack(rows))


@contextmanager
def _global_rng_seeded(seed: int) -> Iterator[None]:
    """Seed paddle's global RNG for one call, then restore it, so callers (e.g. a training test) are unaffected."""
    state = paddle.get_rng_state()
    paddle.seed(seed)
    try:
        yield
    finally:
        paddle.set_rng_state(state)


@paddle.no_grad()
def sample_images(pipe, prompts: Sequence[str], prompt_indices: Sequence[int], config: SamplingConfig,
                  guidance_scale: float, height: int, width: int) -> List[List[Image.Image]]:
    """config.num_images_per_prompt images for each prompt, in calls of config.batch_size prompts; image k of
    prompt i comes from image_seed(config.seed, prompt_indices[i], k) whatever the batching."""
    if len(prompts) != len(prompt_indices):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} prompt indices")
    n = config.num_images_per_prompt
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    stochastic = config.scheduler in STOCHASTIC_SCHEDULERS
    per_call = 1 if stochastic else config.batch_size
    out: List[List[Image.Image]] = []
    for start in range(0, len(prompts), per_call):
        chunk, indices = list(prompts[start:start + per_call]), prompt_indices[start:start + per_call]
        # The pipeline wants one negative prompt per prompt when prompts come as a list.
        negative = None if config.negative_prompt is None else [config.negative_prompt] * len(chunk)
        latents = initial_latents([image_seed(config.seed, i, k) for i in indices for k in range(n)], shape)
        kwargs = dict(height=height, width=width, num_inference_steps=config.num_inference_steps,
                      guidance_scale=guidance_scale, negative_prompt=negative,
                      num_images_per_prompt=n, latents=latents, output_type="pil")
        if stochastic:
            with _global_rng_seeded(derive_seed(config.seed, _STEP_NOISE, indices[0])):
                images = pipe(chunk, **kwargs).images
        else:
            images = pipe(chunk, **kwargs).images
        out.extend(images[j * n:(j + 1) * n] for j in range(len(chunk)))
    return out


def grid_columns(n: int) -> int:
    """One row up to 4 images, then a near-square grid."""
    return n if n <= 4 else math.ceil(math.sqrt(n))


def guidance_tag(guidance: float) -> str:
    return f"g{guidance:g}"


def generate_to_dir(pipe, prompts: Sequence[str], config: SamplingConfig, output_dir: str, height: int, width: int,
                    unet_dir: str = "") -> List[dict]:
    """Every image as PNG, one grid per prompt and guidance, and index.json (one entry per image); returns it."""
    if not prompts:
        raise ValueError("no prompts to generate")
    if config.scheduler in STOCHASTIC_SCHEDULERS and config.batch_size > 1:
        logger.info("%s draws noise at every step: one prompt per pipeline call, so images do not depend on "
                    "--batch_size", config.scheduler)
    entries: List[dict] = []
    for guidance in config.guidance_scales:
        sub = guidance_tag(guidance)
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
        images = sample_images(pipe, prompts, list(range(len(prompts))), config, guidance, height, width)
        for i, (prompt, per_prompt) in enumerate(zip(prompts, images)):
            grid_file = f"{sub}/{i:05d}_grid.png"
            sampling.grid(per_prompt, grid_columns(len(per_prompt))).save(os.path.join(output_dir, grid_file))
            for k, image in enumerate(per_prompt):
                file = f"{sub}/{i:05d}_{k:02d}.png"
                image.save(os.path.join(output_dir, file))
                entries.append({"prompt": prompt, "negative_prompt": config.negative_prompt,
                                "seed": image_seed(config.seed, i, k), "base_seed": config.seed,
                                "prompt_index": i, "image_index": k, "scheduler": config.scheduler,
                                "steps": config.num_inference_steps, "guidance": guidance, "height": height,
                                "width": width, "unet": unet_dir, "file": file, "grid": grid_file})
        logger.info("guidance %g: %d images in %s", guidance, len(prompts) * config.num_images_per_prompt,
                    os.path.join(output_dir, sub))
    write_json(os.path.join(output_dir, INDEX_NAME), entries)
    return entries


def write_json(path: str, obj) -> None:
    """Write through a temporary file and rename, so a crash never leaves a truncated index."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)
