"""The reference's generate_images.py entry, kept so its commands run unchanged: its flags, translated onto eval.py.

    python generate_images.py --unet_model_name_or_path runs/x/unet --model_name_or_path runs/x \
        --file coco30k.tsv --save_path outputs --guidance_scales 3 7.5 --variant ema --device gpu

As the reference does, every caption of the --file's caption_en column (read as tab-separated, like its pandas
read_csv(sep="\\t")) is drawn once per guidance scale, into SAVE_PATH/mscoco.en_g<scale>/<row:05d>_000.png with
nothing else in those folders, which is what PaddleMIX's ppdiffusers/scripts/fid_clip_score/
compute_fid_clip_score.py reads (--image_path SAVE_PATH/mscoco.en_g7.5: the folder's sorted images paired with
the caption rows). index.json (prompt, seed, file per image) and eval_config.json (the resolved config, these
flags included) go to SAVE_PATH itself.

This is a translation, not a second sampler: GenerateImagesArguments declares the reference's flags (with its
defaults), `translate` maps each onto eval.py's dataclasses (sd/eval/args.py), and eval.py's start/run do the
rest, so the same seeds give the same images as eval.py. Where the reference behaves otherwise:
- --model_name_or_path (ours): the folder for the VAE, tokenizer, scheduler (and text encoder). The reference
  loads them from the hub id CompVis/stable-diffusion-v1-4; nothing is downloaded here, so it defaults to the
  pipeline folder holding --unet_model_name_or_path (a finished run's output_dir), announced, else an error.
- --file coco1k/coco10k/coco30k: the reference downloads the tsv when missing; here that is an error giving
  its URL (nothing is fetched at run time).
- --seed 0 or negative: the reference then samples unseeded; here a seed is drawn, announced and saved.
- --scheduler_type: the sampler is built from the model's own scheduler config (its betas and prediction type),
  where the reference rebuilds it with SD-v1 defaults; "euler-ancest" (the reference's choice, which its own
  code rejects) means euler-ancestral.
- Seeds: one per image from (--seed, row), eval.py's rule, so images do not depend on --batch_size or on the
  other guidance scales; the reference reseeds per batch, so its pixels differ from ours for the same --seed.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import eval as eval_entry
from sd.config import parse_args
from sd.eval.args import DEVICE_PATTERN, ModelSourceArguments, PromptArguments, SamplingArguments

logger = logging.getLogger("sd.eval")

VARIANTS = {"fp32": None, "bf16": "bf16", "fp16": "fp16", "ema": "ema"}  # reference flag -> ppdiffusers variant
SCHEDULER_TYPES = {"ddim": "ddim", "lms": "lms", "pndm": "pndm", "euler-ancest": "euler-ancestral",
                   "euler-ancestral": "euler-ancestral", "euler": "euler", "dpm-solver++": "dpm-solver++"}
COCO_FILES = ("coco1k", "coco10k", "coco30k")
COCO_URL = "https://bj.bcebos.com/paddlenlp/models/community/CompVis/data/{}.tsv"  # ppdiffusers' DOWNLOAD_SERVER
CAPTION_COLUMN = "caption_en"
PIPELINE_MARKER = "model_index.json"
# What float() accepts (nan/inf included: SamplingArguments then rejects them naming --guidance_scales).
NUMBER = re.compile(r"[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)
# How eval's messages name the flags this entry spells differently (sd/components.py's keys, eval field names).
FLAG_NAMES = {"root": "--model_name_or_path", "unet": "--unet_model_name_or_path",
              "text_encoder": "--text_encoder_model_name_or_path", "output_dir": "--save_path", "variant": "--variant"}


@dataclass(frozen=True)
class GenerateImagesArguments:
    """The reference generate_images.py's flags, with its defaults."""

    unet_model_name_or_path: str = field(metadata={"help": "the trained unet/ folder (e.g. OUTPUT_DIR/unet or a "
                                                           "checkpoint's unet/)"})
    text_encoder_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "a trained text_encoder/ folder (None: MODEL_NAME_OR_PATH/text_encoder)"})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "not in the reference (it downloads CompVis/stable-diffusion-v1-4): the local "
                                        "folder with vae/, tokenizer/, scheduler/, text_encoder/ (None: the "
                                        "pipeline folder holding the unet/, when it has model_index.json)"})
    file: str = field(default="coco30k", metadata={"help": "a tab-separated file with a caption_en column"})
    variant: str = field(default="fp32", metadata={"choices": list(VARIANTS),
                                                   "help": "weight variant (fp32: the plain weights; ema: the "
                                                           "EMA UNet, unet/diffusion_paddle_model.ema.safetensors)"})
    seed: int = field(default=42, metadata={"help": "base seed (<= 0: a random one, announced and saved)"})
    scheduler_type: str = field(default="ddim", metadata={"choices": list(SCHEDULER_TYPES), "help": "sampler"})
    device: str = field(default="gpu", metadata={"help": "cpu, gpu or gpu:N (gpu without CUDA: cpu, announced)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per pipeline call"})
    num_inference_steps: int = field(default=50, metadata={"help": "denoising steps"})
    save_path: str = field(default="outputs", metadata={"help": "output folder (mscoco.en_g<scale>/ inside)"})
    guidance_scales: List[str] = field(default_factory=lambda: ["1.5", "2", "3", "4", "5", "6", "7", "8"],
                                       metadata={"help": "one folder of images per scale"})
    height: int = field(default=256, metadata={"help": "pixels"})
    width: int = field(default=256, metadata={"help": "pixels"})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.scheduler_type not in SCHEDULER_TYPES:
            raise ValueError(f"--scheduler_type must be one of {list(SCHEDULER_TYPES)}, got {self.scheduler_type!r}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"--device must be cpu, gpu or gpu:N (other paddle devices are not supported here), "
                             f"got {self.device!r}")
        for g in self.guidance_scales:
            if not NUMBER.fullmatch(g.strip()):
                raise ValueError(f"--guidance_scales: {g!r} is not a number")


