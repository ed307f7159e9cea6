"""Generate images from a trained checkpoint, or measure caption adherence on the demo dataset.

    python eval.py --model_dir sd/tiny_init --unet_path runs/tiny/unet --prompt "a red circle at the top left" \
        --guidance_scales 1 3 7.5 --num_images_per_prompt 4 --output_dir outputs/eval
    python eval.py --model_dir ./CompVis-stable-diffusion-v1-4 --unet_path runs/x/checkpoint-5000/unet --use_ema \
        --prompt_file coco30k.tsv --prompt_column caption_en --height 512 --width 512 --output_dir outputs/coco
    python eval.py adherence --model_dir sd/tiny_init --unet_path runs/tiny/unet --output_dir outputs/adherence
    python eval.py --model_dir runs/x --variant ema --prompt_file coco30k.tsv --prompt_column caption_en \
        --layout ppdiffusers --device gpu --output_dir outputs/coco     (what generate_images.py runs)

Generation writes OUTPUT_DIR/g<guidance>/<prompt>_<image>.png, a grid per prompt and guidance and index.json
(--layout ppdiffusers: OUTPUT_DIR/mscoco.en_g<guidance>/<prompt>_000.png only, for PaddleMIX's FID/CLIP script);
adherence writes adherence.json and prints a table of accuracies against chance. Both save the resolved
configuration as OUTPUT_DIR/eval_config.json. The flags are the fields of sd/eval/args.py's dataclasses (a single
.json argument holding them works too). See sd/eval/evaluation.py for how seeds make images independent of
--batch_size. A bad flag or input file stops the run before any weights load, in one line naming it.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Tuple

import paddle

from sd.config import parse_args, format_config, save_config
from sd.eval.adherence import ADHERENCE_NAME, format_table, measure_adherence
from sd.eval.args import (AdherenceArguments, AdherenceSamplingArguments, EvalConfig, ModelSourceArguments,
                          PromptArguments, SamplingArguments, resolve)
from sd.eval.evaluation import INDEX_NAME, foreign_images, generate_to_dir, load_pipeline, prompt_list

logger = logging.getLogger("sd.eval")

EVAL_CONFIG_NAME = "eval_config.json"
COMMANDS = {  # argv[0] -> (its dataclasses, parser settings); generate is the default command
    "generate": ((ModelSourceArguments, SamplingArguments, PromptArguments),
                 {"prog": "eval.py", "description": "Generate images from a trained checkpoint.",
                  "epilog": "Caption adherence on the demo data: python eval.py adherence --help"}),
    "adherence": ((ModelSourceArguments, AdherenceSamplingArguments, AdherenceArguments),
                  {"prog": "eval.py adherence",
                   "description": "Caption adherence on the demo dataset's attribute combinations."}),
}


def parse(argv: List[str]):
    """(command, its parsed dataclasses) from eval.py's arguments."""
    command = "adherence" if argv[:1] == ["adherence"] else "generate"
    argv = argv[1:] if command == "adherence" else argv
    types, settings = COMMANDS[command]
    return command, parse_args(types, argv, **settings)


# A bad flag value or input file, found before any weights load: one line on stderr, no traceback.
START_ERRORS = (ValueError, OSError)


def start(command: str, args: tuple, **resolve_kwargs) -> Tuple[EvalConfig, Optional[List[str]]]:
    """Resolve, read the prompts, refuse leftovers, then save and log the resolved config (what runs): every
    check happens here, before the weights load. resolve_kwargs: another entry's translation (flag names, its
    own arguments, notices; generate_images.py)."""
    if command == "adherence":
        model, sampling_args, adherence = args
        config, prompts = resolve(model, sampling_args, adherence=adherence, **resolve_kwargs), None
    else:
        model, sampling_args, prompt_args = args
        config = resolve(model, sampling_args, prompts=prompt_args, **resolve_kwargs)
        prompts = prompt_list(prompt_args)
        leftovers = foreign_images(config, len(prompts))
        if leftovers:
            raise FileExistsError(f"{len(leftovers)} image(s) not from this run, e.g. {leftovers[0]}: the FID/CLIP "
                                  "script reads every image of a folder; pass an empty output folder")
    os.makedirs(config.sampling.output_dir, exist_ok=True)
    save_config(os.path.join(config.sampling.output_dir, EVAL_CONFIG_NAME), config)
    logger.info("eval config:\n%s", format_config(config))
    for notice in config.notices:
        logger.warning("%s", notice)
    return config, prompts


def run(config: EvalConfig, prompts: Optional[List[str]] = None):
    """Load the pipeline on the resolved device and generate (or measure adherence)."""
    paddle.set_device(config.sampling.device)
    pipe = load_pipeline(config.components, config.sampling.scheduler, config.unet_variant,
                         config.text_encoder_variant)
    out = config.sampling.output_dir
    if config.command == "adherence":
        result = measure_adherence(pipe, config.sampling, config.adherence)
        settings = result["settings"]
        print(f"caption adherence: {config.components.unet}, {settings['num_combinations']} combinations x "
              f"{settings['num_per_combination']} images, {settings['scheduler']} {settings['num_inference_steps']} "
              f"steps, {settings['height']}x{settings['width']}")
        print(format_table(result))
        print(f"written: {os.path.join(out, ADHERENCE_NAME)}")
        return result
    entries = generate_to_dir(pipe, prompts, config)
    print(f"{len(entries)} images ({len(prompts)} prompts x {len(config.sampling.guidance_scales)} guidance scales "
          f"x {config.prompts.num_images_per_prompt}) in {out}; index: {os.path.join(out, INDEX_NAME)}")
    return entries


def main(argv: Optional[List[str]] = None):
    """Parse, start, run; a start error raises (cli() turns it into one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(*start(*parse(argv)))


def cli(prog: str, start_fn, argv: List[str]) -> None:
    """An entry's __main__: start errors (bad flags, unreadable prompt files, missing folders) end the process
    with one line naming the flag or file; errors while sampling keep their traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, prompts = start_fn(argv)
    except START_ERRORS as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    run(config, prompts)


if __name__ == "__main__":
    cli("eval.py", lambda argv: start(*parse(argv)), sys.argv[1:])
