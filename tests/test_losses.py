"""The noise and loss math against hand-computed values."""
import math

import numpy as np
import paddle
import pytest
from ppdiffusers import DDPMScheduler

from sd import losses

pytestmark = pytest.mark.unit


def t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x, dtype=dtype))


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_offset_noise_shifts_each_channel_by_its_draw():
    noise = paddle.zeros([2, 3, 2, 2])
    draw = t(np.arange(6).reshape(2, 3, 1, 1))
    out = losses.offset_noise(noise, 0.1, draw).numpy()
    for b in range(2):
        for c in range(3):
            assert np.allclose(out[b, c], 0.1 * (3 * b + c))
    assert losses.offset_noise(noise, 0.0, draw) is noise


def test_perturb_noise_is_noise_plus_scaled_draw():
    noise, draw = t([[1.0, -2.0]]), t([[10.0, 20.0]])
    assert np.allclose(losses.perturb_noise(noise, 0.1, draw).numpy(), [[2.0, 0.0]])
    assert losses.perturb_noise(noise, 0.0, draw) is noise


def test_epsilon_target_is_the_noise(scheduler):
    latents, noise = paddle.randn([2, 4, 2, 2]), paddle.randn([2, 4, 2, 2])
    out = losses.diffusion_target("epsilon", latents, noise, paddle.to_tensor([3, 500]), scheduler)
    assert np.array_equal(out.numpy(), noise.numpy())


def test_v_target_by_hand(scheduler):
    # v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 at t = 0 and t = 999, scaled_linear betas.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    x0, eps = np.full([2, 1, 1, 1], 2.0), np.full([2, 1, 1, 1], 3.0)
    out = losses.diffusion_target("v_prediction", t(x0), t(eps), paddle.to_tensor([0, 999]), scheduler).numpy()
    for i, step in enumerate([0, 999]):
        want = math.sqrt(abar[step]) * 3.0 - math.sqrt(1 - abar[step]) * 2.0
        assert out[i, 0, 0, 0] == pytest.approx(want, rel=1e-4)


def test_snr_by_hand(scheduler):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    snr = losses.snr_of(scheduler, paddle.to_tensor([0, 10, 999])).numpy()
    assert np.allclose(snr, abar[[0, 10, 999]] / (1 - abar[[0, 10, 999]]), rtol=1e-4)


def test_min_snr_weights_epsilon_and_v():
    snr = t([0.5, 5.0, 20.0])
    # epsilon: min(snr, 5) / snr -> 1, 1, 0.25
    assert np.allclose(losses.min_snr_weights(snr, 5.0, "epsilon").numpy(), [1.0, 1.0, 0.25])
    # v: min(snr, 5) / (snr + 1) -> 0.5/1.5, 5/6, 5/21
    assert np.allclose(losses.min_snr_weights(snr, 5.0, "v_prediction").numpy(), [1 / 3, 5 / 6, 5 / 21])
    with pytest.raises(ValueError, match="prediction_type"):
        losses.min_snr_weights(snr, 5.0, "sample")


def test_capped_x0_weights_keep_high_noise_and_cap_low_noise():
    snr = t([0.0, 0.5, 4.0, 20.0])
    # min(snr + 1, 5) / (snr + 1) -> 1, 1, 1, 5/21: plain v loss up to SNR 4, then the x0 weight stays at 5
    assert np.allclose(losses.capped_x0_weights(snr, 5.0).numpy(), [1.0, 1.0, 1.0, 5 / 21])
    # where min-SNR's v weight vanishes at high noise (0 at SNR 0)
    assert losses.min_snr_weights(snr, 5.0, "v_prediction").numpy()[0] == 0.0


def test_diffusion_loss_plain_and_weighted():
    pred = t(np.zeros([2, 1, 1, 2]))
    target = t([[[[1.0, 1.0]]], [[[2.0, 2.0]]]])
    # per-sample MSE: 1 and 4; plain mean 2.5; weights (1, 0.5) -> (1 + 2) / 2 = 1.5
    assert float(losses.diffusion_loss(pred, target)) == pytest.approx(2.5)
    assert float(losses.diffusion_loss(pred, target, t([1.0, 0.5]))) == pytest.approx(1.5)


def test_unknown_prediction_type_is_an_error(scheduler):
    with pytest.raises(ValueError, match="prediction_type"):
        losses.diffusion_target("x0", paddle.zeros([1]), paddle.zeros([1]), paddle.to_tensor([1]), scheduler)


def test_vae_loss_by_hand():
    target = t(np.zeros([2, 1, 2, 2]))
    recon = t(np.full([2, 1, 2, 2], 0.5))
    kl = t([8.0, 16.0])  # mean 12 over 4 pixel elements -> 3
    assert float(losses.vae_loss(recon, target, kl, 0.0)) == pytest.approx(0.25)
    assert float(losses.vae_loss(recon, target, kl, 0.1)) == pytest.approx(0.25 + 0.3)
    assert float(losses.vae_loss(recon, target, kl, 0.0, "l1")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reconstruction loss"):
        losses.vae_loss(recon, target, kl, 0.0, "ssim")


def test_psnr_and_scaling_factor_by_hand():
    target = t(np.zeros([1, 3, 4, 4]))
    # MSE 0.01 with peak-to-peak 2 -> 10 * log10(4 / 0.01) = 26.02 dB
    assert float(losses.psnr(t(np.full([1, 3, 4, 4], 0.1)), target)[0]) == pytest.approx(26.0206, abs=1e-3)
    assert losses.latent_scaling_factor(1 / 0.18215) == pytest.approx(0.18215)
    with pytest.raises(ValueError):
        losses.latent_scaling_factor(0.0)


def test_sample_draws_depend_only_on_each_samples_key():
    keys = [(23, 5, i) for i in range(4)]
    whole = losses.sample_draws(keys, [4, 4, 2, 2], 1000)
    halves = [losses.sample_draws(keys[:2], [2, 4, 2, 2], 1000), losses.sample_draws(keys[2:], [2, 4, 2, 2], 1000)]
    for name in ("vae", "noise", "offset", "perturb", "timesteps"):
        joined = np.concatenate([h[name].numpy() for h in halves])
        assert np.array_equal(whole[name].numpy(), joined), name
    other = losses.sample_draws([(23, 6, 0)], [1, 4, 2, 2], 1000)
    assert not np.array_equal(other["noise"].numpy()[0], whole["noise"].numpy()[0])
    assert whole["timesteps"].dtype == paddle.int64 and 0 <= int(whole["timesteps"].min()) <= 999
    with pytest.raises(ValueError, match="sample keys"):
        losses.sample_draws(keys, [3, 4, 2, 2], 1000)
