"""The VAE pretraining stage: train an AutoencoderKL on part files, then measure it and set its latent scale.

    python train_vae.py --vae_config sd/configs/vae_tiny.json --file_list data/demo/filelist/demo.filelist.list \
        --eval_file_list data/demo_eval/filelist/demo_eval.filelist.list --resolution 32 --output_dir runs/vae \
        --max_steps 1000 --learning_rate 1e-3 --per_device_train_batch_size 16

Writes OUTPUT/vae/ (safetensors; AutoencoderKL.from_pretrained loads it) with `scaling_factor` measured on the
data, OUTPUT/vae_report.json (PSNR on held-out images, latent std, scaling factor), and
OUTPUT/vae_reconstructions.png (inputs above, reconstructions below). Checkpoints and resume as train.py.
"""
from __future__ import annotations

import json
import logging
import os
from itertools import islice

import paddle
from paddlenlp.trainer import set_seed

from sd.eval import sampling
from sd.args import DataArguments, SDTrainingArguments, parse_args
from sd.vae_model import VAEArguments, VAEModel, measure
from trainer.entry import build_dataset, resolve_checkpoint, setup_logging
from trainer.streaming_trainer import StreamingTrainer

logger = logging.getLogger("sd")


def eval_batches(data_args, training_args, vae_args):
    """Deterministic batches (center crop, no flip) of the held-out list, or of the training data."""
    file_list = vae_args.eval_file_list or data_args.file_list
    if vae_args.eval_file_list is None:
        logger.warning("no --eval_file_list: PSNR is measured on training images, not held-out ones")
    dataset = build_dataset(data_args, training_args, None, file_list=file_list, center_crop=True,
                            caption_dropout_prob=0.0, num_workers=0)
    n = -(-vae_args.num_eval_images // training_args.per_device_train_batch_size)
    return [paddle.to_tensor(b["pixel_values"]) for b in islice(iter(dataset), n)]


def finish(model: VAEModel, data_args, training_args, vae_args) -> dict:
    """Measure PSNR and the latent std, write the scaling factor into vae/config.json, save report and grid."""
    batches = eval_batches(data_args, training_args, vae_args)
    report = measure(model.vae, batches)
    model.vae.register_to_config(scaling_factor=report["scaling_factor"])
    model.save_trained(training_args.output_dir)
    report.update(steps=training_args.max_steps, resolution=data_args.resolution,
                  held_out=vae_args.eval_file_list is not None, kl_weight=vae_args.kl_weight)
    with open(os.path.join(training_args.output_dir, "vae_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    first = batches[0][:8]
    grid = sampling.grid(list(sampling.to_uint8(first)) + list(sampling.reconstruct(model.vae, first)),
                         cols=first.shape[0])
    grid.save(os.path.join(training_args.output_dir, "vae_reconstructions.png"))
    logger.info("VAE: PSNR %.2f dB on %d %s images; latent std %.4f -> scaling_factor %.5f (in vae/config.json)",
                report["psnr_db"], report["images"], "held-out" if report["held_out"] else "training",
                report["latent_std"], report["scaling_factor"])
    return report


def main(argv=None):
    vae_args, data_args, training_args = parse_args((VAEArguments, DataArguments, SDTrainingArguments), argv)
    training_args.image_logging_steps = 0  # UNet samples do not apply; the stage ends with its own grid
    setup_logging(training_args.notices)
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)

    model = VAEModel(vae_args, vae_args.build())
    dataset = build_dataset(data_args, training_args, None)
    logger.info("data: %s", dataset.describe())
    trainer = StreamingTrainer(model=model, args=training_args, train_dataset=dataset, model_args=vae_args)
    trainer.train(resume_from_checkpoint=checkpoint)
    if training_args.should_save:
        finish(model, data_args, training_args, vae_args)


if __name__ == "__main__":
    main()
