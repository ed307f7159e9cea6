"""Small single-purpose Trainer callbacks: EMA update, image logging, benchmark figures, profiler steps."""
from __future__ import annotations

import logging
import os
import resource
import time
from typing import Optional

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback
from paddlenlp.trainer.integrations import VisualDLCallback

from sd.eval import sampling
from sd.images import grid, to_uint8
from sd.eval.args import SamplingArguments
from sd.eval.evaluation import sample_images

logger = logging.getLogger("sd")


class EMACallback(TrainerCallback):
    """Update the UNet's EMA after every optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.on_train_batch_end()


class ImageLoggingCallback(TrainerCallback):
    """Every --image_logging_steps, on rank 0 only: VAE reconstructions of a fixed batch and DDIM samples at
    guidance 1.0 and 7.5 from fixed prompts and seeds (EMA weights swapped in when --use_ema), saved as PNG grids
    under output_dir/samples/ and logged to VisualDL. The training RNG is saved and restored around it, so logging
    images never changes the training trajectory."""

    GUIDANCE = (1.0, 7.5)

    def __init__(self, tokenizer, resolution: int, prompts, num_inference_steps: int, seed: int = 0,
                 num_recon: int = 4, visualdl: Optional[VisualDLCallback] = None):
        """`visualdl`: the Trainer's own VisualDL callback (None when --report_to has no visualdl; the reference's
        custom_visualdl resolves to visualdl, sd/args.py); images go to the writer it opens at train begin,
        beside the scalars."""
        self.tokenizer, self.resolution, self.prompts = tokenizer, resolution, list(prompts)
        self.steps, self.seed, self.num_recon = num_inference_steps, seed, num_recon
        self.visualdl = visualdl
        self.recon_batch = None

    def on_load_data_end(self, args, state, control, inputs=None, **kwargs):
        if self.recon_batch is None and inputs is not None and "pixel_values" in inputs:
            self.recon_batch = inputs["pixel_values"][: self.num_recon].clone()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        n = args.image_logging_steps
        if n <= 0 or state.global_step % n or not state.is_world_process_zero:
            return
        rng = paddle.get_rng_state()
        try:
            self.log_images(args, state.global_step, model)
        finally:
            paddle.set_rng_state(rng)

    @paddle.no_grad()
    def log_images(self, args, step: int, model) -> None:
        t0 = time.time()
        out_dir = os.path.join(args.output_dir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        was_training = model.unet.training
        model.unet.eval()
        try:
            panels = {}
            if self.recon_batch is not None:
                orig = to_uint8(self.recon_batch)
                recon = sampling.reconstruct(model.vae, self.recon_batch)
                panels["reconstruction"] = grid(list(orig) + list(recon), cols=len(orig))
            scheduler = sampling.make_scheduler("ddim", model.noise_scheduler.config)
            config = SamplingArguments(scheduler="ddim", num_inference_steps=self.steps,
                                    guidance_scales=list(self.GUIDANCE), seed=self.seed, batch_size=len(self.prompts))
            with model.ema_scope():
                pipe = sampling.make_pipeline(model.vae, model.text_encoder, self.tokenizer, model.unet, scheduler)
                for g in self.GUIDANCE:
                    per_prompt = sample_images(pipe, self.prompts, range(len(self.prompts)), config, g,
                                               self.resolution, self.resolution)
                    images = [imgs[0] for imgs in per_prompt]
                    panels[f"samples_cfg{g:g}"] = grid(images, cols=len(images), labels=self.prompts)
        finally:
            if was_training:
                model.unet.train()
        writer = self.visualdl.vdl_writer if self.visualdl is not None else None
        for name, image in panels.items():
            image.save(os.path.join(out_dir, f"step-{step:07d}_{name}.png"))
            if writer is not None:
                writer.add_image(tag=f"images/{name}", img=np.asarray(image), step=step, dataformats="HWC")
        logger.info("step %d: logged %s to %s in %.1fs", step, ", ".join(panels), out_dir, time.time() - t0)


class BenchmarkCallback(TrainerCallback):
    """FLAG_BENCHMARK / --benchmark: ips, reader cost and peak memory at every logging step."""

    def __init__(self):
        self.reader_cost = self.batch_cost = 0.0
        self.samples = self.steps = 0
        self._t_end = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_begin = time.perf_counter()

    def on_load_data_end(self, args, state, control, inputs=None, **kwargs):
        now = time.perf_counter()
        if self._t_end is not None:
            self.reader_cost += now - self._t_end
        for key in ("pixel_values", "latent_mean"):
            if inputs is not None and key in inputs:
                self.samples += int(inputs[key].shape[0])

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._t_end is not None:
            self.batch_cost += now - self._t_end
            self.steps += 1
        self._t_end = now
        if state.global_step % max(1, args.logging_steps) == 0 and self.steps:
            logger.info("benchmark: step %d ips %.2f samples/s, batch_cost %.4fs, reader_cost %.4fs, peak_mem %s",
                        state.global_step, self.samples / max(self.batch_cost, 1e-9),
                        self.batch_cost / self.steps, self.reader_cost / self.steps, peak_memory())
            self.reader_cost = self.batch_cost = 0.0
            self.samples = self.steps = 0


def visualdl_callback(trainer) -> Optional[VisualDLCallback]:
    """The Trainer's own VisualDL logger (paddlenlp adds it when --report_to includes visualdl), or None."""
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, VisualDLCallback)), None)


def peak_memory() -> str:
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return f"{paddle.device.cuda.max_memory_allocated() / 2**30:.2f} GiB (device)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (host RSS)"


class ProfilerCallback(TrainerCallback):
    """--profiler_options "batch_range=[10,20];profile_path=..." through paddlenlp's profiler helper."""

    def __init__(self, options: str):
        self.options = options

    def on_step_begin(self, args, state, control, **kwargs):
        from paddlenlp.utils import profiler

        profiler.add_profiler_step(self.options)
