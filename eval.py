"""Generate images from a trained checkpoint (on one or many ranks), score them (FID, KID, CLIP score), or measure
caption adherence on the demo dataset.

    python eval.py --model_dir sd/tiny_init --unet_path runs/tiny/unet --prompt "a red circle at the top left" \
        --guidance_scales 1 3 7.5 --num_images_per_prompt 4 --output_dir outputs/eval
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 eval.py --model_dir runs/x --use_ema \
        --prompt_file coco30k.csv --prompt_column caption_en --height 512 --width 512 --device gpu \
        --output_dir outputs/coco          (each rank draws every 8th prompt; a rerun resumes)
    python eval.py score --images outputs/coco --reference coco30k_stats.npz \
        --inception_weights weights/pt_inception-2015-12-05.safetensors --clip_model ./clip-vit-large-patch14
    python eval.py adherence --model_dir sd/tiny_init --unet_path runs/tiny/unet --output_dir outputs/adherence

Generation writes OUTPUT_DIR/g<guidance>/<prompt>_<image>.png, a grid per prompt and guidance and index.json
(--layout ppdiffusers: OUTPUT_DIR/mscoco.en_g<guidance>/<prompt>_000.png only, for PaddleMIX's FID/CLIP script);
how ranks split the work, write atomically, merge index.json and resume: sd/eval/generation.py. score writes
scores.json (sd/eval/score.py); adherence writes adherence.json and prints a table of accuracies against chance.
Every command saves its resolved configuration (generate and adherence as OUTPUT_DIR/eval_config.json before any
weights load). The flags are the fields of sd/eval/args.py's and sd/eval/score.py's dataclasses (a single .json
argument holding them works too). A bad flag or input file stops the run before any weights load, in one line.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

import paddle

from sd.config import parse_args, format_config, save_config
from sd.eval.adherence import ADHERENCE_NAME, format_table, measure_adherence
from sd.eval.args import (AdherenceArguments, AdherenceSamplingArguments, ModelSourceArguments, PromptArguments,
                          SamplingArguments, resolve)
from sd.eval.distributed import join_job, launch_layout
from sd.eval.evaluation import foreign_images, load_pipeline, prompt_list
from sd.eval.generation import INDEX_NAME, generate_to_dir, previous_entries, resume_conflicts
from sd.eval.score import ScoreArguments, format_scores, run_score
from sd.eval import score as score_stage

logger = logging.getLogger("sd.eval")

EVAL_CONFIG_NAME = "eval_config.json"
COMMANDS = {  # argv[0] -> (its dataclasses, parser settings); generate is the default command
    "generate": ((ModelSourceArguments, SamplingArguments, PromptArguments),
                 {"prog": "eval.py", "description": "Generate images from a trained checkpoint.",
                  "epilog": "Scores: python eval.py score --help; caption adherence on the demo data: "
                            "python eval.py adherence --help"}),
    "adherence": ((ModelSourceArguments, AdherenceSamplingArguments, AdherenceArguments),
                  {"prog": "eval.py adherence",
                   "description": "Caption adherence on the demo dataset's attribute combinations."}),
    "score": ((ScoreArguments,),
              {"prog": "eval.py score", "description": "FID and KID against a reference, CLIP score against the "
                                                       "prompts (weights from local files only)."}),
}


def parse(argv: List[str]):
    """(command, its parsed dataclasses) from eval.py's arguments."""
    command = argv[0] if argv[:1] in (["adherence"], ["score"]) else "generate"
    argv = argv[1:] if command != "generate" else argv
    types, settings = COMMANDS[command]
    return command, parse_args(types, argv, **settings)


# A bad flag value or input file, found before any weights load: one line on stderr, no traceback.
START_ERRORS = (ValueError, OSError)


