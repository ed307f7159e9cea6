"""The loader's configuration: the data section of the training arguments, declared once.

`DataArguments` is what train.py, train_vae.py and scripts/preflight.py parse (sd/args.py imports it from
here), what data_tools/inspect_data.py parses, and what TextImageDataset, its sample streams and its image
transform read (a latent dataset's file list is told by its manifest, not by a flag: trainer/loader/latent_stream.py).
Values that belong to other sections (the seed, the tokenizer's length, the worker layout)
are passed to TextImageDataset beside it, never copied into it. A variant, such as train_vae.py's held-out
eval pass, is `dataclasses.replace(data_args, ...)`, which validates again.

The reference recipe's data flags (PaddleMIX sd/sd_args.py) are all accepted with their meaning:
`--buffer_size` is the shuffle buffer (our older name `--shuffle_buffer_size` still works),
`--shuffle_every_n_samples` draws every n-th sample from the buffer and passes the others straight through,
`--interpolation` takes every name paddle.vision.transforms.Resize takes, and `--num_records` (the reference's
dataset length, which its Trainer never needs with --max_steps) is accepted and ignored, with a notice.
Defaults are ours where they differ (buffer 256, every sample shuffled): they keep the golden loss curve.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from data_tools.part_format import DATA_FORMATS
from trainer.loader.buckets import DEFAULT_STEP, Bucket, bucket_name, bucket_set
from trainer.loader.transforms import INTERPOLATIONS

__all__ = ["DataArguments", "PILLOW_BOMB_ERROR_PIXELS"]

# Pillow's own limits: a decompression-bomb warning above Image.MAX_IMAGE_PIXELS (89,478,485) and an error above
# twice that. Our cap replaces the warning; it cannot lift the error.
PILLOW_DEFAULT_MAX_PIXELS = 89_478_485
PILLOW_BOMB_ERROR_PIXELS = 2 * PILLOW_DEFAULT_MAX_PIXELS


def _also_accepts(*aliases: str) -> type:
    """An argparse action for a field's flag that also answers to `aliases`. PdArgumentParser registers one option
    per field and has no alias support; this adds option strings to that same argument, so --help lists them
    together and every spelling fills the one field."""

    class AlsoAccepts(argparse.Action):
        def __init__(self, option_strings, dest, **kwargs):
            super().__init__(list(option_strings) + list(aliases), dest, **kwargs)

        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, self.dest, values)

    return AlsoAccepts


@dataclass(frozen=True)
class DataArguments:
    file_list: str = field(
        default=None,
        metadata={"help": "A .filelist.list (each line: x.filelist [weight]), as create_pretraining_data.py (image "
                          "parts) or precompute_latents.py (a latent dataset: cached VAE moments) writes. "
                          "Relative paths in it (and in its filelists) are looked for in the list's own folder, "
                          "then in the working folder."})
    resolution: int = field(
        default=512, metadata={"help": "Training image size (shorter side resized, then cropped); a multiple of 8."})
    data_format: Optional[str] = field(
        default=None,
        metadata={"help": "Record format; unset: each source's manifest, else laion400m.",
                  "choices": list(DATA_FORMATS)})
    interpolation: str = field(
        default="lanczos", metadata={"help": "Resampling filter of the resize (Pillow's, as paddle's Resize).",
                                     "choices": list(INTERPOLATIONS)})
    center_crop: bool = field(default=False, metadata={"help": "Center crop instead of random crop."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    aspect_ratio_buckets: Optional[str] = field(
        default=None,
        metadata={"help": "Aspect-ratio buckets instead of square crops: a target side N (the area N x N; the "
                          "default list: sides multiples of --bucket_step, aspect 1:2 to 2:1, area <= N^2), or a "
                          "list WxH,WxH,... Each image is resized to cover its nearest bucket (log aspect ratio) "
                          "and cropped to it; every batch comes from one bucket. Unset: square crops of "
                          "--resolution."})
    bucket_step: int = field(
        default=DEFAULT_STEP,
        metadata={"help": "Sides of the default bucket list (--aspect_ratio_buckets N) are multiples of this: "
                          "64 for SD 1.x/2.x (VAE 8 x UNet 2^3)."})
    allow_resolution_change: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint saved at another --resolution or bucket set (a resolution stage): "
                          "weights, EMA, optimizer and schedule continue, the data stream continues from its "
                          "saved position with the new crops. Without it such a resume is refused."})
    min_image_size: int = field(
        default=0, metadata={"help": "Skip (and count) images whose shorter side is smaller."})
    caption_dropout_prob: float = field(
        default=0.1, metadata={"help": "Probability of an empty caption (the unconditional prompt for CFG)."})
    buffer_size: int = field(
        default=256, metadata={"help": "Per-worker shuffle buffer (records). Also --shuffle_buffer_size.",
                               "action": _also_accepts("--shuffle_buffer_size")})
    shuffle_every_n_samples: int = field(
        default=1, metadata={"help": "Draw every n-th sample at random from the shuffle buffer; the n-1 between "
                                     "pass straight through (the reference's meaning; its default is 5)."})
    num_records: Optional[int] = field(
        default=None, metadata={"help": "Accepted for the reference's command lines and ignored: the stream is "
                                        "endless and --max_steps sets the run's length."})
    max_consecutive_skips: int = field(
        default=1000, metadata={"help": "A source whose records fail (read, parse, decode or transform) this "
                                        "many times in a row, with no usable sample between, stops the run."})
    max_line_bytes: int = field(
        default=64 << 20, metadata={"help": "Longest record line read (bytes); a longer one is skipped unread."})
    max_image_pixels: int = field(
        default=PILLOW_DEFAULT_MAX_PIXELS,
        metadata={"help": f"Largest image (width x height) decoded; larger ones are skipped. At most "
                          f"{PILLOW_BOMB_ERROR_PIXELS} (Pillow's decompression-bomb error)."})

    def __post_init__(self) -> None:
        if not self.file_list:
            raise ValueError("--file_list is required (a .filelist.list written by create_pretraining_data.py)")
        if not os.path.isfile(self.file_list):
            raise FileNotFoundError(f"--file_list: no such file: {self.file_list}")
        # The VAE downsamples by 8: a resolution that is not a multiple of 8 has no latent of the same image.
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise ValueError(f"--bucket_step must be a positive multiple of 8 (the VAE's factor), got "
                             f"{self.bucket_step}")
        if self.aspect_ratio_buckets is not None:
            try:
                bucket_set(self.aspect_ratio_buckets, self.bucket_step)
            except ValueError as e:
                raise ValueError(f"--aspect_ratio_buckets {self.aspect_ratio_buckets!r}: {e}") from None
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data_format must be one of {list(DATA_FORMATS)} (or unset), got {self.data_format!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.min_image_size < 0:
            raise ValueError(f"--min_image_size must be >= 0, got {self.min_image_size}")
        if not 0.0 <= self.caption_dropout_prob <= 1.0:
            raise ValueError(f"--caption_dropout_prob must be in [0, 1], got {self.caption_dropout_prob}")
        if self.buffer_size < 1:
            raise ValueError(f"--buffer_size (--shuffle_buffer_size) must be >= 1, got {self.buffer_size}")
        if self.shuffle_every_n_samples < 1:
            raise ValueError(f"--shuffle_every_n_samples must be >= 1, got {self.shuffle_every_n_samples}")
        if self.num_records is not None and self.num_records < 0:
            raise ValueError(f"--num_records must be >= 0, got {self.num_records}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"--max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if self.max_line_bytes < 1024:
            raise ValueError(f"--max_line_bytes must be >= 1024, got {self.max_line_bytes}")
        if not 1 <= self.max_image_pixels <= PILLOW_BOMB_ERROR_PIXELS:
            raise ValueError(f"--max_image_pixels must be in [1, {PILLOW_BOMB_ERROR_PIXELS}], got "
                             f"{self.max_image_pixels}")

    def buckets(self) -> Optional[Tuple[Bucket, ...]]:
        """The aspect-ratio buckets (trainer/loader/buckets.py), or None for square crops of --resolution."""
        if self.aspect_ratio_buckets is None:
            return None
        return tuple(bucket_set(self.aspect_ratio_buckets, self.bucket_step))

    def geometry(self) -> dict:
        """What the crops are: saved with the loader's state, so that a resume at another resolution or bucket set
        is noticed (loader_state.plan_resume)."""
        buckets = self.buckets()
        return {"resolution": self.resolution,
                "buckets": None if buckets is None else [bucket_name(b) for b in buckets]}

    def notices(self) -> Tuple[str, ...]:
        """One line per accepted flag that does nothing here, for the start of the log."""
        if self.num_records is None:
            return ()
        return (f"--num_records {self.num_records} is accepted for the reference's command lines and ignored: "
                "the data stream is endless and --max_steps sets the length of the run",)
