"""The VAE pretraining stage: train an AutoencoderKL on part files, then measure it and set its latent scale.

    python train_vae.py --vae_config sd/configs/vae_tiny.json --file_list data/demo/filelist/demo.filelist.list \
        --eval_file_list data/demo_eval/filelist/demo_eval.filelist.list --resolution 32 --output_dir runs/vae \
        --max_steps 1000 --learning_rate 1e-3 --per_device_train_batch_size 16

Writes OUTPUT/vae/ (safetensors; AutoencoderKL.from_pretrained loads it) with `scaling_factor` measured on the
data, OUTPUT/vae_report.json (PSNR on held-out images, latent std, scaling factor), and
OUTPUT/vae_reconstructions.png (inputs above, reconstructions below). Checkpoints and resume as train.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from itertools import islice
from typing import Optional, Tuple

import paddle
from paddlenlp.trainer import set_seed

from data_tools.fileio import write_json_atomic
from sd.args import TRAIN_CONFIG_NAME, DataArguments, SDTrainingArguments
from sd.config import parse_args, save_config
from sd.device import DeviceFacts, resolve_precision
from sd.eval.sampling import reconstruct
from sd.images import grid, to_uint8
from sd.vae_model import VAEArguments, VAEModel, measure
from trainer.entry import build_dataset, log_run_config, resolve_checkpoint
from trainer.streaming_trainer import StreamingTrainer

logger = logging.getLogger("sd")


@dataclass(frozen=True)
class VAERun:
    """The VAE stage's resolved config: what runs, what is logged, what is saved (train_config.json)."""

    vae: VAEArguments
    data: DataArguments
    training: SDTrainingArguments  # effective: this device's precision, no UNet image logging
    notices: Tuple[str, ...]

    def save(self, folder: str) -> str:
        return save_config(os.path.join(folder, TRAIN_CONFIG_NAME), self)


def resolve_vae(vae_args: VAEArguments, data_args: DataArguments, training_args: SDTrainingArguments,
                device: Optional[DeviceFacts] = None) -> VAERun:
    precision, notices = resolve_precision(training_args.fp16, training_args.bf16, training_args.fp16_opt_level,
                                           device or DeviceFacts.detect())
    training = dataclasses.replace(
        training_args, fp16=precision.fp16, bf16=precision.bf16, fp16_opt_level=precision.fp16_opt_level,
        image_logging_steps=0,  # UNet samples do not apply; the stage ends with its own reconstruction grid
        ignore_data_skip=True)  # the loader resumes by position (see sd/args.resolve_train)
    return VAERun(vae=vae_args, data=data_args, training=training, notices=tuple(notices))


def eval_batches(run: VAERun):
    """Deterministic batches (center crop, no flip, no caption dropout, in-process) of the held-out list, or of
    the training data."""
    if run.vae.eval_file_list is None:
        logger.warning("no --eval_file_list: PSNR is measured on training images, not held-out ones")
    data = dataclasses.replace(run.data, file_list=run.vae.eval_file_list or run.data.file_list, center_crop=True,
                               random_flip=False, caption_dropout_prob=0.0)
    dataset = build_dataset(data, run.training, None, num_workers=0)
    n = -(-run.vae.num_eval_images // run.training.per_device_train_batch_size)
    return [paddle.to_tensor(b["pixel_values"]) for b in islice(iter(dataset), n)]


def finish(model: VAEModel, run: VAERun) -> dict:
    """Measure PSNR and the latent std, write the scaling factor into vae/config.json, save report and grid."""
    out = run.training.output_dir
    batches = eval_batches(run)
    report = measure(model.vae, batches)
    model.vae.register_to_config(scaling_factor=report["scaling_factor"])
    model.save_trained(out)
    report.update(steps=run.training.max_steps, resolution=run.data.resolution,
                  held_out=run.vae.eval_file_list is not None, kl_weight=run.vae.kl_weight)
    write_json_atomic(os.path.join(out, "vae_report.json"), report, indent=2)
    first = batches[0][:8]
    grid(list(to_uint8(first)) + list(reconstruct(model.vae, first)), cols=first.shape[0]).save(
        os.path.join(out, "vae_reconstructions.png"))
    logger.info("VAE: PSNR %.2f dB on %d %s images; latent std %.4f -> scaling_factor %.5f (in vae/config.json)",
                report["psnr_db"], report["images"], "held-out" if report["held_out"] else "training",
                report["latent_std"], report["scaling_factor"])
    return report


def main(argv=None):
    run = resolve_vae(*parse_args((VAEArguments, DataArguments, SDTrainingArguments), argv))
    log_run_config(run)
    checkpoint = resolve_checkpoint(run.training)
    set_seed(run.training.seed)

    model = VAEModel(run.vae, run.vae.build(trust_pickled=run.training.trust_pickled_checkpoint))
    dataset = build_dataset(run.data, run.training, None)
    if dataset.latents:
        raise ValueError(f"--file_list {run.data.file_list} is a latent dataset: the VAE stage trains on images")
    logger.info("data: %s", dataset.describe())
    trainer = StreamingTrainer(model=model, args=run.training, train_dataset=dataset, run_config=run)
    trainer.save_run_config(run.training.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    if run.training.should_save:
        finish(model, run)


if __name__ == "__main__":
    main()
