"""What both training entries (train.py, train_vae.py) do before training: logging the resolved config and its
device notices, where to resume, and the streaming dataset from the typed arguments."""
from __future__ import annotations

import logging
import os
from typing import Optional

from sd.config import format_config
from trainer.streaming_trainer import last_complete_checkpoint
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset

logger = logging.getLogger("sd")


def log_run_config(run) -> None:
    """Logging set up, the resolved config logged (what runs, as saved), then one clear line per notice: what
    the device cannot do and what runs instead."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] %(message)s")
    logger.info("resolved config:\n%s", format_config(run))
    for notice in run.notices:
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


def build_dataset(data_args: DataArguments, training_args, tokenizer=None, model_max_length: Optional[int] = None,
                  num_workers: Optional[int] = None) -> TextImageDataset:
    """This rank's stream of `data_args`, with the seed, batch size and rank layout of `training_args`. A pass
    over other data (train_vae.py's held-out eval) passes `dataclasses.replace(data_args, ...)` with every
    difference spelled out, and `num_workers` when it differs from --dataloader_num_workers (paddlenlp's
    TrainingArguments is not replace()d: its __post_init__ does far more than validate)."""
    return TextImageDataset(data_args, tokenizer, batch_size=training_args.per_device_train_batch_size,
                            rank=training_args.dataset_rank, world_size=training_args.dataset_world_size,
                            num_workers=training_args.dataloader_num_workers if num_workers is None else num_workers,
                            seed=training_args.seed, model_max_length=model_max_length)
