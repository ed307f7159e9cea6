"""Inference from a trained checkpoint: model loading, prompts, per-image seeds, file names and layouts.

eval.py is the command line over this module (its configuration: sd/eval/args.py; writing a folder of images
over one or many ranks: sd/eval/generation.py), generate_images.py the
reference's spelling of it; sd/eval/adherence.py reuses `sample_images` to score the demo captions, and the
training-time image logging reuses it too.

Prompt files are untrusted input: read as bytes a line at a time with a cap (MAX_PROMPT_BYTES; longer lines are
skipped and counted, never held whole), decoded as UTF-8 (a BOM is dropped); non-UTF-8 bytes, a NUL, an empty
table, a missing column, a folder or a FIFO are each one error naming the file (and byte offset).

Reproducibility (why the seeds work this way):
- Every image gets its own seed, derived from (--seed, prompt index, image index) with numpy's SeedSequence, and
  its initial latents are drawn from that seed with numpy and handed to the pipeline. So an image depends on its
  prompt's position in the list, never on --batch_size or on which other prompts share its pipeline call, and the
  same seeds are reused at every guidance scale, which makes a guidance sweep a paired comparison. ("Never" up to
  float rounding: a matmul over another batch size may round the last bit, so a pixel can differ by 1/255.)
- `paddle.Generator().manual_seed()` cannot give per-image streams here: ppdiffusers replaces paddle.Generator by a
  tracker of CUDA RNG states, which on CPU reseeds paddle's *global* generator, so a list of generators collapses
  into one stream shared by the whole batch.
- Schedulers that add noise at every step (sampling.STOCHASTIC_SCHEDULERS) draw it from paddle's global RNG; for
  them each prompt gets its own pipeline call with the global RNG reseeded from the prompt's seed (and restored
  after), which keeps results independent of --batch_size at the price of smaller batches. Announced in the log.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle
from PIL import Image
from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer  # the classes StableDiffusionPipeline expects

from sd.components import Components
from sd.eval import sampling
from sd.eval.args import EvalConfig, PromptArguments, SamplingArguments

logger = logging.getLogger("sd.eval")

PROMPT_TABLE_DELIMITERS = {"csv": ",", "tsv": "\t"}
# A prompt longer than this is skipped (counted): CLIP reads 77 tokens, so 64 KiB is far beyond any real prompt,
# and it stays under the csv module's 128 KiB field limit (a process-wide setting we leave alone).
MAX_PROMPT_BYTES = 64 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
_LATENTS, _STEP_NOISE = 0, 1  # purpose tags mixed into derived seeds so the two streams never coincide


def _prompt_lines(f, path: str, skipped: Counter) -> Iterator[str]:
    """The text lines of a binary file, each decoded as UTF-8 on its own (a UTF-8 byte sequence never holds a
    newline byte), read at most MAX_PROMPT_BYTES at a time so a huge line costs no memory: it is drained and
    counted as skipped. A byte-order mark on the first line is dropped. Non-UTF-8 bytes or a NUL end the read with
    the file and byte offset (a binary, UTF-16 or legacy-encoded file: every later prompt would be wrong too)."""
    offset = number = 0
    while True:
        raw = f.readline(MAX_PROMPT_BYTES + 1)
        if not raw:
            return
        number, start = number + 1, offset
        offset += len(raw)
        if len(raw) > MAX_PROMPT_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(MAX_PROMPT_BYTES)
                offset += len(raw)
            skipped["over_long"] += 1
            continue
        nul = raw.find(b"\0")
        if nul >= 0:
            raise ValueError(f"{path}: NUL byte at byte offset {start + nul} (line {number}): prompt files are "
                             "UTF-8 text (is it binary or UTF-16?)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # re-raised with the file and offset the bare error lacks
            raise ValueError(f"{path}: not UTF-8 at byte offset {start + e.start} (line {number}): {e.reason}; "
                             "save it as UTF-8 (e.g. iconv -f GB18030 -t UTF-8)") from None
        yield text[1:] if number == 1 and text.startswith("\ufeff") else text


def read_prompts(path: str, column: Optional[str] = None,
                 file_format: Optional[str] = None) -> Tuple[List[str], Dict[str, int]]:
    """Prompts of a text file (one a line) or a .csv/.tsv (the `column` of each row, e.g. coco30k's caption_en;
    file_format overrides the extension), and the count of skipped rows by reason: blank, or over_long (more
    than MAX_PROMPT_BYTES). Anything else wrong with the file is one ValueError naming it."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--prompt_file {path} is a folder, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--prompt_file: no such file: {path}")
    if not os.path.isfile(path):  # a FIFO or device would block or never end
        raise ValueError(f"--prompt_file {path} is not a regular file")
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    file_format = file_format or (suffix if suffix in PROMPT_TABLE_DELIMITERS else "txt")
    skipped = Counter(blank=0, over_long=0)
    prompts: List[str] = []
    with open(path, "rb") as f:
        lines = _prompt_lines(f, path, skipped)
        if file_format == "txt":
            if column is not None:
                raise ValueError(f"--prompt_column needs a .csv or .tsv --prompt_file, got {path}")
            cells = (line.strip() for line in lines)
        else:
            if column is None:
                raise ValueError(f"--prompt_file {path} is a table: pass --prompt_column (e.g. caption_en)")
            cells = _table_cells(lines, path, column, PROMPT_TABLE_DELIMITERS[file_format])
        for cell in cells:
            if len(cell.encode("utf-8")) > MAX_PROMPT_BYTES:  # a quoted cell spanning lines
                skipped["over_long"] += 1
            elif cell:
                prompts.append(cell)
            else:
                skipped["blank"] += 1
    if not prompts:
        raise ValueError(f"--prompt_file {path}: no prompts (skipped: {dict(skipped)})")
    return prompts, dict(skipped)


