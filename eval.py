"""Generate images from a trained checkpoint, or measure caption adherence on the demo dataset.

    python eval.py --model_dir sd/tiny_init --unet_path runs/tiny/unet --prompt "a red circle at the top left" \
        --guidance_scales 1 3 7.5 --num_images_per_prompt 4 --output_dir outputs/eval
    python eval.py --model_dir ./CompVis-stable-diffusion-v1-4 --unet_path runs/x/checkpoint-5000/unet --use_ema \
        --prompt_file coco30k.tsv --prompt_column caption_en --height 512 --width 512 --output_dir outputs/coco
    python eval.py adherence --model_dir sd/tiny_init --unet_path runs/tiny/unet --output_dir outputs/adherence

Generation writes OUTPUT_DIR/g<guidance>/<prompt>_<image>.png, a grid per prompt and guidance and index.json;
adherence writes adherence.json and prints a table of accuracies against chance. See sd/eval/evaluation.py for how
seeds make images independent of --batch_size.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from sd.eval import sampling
from sd.eval.adherence import ADHERENCE_NAME, format_table, measure_adherence
from sd.eval.evaluation import (INDEX_NAME, ModelSource, SamplingConfig, generate_to_dir, load_pipeline, read_prompts,
                           resolve_size)

logger = logging.getLogger("sd.eval")


@dataclass
class PromptArgs:
    prompt: List[str] = field(default_factory=list)
    prompt_file: Optional[str] = None
    prompt_column: Optional[str] = None

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.prompt_file):
            raise ValueError("pass either --prompt (repeatable) or --prompt_file, exactly one of them")
        for i, p in enumerate(self.prompt):
            if not p.strip():
                raise ValueError(f"--prompt #{i + 1} is empty")
        if self.prompt_column is not None and not self.prompt_file:
            raise ValueError("--prompt_column goes with a .csv/.tsv --prompt_file")


def _add_model_and_sampling(parser: argparse.ArgumentParser, *, steps: int, guidance: List[float], size: Optional[int],
                            batch_size: int, output_dir: str) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--model_dir", required=True,
                   help="init or pipeline folder with vae/, text_encoder/, tokenizer/, scheduler/ (and unet/)")
    m.add_argument("--unet_path", help="a checkpoint's unet/ folder (default: MODEL_DIR/unet)")
    m.add_argument("--use_ema", action="store_true", help="use the unet_ema/ folder next to the unet/ folder")
    m.add_argument("--text_encoder_path", help="a trained text encoder folder (default: MODEL_DIR/text_encoder)")
    s = parser.add_argument_group("sampling")
    s.add_argument("--scheduler", default="ddim", choices=sorted(sampling.SCHEDULERS))
    s.add_argument("--num_inference_steps", type=int, default=steps)
    s.add_argument("--guidance_scales", type=float, nargs="+", default=guidance,
                   help="a sweep: every prompt at every scale, with the same seeds")
    size_help = "pixels; a multiple of the VAE factor and of 8" + ("" if size else " (default: the model's native)")
    s.add_argument("--height", type=int, default=size, help=size_help)
    s.add_argument("--width", type=int, default=size, help=size_help)
    s.add_argument("--seed", type=int, default=42, help="per-image seeds derive from it and the prompt index")
    s.add_argument("--batch_size", type=int, default=batch_size, help="prompts per pipeline call")
    s.add_argument("--output_dir", default=output_dir)


def build_parsers():
    gen = argparse.ArgumentParser(prog="eval.py", description="Generate images from a trained checkpoint.",
                                  epilog="Caption adherence on the demo data: python eval.py adherence --help")
    _add_model_and_sampling(gen, steps=50, guidance=[7.5], size=None, batch_size=8, output_dir="outputs/eval")
    p = gen.add_argument_group("prompts")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for more")
    p.add_argument("--prompt_file", help="a .txt (one prompt a line) or a .csv/.tsv with --prompt_column")
    p.add_argument("--prompt_column", help="column of a .csv/.tsv prompt file, e.g. caption_en (coco30k)")
    p.add_argument("--negative_prompt")
    p.add_argument("--num_images_per_prompt", type=int, default=1)

    adh = argparse.ArgumentParser(prog="eval.py adherence",
                                  description="Caption adherence on the demo dataset's attribute combinations.")
    _add_model_and_sampling(adh, steps=20, guidance=[1.0, 7.5], size=32, batch_size=32,
                            output_dir="outputs/adherence")
    a = adh.add_argument_group("adherence")
    a.add_argument("--num_per_combination", type=int, default=4, help="images per attribute combination (K)")
    a.add_argument("--max_combinations", type=int, help="a deterministic, balanced subset of the 90 combinations")
    return gen, adh


def _model_source(ns):
    return ModelSource(ns.model_dir, unet_path=ns.unet_path, use_ema=ns.use_ema,
                       text_encoder_path=ns.text_encoder_path)


def run_generate(ns) -> List[dict]:
    prompt_args = PromptArgs(ns.prompt, ns.prompt_file, ns.prompt_column)
    config = SamplingConfig(scheduler=ns.scheduler, num_inference_steps=ns.num_inference_steps,
                            guidance_scales=ns.guidance_scales, height=ns.height, width=ns.width, seed=ns.seed,
                            batch_size=ns.batch_size, num_images_per_prompt=ns.num_images_per_prompt,
                            negative_prompt=ns.negative_prompt)
    source = _model_source(ns)
    # Checked on the configs before the weights are loaded: a bad size fails in a second, not after a 4 GB load.
    height, width = resolve_size(source.vae_config(), source.unet_config(), config.height, config.width)
    prompts = prompt_args.prompt
    if prompt_args.prompt_file:
        prompts, skipped = read_prompts(prompt_args.prompt_file, prompt_args.prompt_column)
        logger.info("prompt file %s: %d prompts, skipped %s", prompt_args.prompt_file, len(prompts), skipped)
    pipe = load_pipeline(source, config.scheduler)
    os.makedirs(ns.output_dir, exist_ok=True)
    entries = generate_to_dir(pipe, prompts, config, ns.output_dir, height, width, unet_dir=source.unet_dir)
    print(f"{len(entries)} images ({len(prompts)} prompts x {len(config.guidance_scales)} guidance scales x "
          f"{config.num_images_per_prompt}) in {ns.output_dir}; index: {os.path.join(ns.output_dir, INDEX_NAME)}")
    return entries


def run_adherence(ns) -> dict:
    source = _model_source(ns)
    resolve_size(source.vae_config(), source.unet_config(), ns.height, ns.width)  # fail before loading weights
    pipe = load_pipeline(source, ns.scheduler)
    result = measure_adherence(pipe, guidance_scales=ns.guidance_scales, num_per_combination=ns.num_per_combination,
                               max_combinations=ns.max_combinations, seed=ns.seed, height=ns.height,
                               width=ns.width, num_inference_steps=ns.num_inference_steps,
                               batch_size=ns.batch_size, output_dir=ns.output_dir)
    settings = result["settings"]
    print(f"caption adherence: {source.unet_dir}, {settings['num_combinations']} combinations x "
          f"{settings['num_per_combination']} images, {settings['scheduler']} {settings['num_inference_steps']} "
          f"steps, {settings['height']}x{settings['width']}")
    print(format_table(result))
    print(f"written: {os.path.join(ns.output_dir, ADHERENCE_NAME)}")
    return result


def main(argv: Optional[List[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gen, adh = build_parsers()
    if argv[:1] == ["adherence"]:
        return run_adherence(adh.parse_args(argv[1:]))
    return run_generate(gen.parse_args(argv))


if __name__ == "__main__":
    main()