class Translation(NamedTuple):
    args: Tuple[ModelSourceArguments, SamplingArguments, PromptArguments]  # eval.py's generate dataclasses
    notices: Tuple[str, ...]


def translate(args: GenerateImagesArguments) -> Translation:
    """eval.py's arguments for this command line, and a notice for each choice made on the user's behalf. The
    eval dataclasses then check every value (their messages name these flags: FLAG_NAMES)."""
    notices: List[str] = []
    if not os.path.isdir(args.unet_model_name_or_path):  # before guessing a model folder from its parent
        raise FileNotFoundError(f"--unet_model_name_or_path: no such folder: {args.unet_model_name_or_path} (hub ids "
                                "are not downloaded here)")
    model_dir = args.model_name_or_path
    if model_dir is None:
        parent = os.path.dirname(os.path.normpath(args.unet_model_name_or_path))
        if not os.path.isfile(os.path.join(parent, PIPELINE_MARKER)):
            raise ValueError("--model_name_or_path is needed: the reference loads the VAE, tokenizer and scheduler "
                             "from the hub id CompVis/stable-diffusion-v1-4, which is not downloaded here; pass a "
                             "local folder (the init folder of scripts/prepare.sh or a finished run's output_dir)")
        model_dir = parent
        notices.append(f"--model_name_or_path not given: VAE, tokenizer, text encoder and scheduler from {parent}, "
                       f"the pipeline folder holding --unet_model_name_or_path")
    _check_file(args.file)
    seed = args.seed
    if seed <= 0:
        seed = secrets.randbelow(2 ** 31 - 1) + 1
        notices.append(f"--seed {args.seed}: the reference samples unseeded; drawn seed {seed} (saved in "
                       f"eval_config.json; pass --seed {seed} to repeat)")
    scales = [float(g) for g in args.guidance_scales]
    for typed, value in zip(args.guidance_scales, scales):
        if typed.strip() != f"{value:g}":
            notices.append(f"--guidance_scales {typed}: folder mscoco.en_g{value:g} (the reference names it as typed, "
                           f"mscoco.en_g{typed.strip()})")
    model = ModelSourceArguments(model_dir=model_dir, unet_path=args.unet_model_name_or_path,
                                 text_encoder_path=args.text_encoder_model_name_or_path, variant=VARIANTS[args.variant])
    sampling_args = SamplingArguments(scheduler=SCHEDULER_TYPES[args.scheduler_type],
                                      num_inference_steps=args.num_inference_steps, guidance_scales=scales,
                                      height=args.height, width=args.width, seed=seed, batch_size=args.batch_size,
                                      output_dir=args.save_path, device=args.device)
    prompts = PromptArguments(prompt_file=args.file, prompt_column=CAPTION_COLUMN, prompt_format="tsv",
                              layout="ppdiffusers")
    return Translation((model, sampling_args, prompts), tuple(notices))


def _check_file(path: str) -> None:
    """--file as the reference takes it, minus the download: a missing coco1k/10k/30k names its URL."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--file {path} is a folder, not a file")
    if os.path.exists(path):
        return
    name = os.path.basename(path)
    name = name[:-len(".tsv")] if name.endswith(".tsv") else name
    if name in COCO_FILES:
        url = COCO_URL.format(name)
        raise FileNotFoundError(f"--file {path}: no such file; the reference downloads it from {url}, which is not "
                                f"done here: fetch it (e.g. wget {url}) and pass --file {name}.tsv")
    raise FileNotFoundError(f"--file: no such file: {path}")


def start(argv: List[str]):
    """Parse the reference's flags, translate them, and start eval.py's generate run (every check, no weights)."""
    (args,) = parse_args([GenerateImagesArguments], argv, prog="generate_images.py",
                         description="The reference's generate_images.py flags, run by eval.py's generator.")
    translation = translate(args)
    return eval_entry.start("generate", translation.args, flag_names=FLAG_NAMES, entry=args,
                            notices=translation.notices)


def main(argv: Optional[List[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return eval_entry.run(*start(argv))


if __name__ == "__main__":
    eval_entry.cli("generate_images.py", start, sys.argv[1:])
