"""Pipeline building blocks shared by the training-time image logging and eval.py: sampling schedulers by name,
the pipeline from in-memory components and VAE round trips (image grids: sd/images.py). The seeded sampling loop
itself is sd/eval/evaluation.sample_images (per-image numpy latents, independent of batching)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import paddle
from ppdiffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from sd.images import to_uint8

SCHEDULERS: Dict[str, tuple] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}
# Schedulers whose step() draws fresh noise from paddle's global RNG (see sd/eval/evaluation.py). DDIM (eta=0),
# PNDM, LMS, Euler (s_churn=0) and DPM-Solver++ (non-SDE) are deterministic given the initial latents.
STOCHASTIC_SCHEDULERS = frozenset({"euler-ancestral"})


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
