"""The noise and loss math of latent-diffusion training, as small pure functions.

Each takes its random draws as arguments instead of sampling them, so tests can check it against hand-computed
values and the model wrapper owns all randomness in one place (sd/model.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import paddle
from ppdiffusers.training_utils import compute_snr


def sample_draws(keys: Optional[Sequence[Sequence[int]]], latent_shape, num_timesteps: int) -> Dict[str, paddle.Tensor]:
    """All random draws of one training batch, sample by sample from a counter-based generator keyed by
    `keys[i]` (e.g. (seed, micro_step, global_index)): VAE posterior draw, noise, offset-noise draw, perturbation
    draw, timestep. Without keys (outside the Trainer) they come from paddle's global RNG instead.
    Generating on the host costs ~10 ms per step at SD scale (batch 32, 64x64 latents) and makes the stream of
    draws independent of the device count and of restarts."""
    b, c, h, w = latent_shape
    if keys is None:
        return {"vae": paddle.randn(latent_shape), "noise": paddle.randn(latent_shape),
                "offset": paddle.randn([b, c, 1, 1]), "perturb": paddle.randn(latent_shape),
                "timesteps": paddle.randint(0, num_timesteps, [b]).astype("int64")}
    if len(keys) != b:
        raise ValueError(f"{len(keys)} sample keys for a batch of {b}")
    out = {"vae": [], "noise": [], "offset": [], "perturb": [], "timesteps": []}
    for key in keys:
        rng = np.random.default_rng([int(k) for k in key])
        out["vae"].append(rng.standard_normal((c, h, w), dtype=np.float32))
        out["noise"].append(rng.standard_normal((c, h, w), dtype=np.float32))
        out["offset"].append(rng.standard_normal((c, 1, 1), dtype=np.float32))
        out["perturb"].append(rng.standard_normal((c, h, w), dtype=np.float32))
        out["timesteps"].append(rng.integers(0, num_timesteps))
    draws = {k: paddle.to_tensor(np.stack(v)) for k, v in out.items() if k != "timesteps"}
    draws["timesteps"] = paddle.to_tensor(np.asarray(out["timesteps"], dtype=np.int64))
    return draws


def offset_noise(noise: paddle.Tensor, offset: float, channel_draw: paddle.Tensor) -> paddle.Tensor:
    """Offset noise (Guttenberg 2023): shift each (sample, channel) by `offset * N(0,1)` so the model can learn to
    change the image's mean brightness. `channel_draw` is a [B, C, 1, 1] standard-normal draw."""
    if offset == 0:
        return noise
    return noise + offset * channel_draw


def perturb_noise(noise: paddle.Tensor, scale: float, draw: paddle.Tensor) -> paddle.Tensor:
    """Input perturbation (Ning et al. 2023): the noisy input is built from `noise + scale * draw` while the
    target stays `noise`, which reduces exposure bias. `draw` has the shape of `noise`."""
    if scale == 0:
        return noise
    return noise + scale * draw


def diffusion_target(prediction_type: str, latents: paddle.Tensor, noise: paddle.Tensor,
                     timesteps: paddle.Tensor, scheduler) -> paddle.Tensor:
    """What the UNet regresses: the noise (epsilon) or the velocity v = sqrt(a)*noise - sqrt(1-a)*x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(snr: paddle.Tensor, gamma: float, prediction_type: str) -> paddle.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per sample. For epsilon targets the MSE on the noise equals
    SNR x the MSE on x0, so the weight is min(SNR, gamma) / SNR; for v targets it is min(SNR, gamma) / (SNR + 1)."""
    clipped = paddle.minimum(snr, paddle.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def capped_x0_weights(snr: paddle.Tensor, gamma: float) -> paddle.Tensor:
    """Weights of v-prediction MSE that weight the x0 error min(SNR + 1, gamma). The plain v loss is the x0 error
    times SNR + 1; this caps its low-noise weight at gamma like min-SNR does, but keeps the high-noise steps at
    weight ~1 where min-SNR's min(SNR, gamma) / (SNR + 1) sends them to 0 (and with them, on the tiny default, what
    the model learns of the layout)."""
    return paddle.minimum(snr + 1.0, paddle.full_like(snr, gamma)) / (snr + 1.0)


def diffusion_loss(pred: paddle.Tensor, target: paddle.Tensor,
                   weights: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """Mean squared error in float32; with `weights` ([B]) each sample's mean error is weighted first."""
    err = (pred.astype("float32") - target.astype("float32")) ** 2
    if weights is None:
        return err.mean()
    per_sample = err.reshape([err.shape[0], -1]).mean(axis=1)
    return (per_sample * weights.astype("float32")).mean()


def snr_of(scheduler, timesteps: paddle.Tensor) -> paddle.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at `timesteps` (ppdiffusers' compute_snr)."""
    return compute_snr(scheduler, timesteps)


def vae_loss(recon: paddle.Tensor, target: paddle.Tensor, kl_per_sample: paddle.Tensor, kl_weight: float,
             kind: str = "mse") -> paddle.Tensor:
    """Reconstruction + KL of the VAE stage. The reconstruction error is a per-element mean; the KL (summed over
    latent elements, per sample, as ppdiffusers' posterior.kl() gives it) is divided by the number of pixel
    elements, so `kl_weight` means what it means in the LDM recipe, where both terms are sums (SD used 1e-6)."""
    diff = recon.astype("float32") - target.astype("float32")
    if kind == "mse":
        rec = (diff ** 2).mean()
    elif kind == "l1":
        rec = diff.abs().mean()
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; expected mse or l1")
    pixels_per_sample = float(target[0].numel())
    return rec + kl_weight * kl_per_sample.astype("float32").mean() / pixels_per_sample


def psnr(recon: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((recon.astype("float32").clip(-1, 1) - target.astype("float32")) ** 2)
    mse = mse.reshape([mse.shape[0], -1]).mean(axis=1)
    return 10.0 * paddle.log10(4.0 / paddle.maximum(mse, paddle.full_like(mse, 1e-10)))


def latent_scaling_factor(latent_std: float) -> float:
    """The factor that gives latents unit variance: SD's 0.18215 is 1 / std of its VAE's latents on its data."""
    if not latent_std > 0:
        raise ValueError(f"latent std must be > 0, got {latent_std}")
    return 1.0 / latent_std