def _table_cells(lines: Iterator[str], path: str, column: str, delimiter: str) -> Iterator[str]:
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        fieldnames = reader.fieldnames
        if fieldnames is None:
            raise ValueError(f"{path} is empty: no header row with a column {column!r}")
        if column not in fieldnames:
            tabbed = delimiter != "\t" and any(column in name.split("\t") for name in fieldnames)
            raise ValueError(f"{path}: no column {column!r}; columns: {fieldnames}" + (
                " (the header is tab-separated: pass --prompt_format tsv, or name the file .tsv)" if tabbed else ""))
        for row in reader:
            if None in row:  # more cells than header columns: a caption would be cut at its first delimiter
                raise ValueError(f"{path}: line {reader.line_num} has more cells than the header's {len(fieldnames)} "
                                 f"(quote cells holding {delimiter!r}; a tab-separated file named .csv, as PaddleMIX's "
                                 "coco30k.csv: pass --prompt_format tsv, or name it .tsv)")
            yield (row[column] or "").strip()
    except csv.Error as e:  # e.g. a quoted field longer than csv's field limit: named, not a bare traceback
        raise ValueError(f"{path}: malformed table at line {reader.line_num}: {e}") from None


def prompt_list(args: PromptArguments) -> List[str]:
    """The prompts of a generate run: the --prompt values, or the rows of --prompt_file. The ppdiffusers layout
    pairs image i with row i, so there a skipped row is an error rather than a shift of every later pair."""
    if not args.prompt_file:
        return list(args.prompt)
    prompts, skipped = read_prompts(args.prompt_file, args.prompt_column, args.prompt_format)
    if args.layout == "ppdiffusers" and sum(skipped.values()):
        raise ValueError(f"{args.prompt_file}: rows skipped ({skipped}), but the ppdiffusers layout pairs image i "
                         "with caption row i (compute_fid_clip_score.py): fix those rows")
    logger.info("prompt file %s: %d prompts, skipped %s", args.prompt_file, len(prompts), skipped)
    return prompts


