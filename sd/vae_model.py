"""The VAE pretraining stage: a ppdiffusers AutoencoderKL trained on part files with reconstruction + KL.

The wrapper has the same trainer hooks as sd/model.py (param_groups, save_trained, save_resume_state,
load_trained, on_train_batch_end), so the one StreamingTrainer trains both stages. A VAE folder holding pickled
weights is refused (trainer/checkpoint.py refuse_pickled_weights), at start and on resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import paddle
from paddle import nn
from ppdiffusers import AutoencoderKL

from sd import losses
from trainer.checkpoint import refuse_pickled_weights

logger = logging.getLogger("sd")


@dataclass
class VAEArguments:
    vae_config: Optional[str] = field(default=None, metadata={"help": "AutoencoderKL config .json (from scratch)."})
    vae_name_or_path: Optional[str] = field(default=None, metadata={"help": "A pretrained vae/ folder to fine-tune."})
    kl_weight: float = field(default=1e-6, metadata={"help": "KL weight, LDM convention (sums): SD used 1e-6."})
    recon_loss: str = field(default="mse", metadata={"help": "mse | l1"})
    eval_file_list: Optional[str] = field(
        default=None, metadata={"help": "Held-out .filelist.list for PSNR (default: the training data, flagged)."})
    num_eval_images: int = field(default=64, metadata={"help": "Images for PSNR and the latent scaling factor."})

    def __post_init__(self):
        if (self.vae_config is None) == (self.vae_name_or_path is None):
            raise ValueError("give exactly one of --vae_config (from scratch) and --vae_name_or_path (fine-tune)")
        path = self.vae_config or self.vae_name_or_path
        if self.vae_config is not None and not (self.vae_config.endswith(".json") and os.path.isfile(path)):
            raise FileNotFoundError(f"--vae_config: no such .json file: {path}")
        if self.vae_name_or_path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"--vae_name_or_path: no such folder: {path}")
        if self.recon_loss not in ("mse", "l1"):
            raise ValueError(f"--recon_loss must be mse or l1, got {self.recon_loss!r}")
        if self.kl_weight < 0:
            raise ValueError(f"--kl_weight must be >= 0, got {self.kl_weight}")
        if self.eval_file_list is not None and not os.path.isfile(self.eval_file_list):
            raise FileNotFoundError(f"--eval_file_list: no such file: {self.eval_file_list}")

    def build(self, trust_pickled: bool = False) -> AutoencoderKL:
        if self.vae_config is not None:
            with open(self.vae_config, encoding="utf-8") as f:
                return AutoencoderKL.from_config(json.load(f))
        refuse_pickled_weights(self.vae_name_or_path, "--vae_name_or_path", trust_pickled)
        return AutoencoderKL.from_pretrained(self.vae_name_or_path)


class VAEModel(nn.Layer):
    """The VAE stage's side of the model-to-trainer contract (trainer/contract.py TrainableModel)."""

    uses_sample_keys = False  # the posterior sample comes from paddle's RNG, restored exactly on resume
    train_text_encoder = False

    def __init__(self, vae_args: VAEArguments, vae: AutoencoderKL):
        super().__init__()
        self.vae_args, self.vae = vae_args, vae

    def forward(self, pixel_values: paddle.Tensor, **kwargs) -> paddle.Tensor:
        posterior = self.vae.encode(pixel_values).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return losses.vae_loss(recon, pixel_values, posterior.kl(), self.vae_args.kl_weight, self.vae_args.recon_loss)

    def param_groups(self):
        return [{"params": list(self.vae.parameters()), "learning_rate": 1.0}]

    def save_trained(self, output_dir: str, only_updated: bool = True, tokenizer=None) -> None:
        self.vae.save_pretrained(os.path.join(output_dir, "vae"))

    def save_resume_state(self, checkpoint: str) -> None:
        pass  # the weights are the whole state (optimizer, scheduler and RNG are the Trainer's)

    def load_trained(self, checkpoint: str, trust_pickled: bool = False) -> None:
        vae_dir = os.path.join(checkpoint, "vae")
        if not os.path.isdir(vae_dir):
            raise FileNotFoundError(f"{checkpoint}: no vae/ folder (not a checkpoint of train_vae.py?)")
        refuse_pickled_weights(vae_dir, "the checkpoint's VAE", trust_pickled)
        self.vae.set_state_dict(AutoencoderKL.from_pretrained(vae_dir).state_dict())

    def on_train_batch_end(self) -> None:
        pass  # no EMA for the VAE stage

    def ema_scope(self):
        return contextlib.nullcontext()


@paddle.no_grad()
def measure(vae: AutoencoderKL, batches) -> dict:
    """PSNR of posterior-mode reconstructions and the std of sampled latents over `batches` of pixel_values.
    The std is what the latent scaling factor is computed from (SD's 0.18215 came from the same measurement)."""
    vae.eval()
    psnrs, total, sq, n = [], 0.0, 0.0, 0
    for pixels in batches:
        posterior = vae.encode(pixels).latent_dist
        psnrs.append(losses.psnr(vae.decode(posterior.mode()).sample, pixels))
        z = posterior.sample().astype("float32")
        total += float(z.sum())
        sq += float((z * z).sum())
        n += int(z.numel())
    if n == 0:
        raise ValueError("no images to measure the VAE on")
    mean = total / n
    std = max(sq / n - mean * mean, 0.0) ** 0.5
    return {"psnr_db": float(paddle.concat(psnrs).mean()), "latent_mean": mean, "latent_std": std,
            "scaling_factor": losses.latent_scaling_factor(std), "images": int(sum(p.shape[0] for p in psnrs))}
