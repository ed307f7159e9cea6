"""What both training entries (train.py, train_vae.py) do before training: logging the resolved config and its
device notices, where to resume (checked before anything loads), and the streaming dataset from the typed
arguments."""
from __future__ import annotations

import logging
import os
from typing import Optional

from sd.config import format_config
from trainer import checkpoint as ckpt
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
    """What to resume from, checked at start (names, sizes and formats of its files against its marker; the
    sha256 of each is checked when it loads). An explicit --resume_from_checkpoint wins; otherwise the newest
    complete checkpoint in output_dir. A non-empty output_dir without one is an error unless
    --overwrite_output_dir, which starts over: the run then removes the old checkpoints before its first step
    (StreamingTrainer.train), so that a later resume can never pick up one of the earlier run's. Resuming an
    older checkpoint while output_dir holds later ones, or checkpoints of another run, needs that flag too."""
    trust = ckpt.trusts_pickles(args)
    ckpt.check_output_dir(args.output_dir)
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume_from_checkpoint: no such folder: {path}")
        try:
            ckpt.verify_checkpoint(path, trust, hashes=False)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--resume_from_checkpoint: {e}") from None
        others = ckpt.checkpoints_not_continued(args.output_dir, path)
        if others and not args.overwrite_output_dir:
            raise ValueError(
                f"--resume_from_checkpoint {path}: {args.output_dir} also holds "
                f"{', '.join(os.path.basename(p) for p in others)}, which this run does not continue; its "
                "checkpoints would sit beside them and a rerun could resume from the wrong one. Pass "
                "--overwrite_output_dir to remove them first")
        _log_removal(args, others)
        return path
    if not os.path.isdir(args.output_dir):
        return None
    if args.overwrite_output_dir:
        _log_removal(args, ckpt.checkpoints_not_continued(args.output_dir, None))
        return None
    last = ckpt.last_complete_checkpoint(args.output_dir)
    if last is None and os.listdir(args.output_dir):
        raise ValueError(f"Output directory ({args.output_dir}) already exists and is not empty, and holds no "
                         "complete checkpoint. Use --overwrite_output_dir to train over it (or remove it).")
    if last is not None:
        ckpt.verify_checkpoint(last, trust, hashes=False)
        logger.info("resuming from the newest complete checkpoint: %s", last)
    return last


def _log_removal(args, paths) -> None:
    if paths and args.overwrite_output_dir:
        logger.warning("--overwrite_output_dir: training starts %s; the checkpoints it does not continue are "
                       "removed before the first step: %s", "over" if not args.resume_from_checkpoint else
                       f"from {args.resume_from_checkpoint}", ", ".join(paths))


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


def check_resume_geometry(checkpoint: str, data: DataArguments) -> None:
    """Resuming at another resolution or bucket set (a resolution stage) needs --allow_resolution_change: refused
    at start in one line (the loader checks again, per rank, when it loads its state). Every rank saved the same
    geometry, so rank 0's file answers; a checkpoint without one (saved before geometry was recorded) is not
    checked."""
    from trainer.loader.loader_state import geometry_changed, load_state_file
    from trainer.streaming_trainer import loader_state_file

    path = loader_state_file(checkpoint, 0)
    if os.path.isfile(path):
        try:
            geometry_changed(load_state_file(path).get("geometry"), data.geometry(), data.allow_resolution_change)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{checkpoint}: {e}") from None
