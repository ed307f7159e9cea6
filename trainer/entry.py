"""What both training entries (train.py, train_vae.py) do before training: logging, device notices, where to
resume, and the streaming dataset from the typed arguments."""
from __future__ import annotations

import logging
import os
from typing import Optional

from trainer.streaming_trainer import last_complete_checkpoint
from trainer.loader.text_image_dataset import LoaderConfig, TextImageDataset

logger = logging.getLogger("sd")


def setup_logging(notices) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] %(message)s")
    for notice in notices:  # one clear line each, at start: what the device cannot do and what runs instead
        logger.warning("DEVICE: %s", notice)


def resolve_checkpoint(args) -> Optional[str]:
    """What to resume from. Like the reference: an explicit --resume_from_checkpoint wins; otherwise the newest
    complete checkpoint in output_dir; a non-empty output_dir without one is an error unless
    --overwrite_output_dir."""
    if args.resume_from_checkpoint:
        if not os.path.isdir(args.resume_from_checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint: no such folder: {args.resume_from_checkpoint}")
        return args.resume_from_checkpoint
    if not os.path.isdir(args.output_dir) or args.overwrite_output_dir:
        return None
    last = last_complete_checkpoint(args.output_dir)
    if last is None and os.listdir(args.output_dir):
        raise ValueError(f"Output directory ({args.output_dir}) already exists and is not empty, and holds no "
                         "complete checkpoint. Use --overwrite_output_dir to train over it.")
    if last is not None:
        logger.info("resuming from the newest complete checkpoint: %s", last)
    return last


def build_dataset(data_args, training_args, tokenizer, model_max_length: int = 77, file_list: str = None,
                  center_crop: Optional[bool] = None, caption_dropout_prob: Optional[float] = None,
                  num_workers: Optional[int] = None) -> TextImageDataset:
    """The training stream of this rank; keyword overrides serve evaluation passes over another file list."""
    config = LoaderConfig(
        file_list=file_list or data_args.file_list, resolution=data_args.resolution,
        data_format=data_args.data_format, interpolation=data_args.interpolation,
        center_crop=data_args.center_crop if center_crop is None else center_crop,
        random_flip=data_args.random_flip and center_crop is None, min_image_size=data_args.min_image_size,
        caption_dropout_prob=data_args.caption_dropout_prob if caption_dropout_prob is None else caption_dropout_prob,
        model_max_length=model_max_length, shuffle_buffer_size=data_args.shuffle_buffer_size,
        seed=training_args.seed)
    return TextImageDataset(config, tokenizer, batch_size=training_args.per_device_train_batch_size,
                            rank=training_args.dataset_rank, world_size=training_args.dataset_world_size,
                            num_workers=training_args.dataloader_num_workers if num_workers is None else num_workers)
