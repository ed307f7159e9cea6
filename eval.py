"""Generate images from a trained checkpoint, or measure caption adherence on the demo dataset.

    python eval.py --model_dir sd/tiny_init --unet_path runs/tiny/unet --prompt "a red circle at the top left" \
        --guidance_scales 1 3 7.5 --num_images_per_prompt 4 --output_dir outputs/eval
    python eval.py --model_dir ./CompVis-stable-diffusion-v1-4 --unet_path runs/x/checkpoint-5000/unet --use_ema \
        --prompt_file coco30k.tsv --prompt_column caption_en --height 512 --width 512 --output_dir outputs/coco
    python eval.py adherence --model_dir sd/tiny_init --unet_path runs/tiny/unet --output_dir outputs/adherence

Generation writes OUTPUT_DIR/g<guidance>/<prompt>_<image>.png, a grid per prompt and guidance and index.json;
adherence writes adherence.json and prints a table of accuracies against chance. Both save the resolved
configuration as OUTPUT_DIR/eval_config.json. The flags are the fields of sd/eval/args.py's dataclasses (a single
.json argument holding them works too). See sd/eval/evaluation.py for how seeds make images independent of
--batch_size.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from sd.config import parse_args, format_config, save_config
from sd.eval.adherence import ADHERENCE_NAME, format_table, measure_adherence
from sd.eval.args import (AdherenceArguments, AdherenceSamplingArguments, EvalConfig, ModelSourceArguments,
                          PromptArguments, SamplingArguments, resolve)
from sd.eval.evaluation import INDEX_NAME, generate_to_dir, load_pipeline, prompt_list

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


def _start(config: EvalConfig) -> None:
    """Log and save the resolved config (what runs), after every check and before the weights load."""
    os.makedirs(config.sampling.output_dir, exist_ok=True)
    save_config(os.path.join(config.sampling.output_dir, EVAL_CONFIG_NAME), config)
    logger.info("eval config:\n%s", format_config(config))
    for notice in config.notices:
        logger.info("%s", notice)


def run_generate(model: ModelSourceArguments, sampling_args: SamplingArguments,
                 prompt_args: PromptArguments) -> List[dict]:
    config = resolve(model, sampling_args, prompts=prompt_args)
    prompts = prompt_list(prompt_args)
    _start(config)
    pipe = load_pipeline(config.components, config.sampling.scheduler)
    entries = generate_to_dir(pipe, prompts, config)
    out = config.sampling.output_dir
    print(f"{len(entries)} images ({len(prompts)} prompts x {len(config.sampling.guidance_scales)} guidance scales "
          f"x {prompt_args.num_images_per_prompt}) in {out}; index: {os.path.join(out, INDEX_NAME)}")
    return entries


def run_adherence(model: ModelSourceArguments, sampling_args: SamplingArguments,
                  adherence: AdherenceArguments) -> dict:
    config = resolve(model, sampling_args, adherence=adherence)
    _start(config)
    pipe = load_pipeline(config.components, config.sampling.scheduler)
    result = measure_adherence(pipe, config.sampling, adherence)
    settings = result["settings"]
    print(f"caption adherence: {config.components.unet}, {settings['num_combinations']} combinations x "
          f"{settings['num_per_combination']} images, {settings['scheduler']} {settings['num_inference_steps']} "
          f"steps, {settings['height']}x{settings['width']}")
    print(format_table(result))
    print(f"written: {os.path.join(config.sampling.output_dir, ADHERENCE_NAME)}")
    return result


def main(argv: Optional[List[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command, args = parse(argv)
    return run_adherence(*args) if command == "adherence" else run_generate(*args)


if __name__ == "__main__":
    main()
