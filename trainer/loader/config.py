"""The loader's configuration: the data section of the training arguments, declared once.

`DataArguments` is what train.py, train_vae.py and scripts/preflight.py parse (sd/args.py imports it from
here), what data_tools/inspect_data.py parses, and what TextImageDataset, its sample streams and its image
transform read. Values that belong to other sections (the seed, the tokenizer's length, the worker layout)
are passed to TextImageDataset beside it, never copied into it. A variant, such as train_vae.py's held-out
eval pass, is `dataclasses.replace(data_args, ...)`, which validates again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from data_tools.part_format import DATA_FORMATS
from trainer.loader.transforms import INTERPOLATIONS

__all__ = ["DataArguments"]


@dataclass(frozen=True)
class DataArguments:
    file_list: str = field(
        default=None,
        metadata={"help": "A .filelist.list (each line: x.filelist [weight]), as create_pretraining_data.py writes."})
    resolution: int = field(
        default=512, metadata={"help": "Training image size (shorter side resized, then cropped); a multiple of 8."})
    data_format: Optional[str] = field(
        default=None,
        metadata={"help": "Record format; unset: each source's manifest, else laion400m.",
                  "choices": list(DATA_FORMATS)})
    interpolation: str = field(
        default="lanczos", metadata={"help": "Resampling filter of the resize.", "choices": list(INTERPOLATIONS)})
    center_crop: bool = field(default=False, metadata={"help": "Center crop instead of random crop."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    min_image_size: int = field(
        default=0, metadata={"help": "Skip (and count) images whose shorter side is smaller."})
    caption_dropout_prob: float = field(
        default=0.1, metadata={"help": "Probability of an empty caption (the unconditional prompt for CFG)."})
    shuffle_buffer_size: int = field(default=256, metadata={"help": "Per-worker shuffle buffer (records)."})

    def __post_init__(self) -> None:
        if not self.file_list:
            raise ValueError("--file_list is required (a .filelist.list written by create_pretraining_data.py)")
        if not os.path.isfile(self.file_list):
            raise FileNotFoundError(f"--file_list: no such file: {self.file_list}")
        # The VAE downsamples by 8: a resolution that is not a multiple of 8 has no latent of the same image.
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data_format must be one of {list(DATA_FORMATS)} (or unset), got {self.data_format!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.min_image_size < 0:
            raise ValueError(f"--min_image_size must be >= 0, got {self.min_image_size}")
        if not 0.0 <= self.caption_dropout_prob <= 1.0:
            raise ValueError(f"--caption_dropout_prob must be in [0, 1], got {self.caption_dropout_prob}")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
