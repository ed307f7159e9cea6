"""Pretrain a Stable Diffusion v1.x UNet on part files. Usage: see train.sh and README.md.

    python train.py --pretrained_model_name_or_path sd/tiny_init --file_list data/demo/filelist/demo.filelist.list \
        --output_dir runs/tiny --resolution 32 --max_steps 300 ...
    python -m paddle.distributed.launch --gpus 0,1,2,3 train.py ...   (same flags, one process per card)
"""
from __future__ import annotations

import logging

from paddlenlp.trainer import set_seed
from paddlenlp.transformers import CLIPTokenizer

from sd.args import parse_train_args
from sd.device import resolve_model_features
from sd.model import LatentDiffusionModel
from trainer.callbacks import BenchmarkCallback, EMACallback, ImageLoggingCallback, ProfilerCallback
from trainer.entry import build_dataset, resolve_checkpoint, setup_logging
from trainer.launch.rank_checks import rank_preflight
from trainer.streaming_trainer import StreamingTrainer

logger = logging.getLogger("sd")


def build_trainer(model_args, data_args, training_args) -> StreamingTrainer:
    """Model, tokenizer, data stream, Trainer and callbacks, as the job runs them (bench/ reuses this)."""
    model = LatentDiffusionModel.from_args(model_args)
    if training_args.recompute:
        model.enable_recompute()
    if model_args.enable_xformers_memory_efficient_attention:
        model.enable_memory_efficient_attention()
    if model_args.use_fused_linear:
        model.enable_fused_linear()
    if training_args.static_unet:
        model.compile_unet()
    tokenizer = CLIPTokenizer.from_pretrained(model_args.tokenizer_path, model_max_length=model_args.model_max_length)
    dataset = build_dataset(data_args, training_args, tokenizer, model_args.model_max_length)
    logger.info("data: %s", dataset.describe())

    trainer = StreamingTrainer(model=model, args=training_args, train_dataset=dataset, model_args=model_args)
    trainer.sd_tokenizer = tokenizer
    if model_args.use_ema:
        trainer.add_callback(EMACallback())
    if training_args.image_logging_steps:
        images = ImageLoggingCallback(tokenizer, data_args.resolution, training_args.sample_prompts,
                                      model_args.num_inference_steps, seed=training_args.seed)
        images.attach(trainer.callback_handler)
        trainer.add_callback(images)
    if training_args.benchmark:
        trainer.add_callback(BenchmarkCallback())
    if training_args.profiler_options:
        trainer.add_callback(ProfilerCallback(training_args.profiler_options))
    return trainer


def main(argv=None):
    model_args, data_args, training_args = parse_train_args(argv)
    setup_logging(training_args.notices + resolve_model_features(model_args))
    if not training_args.do_train:
        raise SystemExit("nothing to do: pass --do_train (as the reference's command does)")
    checkpoint = resolve_checkpoint(training_args)
    guard = rank_preflight(training_args, data_args, checkpoint)  # shared output_dir, same data, rank watchdog
    set_seed(training_args.seed)
    trainer = build_trainer(model_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # final unet/ (and unet_ema/, text_encoder/) in output_dir
    guard.finish()
    logger.info("done: %d steps; weights in %s", trainer.state.global_step, training_args.output_dir)


if __name__ == "__main__":
    main()
