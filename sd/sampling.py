"""Sampling with ppdiffusers' StableDiffusionPipeline, shared by the training-time image logging and eval.py.

Scheduler names follow eval.py's --scheduler flag. Every draw uses a seeded paddle.Generator, so samples are
reproducible. On CPU, ppdiffusers' paddle.Generator().manual_seed() reseeds paddle's *global* generator: callers
inside training save and restore the RNG state around sampling (trainer/callbacks.py does).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

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
def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], guidance_scale: float, seed: int,
             height: int, width: int, num_inference_steps: int, negative_prompt=None,
             num_images_per_prompt: int = 1) -> List[Image.Image]:
    """Images for `prompts` (num_images_per_prompt each, prompt-major), from one seeded generator."""
    generator = paddle.Generator().manual_seed(seed)
    out = pipe(list(prompts), height=height, width=width, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, negative_prompt=negative_prompt, generator=generator,
               num_images_per_prompt=num_images_per_prompt, output_type="pil")
    return out.images


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
