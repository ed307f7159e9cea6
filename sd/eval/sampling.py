"""Pipeline building blocks shared by the training-time image logging and eval.py: sampling schedulers by name,
the pipeline from in-memory components, VAE round trips and image grids. The seeded sampling loop itself is
sd/evaluation.sample_images (per-image numpy latents, independent of batching)."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import paddle
from PIL import Image
from ppdiffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

SCHEDULERS: Dict[str, tuple] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}


def make_scheduler(name: str, train_scheduler_config):
    """A sampling scheduler sharing the training schedule (betas, timesteps, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return cls.from_config(train_scheduler_config, **extra)


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@paddle.no_grad()
def reconstruct(vae, pixel_values: paddle.Tensor) -> np.ndarray:
    """VAE round trip with the posterior mode (deterministic); returns uint8 NHWC."""
    latents = vae.encode(pixel_values).latent_dist.mode()
    return to_uint8(vae.decode(latents).sample)


def to_uint8(images: paddle.Tensor) -> np.ndarray:
    """[-1, 1] NCHW tensor -> uint8 NHWC array."""
    arr = ((images.astype("float32").clip(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)


def grid(images: Sequence, cols: int, pad: int = 2, bg: int = 255) -> Image.Image:
    """Tile PIL images or HWC uint8 arrays (all the same size) row-major into one image."""
    arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    h, w = arrays[0].shape[:2]
    rows = (len(arrays) + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), bg, np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    return Image.fromarray(canvas)
