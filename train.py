"""Pretrain a Stable Diffusion v1.x UNet on part files. Usage: see train.sh and README.md.

    python train.py --pretrained_model_name_or_path sd/tiny_init --file_list data/demo/filelist/demo.filelist.list \
        --output_dir runs/tiny --resolution 32 --max_steps 300 ...
    python -m paddle.distributed.launch --gpus 0,1,2,3 train.py ...   (same flags, one process per card)

Parse (sd/args.py), resolve against this device (resolve_train: components, precision, features, learning
rates, notices), then build and run; the resolved config is logged and saved as output_dir/train_config.json and
in every checkpoint.
"""
from __future__ import annotations

import logging

from paddlenlp.trainer import set_seed
from paddlenlp.transformers import CLIPTokenizer

from sd.args import TrainRun, parse_train_args, resolve_train
from sd.model import LatentDiffusionModel
from trainer.callbacks import (BenchmarkCallback, EMACallback, ImageLoggingCallback, ProfilerCallback,
                               visualdl_callback)
from trainer.entry import build_dataset, log_run_config, resolve_checkpoint
from trainer.launch.rank_checks import rank_preflight
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
    if run.training.image_logging_steps:
        trainer.add_callback(ImageLoggingCallback(tokenizer, run.data.resolution, run.training.sample_prompts,
                                                  run.model.num_inference_steps, seed=run.training.seed,
                                                  visualdl=visualdl_callback(trainer)))
    if run.training.benchmark:
        trainer.add_callback(BenchmarkCallback())
    if run.training.profiler_options:
        trainer.add_callback(ProfilerCallback(run.training.profiler_options))
    return trainer


def main(argv=None):
    model_args, data_args, training_args = parse_train_args(argv)
    if not training_args.do_train:
        raise SystemExit("nothing to do: pass --do_train (as the reference's command does)")
    run = resolve_train(model_args, data_args, training_args)
    log_run_config(run)
    checkpoint = resolve_checkpoint(run.training)
    guard = rank_preflight(run.training, run.data, checkpoint)  # shared output_dir, same data, rank watchdog
    set_seed(run.training.seed)
    trainer = build_trainer(run)
    trainer.save_run_config(run.training.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # final unet/ (and unet_ema/, text_encoder/) in output_dir
    guard.finish()
    logger.info("done: %d steps; weights in %s", trainer.state.global_step, run.training.output_dir)


if __name__ == "__main__":
    main()