def load_pipeline(components: Components, scheduler: str, unet_variant: Optional[str] = None,
                  text_encoder_variant: Optional[str] = None):
    """A StableDiffusionPipeline (eval mode, no safety checker) with the chosen sampling scheduler built from the
    resolved scheduler config, so the sampler shares the training noise schedule. The variants were checked to
    exist by sd/eval/args.resolve_variants (ppdiffusers would fall back to the plain weights)."""
    vae = AutoencoderKL.from_pretrained(components.vae)
    text_encoder = CLIPTextModel.from_pretrained(components.text_encoder, variant=text_encoder_variant)
    tokenizer = CLIPTokenizer.from_pretrained(components.tokenizer)
    unet = UNet2DConditionModel.from_pretrained(components.unet, variant=unet_variant)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"UNet {components.unet} expects text features of size {unet.config.cross_attention_dim} "
                         f"but the text encoder {components.text_encoder} gives {text_encoder.config.hidden_size}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"UNet {components.unet} takes {unet.config.in_channels} channels but the VAE "
                         f"{components.vae} has {vae.config.latent_channels} latent channels")
    train_config = DDPMScheduler.load_config(components.scheduler)
    for module in (vae, text_encoder, unet):
        module.eval()
    pipe = sampling.make_pipeline(vae, text_encoder, tokenizer, unet,
                                  sampling.make_scheduler(scheduler, train_config))
    logger.info("model: vae %s, unet %s (variant %s), text encoder %s, scheduler %s (%s, %s)", components.vae,
                components.unet, unet_variant, components.text_encoder, scheduler, components.scheduler,
                train_config.get("prediction_type"))
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
def sample_images(pipe, prompts: Sequence[str], prompt_indices: Sequence[int], config: SamplingArguments,
                  guidance_scale: float, height: int, width: int, num_images_per_prompt: int = 1,
                  negative_prompt: Optional[str] = None) -> List[List[Image.Image]]:
    """num_images_per_prompt images for each prompt, in calls of config.batch_size prompts; image k of prompt i
    comes from image_seed(config.seed, prompt_indices[i], k) whatever the batching."""
    if len(prompts) != len(prompt_indices):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} prompt indices")
    n = num_images_per_prompt
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    stochastic = config.scheduler in sampling.STOCHASTIC_SCHEDULERS
    per_call = 1 if stochastic else config.batch_size
    out: List[List[Image.Image]] = []
    for start in range(0, len(prompts), per_call):
        chunk, indices = list(prompts[start:start + per_call]), prompt_indices[start:start + per_call]
        # The pipeline wants one negative prompt per prompt when prompts come as a list.
        negative = None if negative_prompt is None else [negative_prompt] * len(chunk)
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


def guidance_folder(guidance: float, layout: str = "eval") -> str:
    """The folder of one guidance scale: g7.5 (eval) or mscoco.en_g7.5 (ppdiffusers, as its FID/CLIP script is
    pointed at)."""
    return f"g{guidance:g}" if layout == "eval" else f"mscoco.en_g{guidance:g}"


def image_file(layout: str, prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}_{image_index:02d}.png" if layout == "eval" else f"{prompt_index:05d}_000.png"


def foreign_images(config: EvalConfig, num_prompts: int) -> List[str]:
    """Images already in a ppdiffusers-layout folder that this run will not overwrite: compute_fid_clip_score.py
    reads every image of the folder, so leftovers of an earlier, longer run would be scored with this one."""
    s, p = config.sampling, config.prompts
    if p is None or p.layout != "ppdiffusers":
        return []
    ours = {image_file(p.layout, i, 0) for i in range(num_prompts)}
    found = []
    for guidance in s.guidance_scales:
        folder = os.path.join(s.output_dir, guidance_folder(guidance, p.layout))
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                      if n not in ours and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return found
