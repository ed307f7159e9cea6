"""Pretrain a Stable Diffusion v1.x UNet on part files. Usage: see train.sh and README.md.

    python train.py --pretrained_model_name_or_path sd/tiny_init --file_list data/demo/filelist/demo.filelist.list \
        --output_dir runs/tiny --resolution 32 --max_steps 300 ...
    python -m paddle.distributed.launch --gpus 0,1,2,3 train.py ...   (same flags, one process per card)
    FLAG_USE_EMA=1 FLAG_RECOMPUTE=1 python -u train_txt2img_laion400m_trainer.py ...   (the reference's habits)

Parse (sd/args.py parse_train: the flags, and the reference's FLAG_* variables), resolve against this device
(resolve_train: components, precision, features, learning rates, notices), then build and run; the resolved
config is logged and saved as output_dir/train_config.json and in every checkpoint. A finished run leaves
output_dir as a pipeline folder (StableDiffusionPipeline.from_pretrained(output_dir)).

--file_list may name a latent dataset (precompute_latents.py): the loader then streams cached VAE moments (and
text embeddings), the step skips the VAE (and the text encoder), and resolve_train refuses a dataset made with
another VAE, scaling factor, resolution, text encoder or tokenizer in one line.
"""
from __future__ import annotations

import logging

from paddlenlp.trainer import set_seed
from paddlenlp.transformers import CLIPTokenizer

from sd.args import TrainRun, parse_train, resolve_train
from sd.eval.in_training import PromptSetEvalCallback, plan_eval
from sd.model import LatentDiffusionModel, save_pipeline_folder
from trainer.callbacks import (BenchmarkCallback, EMACallback, ImageLoggingCallback, ProfilerCallback,
                               visualdl_callback)
from trainer.entry import build_dataset, check_resume_geometry, log_run_config, resolve_checkpoint
from trainer.checkpoint import CheckpointError
from trainer.launch.rank_checks import PreflightError, rank_preflight
from trainer.loader.sample_stream import LoaderError
from trainer.streaming_trainer import StreamingTrainer

logger = logging.getLogger("sd")


def build_trainer(run: TrainRun) -> StreamingTrainer:
    """Model, tokenizer, data stream, Trainer and callbacks, as the job runs them (bench/ reuses this)."""
    model = LatentDiffusionModel.from_run(run)
    tokenizer = CLIPTokenizer.from_pretrained(run.components.tokenizer, model_max_length=run.model.model_max_length)
    dataset = build_dataset(run.data, run.training, tokenizer, run.model.model_max_length)
    logger.info("data: %s", dataset.describe())

    trainer = StreamingTrainer(model=model, args=run.training, train_dataset=dataset, run_config=run)
    trainer.sd_tokenizer = tokenizer
    if run.model.use_ema:
        trainer.add_callback(EMACallback())
    if run.training.image_logging_steps > 0:
        trainer.add_callback(ImageLoggingCallback(tokenizer, run.data.resolution, run.training.sample_prompts,
                                                  run.model.num_inference_steps, seed=run.training.seed,
                                                  visualdl=visualdl_callback(trainer)))
    plan = plan_eval(run.training)  # --eval_steps / --eval_prompts: every rank draws and scores its slice
    if plan is not None:
        trainer.add_callback(PromptSetEvalCallback(plan, tokenizer, run.data.resolution, run.training,
                                                   visualdl=visualdl_callback(trainer)))
    if run.training.benchmark:
        trainer.add_callback(BenchmarkCallback())
    if run.training.profiler_options:
        trainer.add_callback(ProfilerCallback(run.training.profiler_options))
    return trainer


def start(argv=None):
    """Parse, resolve, decide where to resume: everything that can be wrong with the flags, the paths, the device
    or the output folder is found here, before a model or a worker exists."""
    args = parse_train(argv)
    if not args.training.do_train:
        raise SystemExit("nothing to do: pass --do_train (as the reference's command does)")
    run = resolve_train(args.model, args.data, args.training, env=args.env)
    plan_eval(run.training)  # the evaluation prompts and weight files, checked before anything loads
    log_run_config(run)
    for alias in run.aliases:
        logger.info("PaddleMIX: %s", alias)
    for notice in run.data_notices:
        logger.warning("data: %s", notice)
    checkpoint = resolve_checkpoint(run.training)
    if checkpoint is not None:  # a resolution stage is explicit: refused here, before a model exists
        check_resume_geometry(checkpoint, run.data)
    return run, checkpoint


def main(argv=None):
    """The job, its errors as exceptions (tests and bench/ call this)."""
    run, checkpoint = start(argv)
    guard = rank_preflight(run.training, run.data, checkpoint)  # shared output_dir, same data, rank watchdog
    set_seed(run.training.seed)
    trainer = build_trainer(run)
    trainer.save_run_config(run.training.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # the trained parts: unet/ (EMA as its "ema" variant and unet_ema/), scheduler/, ...
    if run.training.should_save:
        save_pipeline_folder(trainer.model, run.components, run.training.output_dir)
    guard.finish()
    logger.info("done: %d steps; weights in %s", trainer.state.global_step, run.training.output_dir)


def cli(argv=None) -> None:
    """main() as a command: a configuration error (a bad flag, path, checkpoint or output folder, found by
    start(); a file list that does not resolve, found when the data stream is built), a data source that yields
    nothing usable, or a checkpoint that fails its check ends the run with its one-line message and exit code 1
    instead of a traceback; any other error keeps its traceback."""
    try:
        main(argv)
    except (LoaderError, CheckpointError, PreflightError) as e:
        raise SystemExit(f"error: {e}") from None
    except (ValueError, OSError) as e:
        if not (_raised_in(e, start) or _raised_in(e, build_dataset)):
            raise
        raise SystemExit(f"error: {e}") from None


def _raised_in(error: BaseException, function) -> bool:
    """Whether `function` is on the error's traceback (the error happened while it ran)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is function.__code__:
            return True
        tb = tb.tb_next
    return False


if __name__ == "__main__":
    cli()