def start(command: str, args: tuple, **resolve_kwargs):
    """Resolve, read the prompts, refuse leftovers and a folder of another run, log the resolved config (what
    runs): every check happens here, in every rank, before the weights load and before anything is written.
    resolve_kwargs: another entry's translation (flag names, its own arguments, notices; generate_images.py)."""
    _, world = launch_layout()
    if command == "score":
        config, prompts = score_stage.resolve(args[0], world), None
    elif command == "adherence":
        if world > 1:
            raise ValueError("eval.py adherence runs in one process: start it without paddle.distributed.launch")
        model, sampling_args, adherence = args
        config, prompts = resolve(model, sampling_args, adherence=adherence, **resolve_kwargs), None
    else:
        model, sampling_args, prompt_args = args
        if world > 1 and (sampling_args.device or "").startswith("gpu:"):
            raise ValueError(f"--device {sampling_args.device} under paddle.distributed.launch would put every rank "
                             "on one card: pass --device gpu (each rank takes the card the launcher gives it)")
        config = resolve(model, sampling_args, prompts=prompt_args, **resolve_kwargs)
        prompts = prompt_list(prompt_args)
        leftovers = foreign_images(config, len(prompts))
        if leftovers:
            raise FileExistsError(f"{len(leftovers)} image(s) not from this run, e.g. {leftovers[0]}: the FID/CLIP "
                                  "script reads every image of a folder; pass an empty output folder")
        check_resumable(config)
    logger.info("eval config:\n%s", format_config(config))
    for notice in config.notices:
        logger.warning("%s", notice)
    return config, prompts


def check_resumable(config) -> None:
    """A folder holding an earlier run is resumed only if that run drew the same pixels (resume_conflicts); its
    index files must be readable."""
    out = config.sampling.output_dir
    saved = os.path.join(out, EVAL_CONFIG_NAME)
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as f:
            try:
                previous = json.load(f)
            except ValueError as e:
                raise ValueError(f"{saved}: not valid JSON ({e}); move it away to start over") from None
        conflicts = resume_conflicts(previous, config)
        if conflicts:
            raise FileExistsError(f"--output_dir {out} holds images of a run with other settings ("
                                  + "; ".join(conflicts[:4]) + "): pass an empty folder, or the same settings "
                                  "to resume it")
    previous_entries(out)


def run(config, prompts: Optional[List[str]] = None):
    """Score, or load the pipeline on the resolved device and generate (or measure adherence)."""
    if config.command == "score":
        result = run_score(config)
        print(format_scores(result))
        print(f"written: {config.output}")
        return result
    paddle.set_device(config.sampling.device)
    out = config.sampling.output_dir
    if config.command == "adherence":
        os.makedirs(out, exist_ok=True)
        save_config(os.path.join(out, EVAL_CONFIG_NAME), config)
        pipe = _pipeline(config)
        result = measure_adherence(pipe, config.sampling, config.adherence)
        settings = result["settings"]
        print(f"caption adherence: {config.components.unet}, {settings['num_combinations']} combinations x "
              f"{settings['num_per_combination']} images, {settings['scheduler']} {settings['num_inference_steps']} "
              f"steps, {settings['height']}x{settings['width']}")
        print(format_table(result))
        print(f"written: {os.path.join(out, ADHERENCE_NAME)}")
        return result
    previous = previous_entries(out)  # read by every rank before the job's one collective: nobody wrote yet
    job = join_job(*launch_layout())
    os.makedirs(out, exist_ok=True)
    if job.rank == 0:
        save_config(os.path.join(out, EVAL_CONFIG_NAME), config)
    entries = generate_to_dir(_pipeline(config), prompts, config, job, previous)
    job.finish()
    if job.rank == 0:
        print(f"{len(entries)} images ({len(prompts)} prompts x {len(config.sampling.guidance_scales)} guidance "
              f"scales x {config.prompts.num_images_per_prompt}) in {out}; index: {os.path.join(out, INDEX_NAME)}")
    return entries


def _pipeline(config):
    return load_pipeline(config.components, config.sampling.scheduler, config.unet_variant,
                         config.text_encoder_variant)


def main(argv: Optional[List[str]] = None):
    """Parse, start, run; a start error raises (cli() turns it into one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(*start(*parse(argv)))


def cli(prog: str, start_fn, argv: List[str]) -> None:
    """An entry's __main__: start errors (bad flags, unreadable prompt files, missing folders or weights) end the
    process with one line naming the flag or file; errors while sampling keep their traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, prompts = start_fn(argv)
    except START_ERRORS as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    run(config, prompts)


if __name__ == "__main__":
    cli("eval.py", lambda argv: start(*parse(argv)), sys.argv[1:])
