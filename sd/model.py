"""The latent-diffusion model wrapper: frozen VAE and text encoder, trainable UNet, optional EMA, and its loss.

Components come from ppdiffusers/paddlenlp (AutoencoderKL, CLIPTextModel, UNet2DConditionModel, DDPMScheduler,
LitEma); this file only wires them and owns the training randomness (noise, timesteps, VAE sampling), what a
checkpoint saves of the model (save_trained) and the pipeline folder a finished run leaves (save_pipeline_folder).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Optional

import paddle
from paddle import nn
from paddle.incubate.nn.functional import fused_linear
from ppdiffusers.transformers import CLIPTextModel  # the class StableDiffusionPipeline expects (.dtype etc.)
from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from ppdiffusers.models.ema import LitEma
from ppdiffusers.models.resnet import ResnetBlock2D
from ppdiffusers.models.transformer_2d import Transformer2DModel
from ppdiffusers.training_utils import freeze_params

from data_tools.fileio import write_json_atomic
from sd import losses
from sd.components import MODEL_INDEX, set_tokenizer_max_length, tokenizer_max_length
from sd.paths import SCHEDULER_SD_V1
from trainer import checkpoint as ckpt

logger = logging.getLogger("sd")
EMA_VARIANT = "ema"  # the reference's name: unet/diffusion_paddle_model.ema.safetensors


class FusedLinearForward:
    """Mixin giving a linear layer the fused forward; a LoRA layer, when one is set, keeps the original path."""

    def forward(self, hidden_states, *args, **kwargs):
        if getattr(self, "lora_layer", None) is not None:
            return super().forward(hidden_states, *args, **kwargs)
        return fused_linear(hidden_states, self.weight, self.bias)


def zero_init_unet(unet: UNet2DConditionModel) -> None:
    """The reference's from-scratch init: zero conv_out, every resnet's conv2 and every transformer's proj_out,
    so each residual branch starts as the identity and the initial prediction is zero."""
    def zero(layer):
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.set_value(paddle.zeros_like(p))

    zero(unet.conv_out)
    for _, m in unet.named_sublayers():
        if isinstance(m, ResnetBlock2D):
            zero(m.conv2)
        elif isinstance(m, Transformer2DModel):
            zero(m.proj_out)


def load_unet(path: str, from_config: bool) -> UNet2DConditionModel:
    if from_config:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        unet = UNet2DConditionModel.from_config(config)
        zero_init_unet(unet)
        logger.info("UNet: from scratch, config %s (zeroed conv_out, resnet conv2, proj_out)", path)
    else:
        unet = UNet2DConditionModel.from_pretrained(path)
        logger.info("UNet: pretrained weights from %s", path)
    return unet


class LatentDiffusionModel(nn.Layer):
    uses_sample_keys = True  # forward() takes the Trainer's per-sample keys for its random draws

    def __init__(self, model_args, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 unet: UNet2DConditionModel, noise_scheduler: DDPMScheduler, text_encoder_lr_scale: float = 1.0):
        super().__init__()
        self.model_args = model_args
        # The text encoder's rate as a multiple of the scheduler's (the UNet's) rate: paddle's per-group
        # learning_rate is a multiplier.
        self.text_encoder_lr_scale = text_encoder_lr_scale
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.noise_scheduler = noise_scheduler
        self.prediction_type = model_args.prediction_type
        self.train_text_encoder = model_args.train_text_encoder
        self.scaling_factor = float(vae.config.scaling_factor)
        text_dim = text_encoder.config.hidden_size
        if unet.config.cross_attention_dim != text_dim:
            raise ValueError(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden "
                             f"size {text_dim}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"UNet in_channels {unet.config.in_channels} != VAE latent_channels "
                             f"{vae.config.latent_channels}")
        freeze_params(self.vae.parameters())
        self.vae.eval()
        if not self.train_text_encoder:
            freeze_params(self.text_encoder.parameters())
            self.text_encoder.eval()
        self.model_ema = LitEma(self.unet, decay=model_args.ema_decay) if model_args.use_ema else None

    @classmethod
    def from_run(cls, run) -> "LatentDiffusionModel":
        """The model of a resolved TrainRun (sd/args.py), its features (recompute, attention, fused linear,
        compiled UNet) switched on as resolved for this device."""
        model = cls.from_components(run.model, run.components,
                                    text_encoder_lr_scale=run.text_encoder_learning_rate / run.unet_learning_rate)
        if run.features.recompute:
            model.enable_recompute()
        if run.features.memory_efficient_attention:
            model.enable_memory_efficient_attention()
        if run.features.fused_linear:
            model.enable_fused_linear()
        if run.features.static_unet:
            model.compile_unet()
        return model

    @classmethod
    def from_components(cls, model_args, parts, text_encoder_lr_scale: float = 1.0) -> "LatentDiffusionModel":
        """The model from resolved component paths (sd/components.Components), weights loaded, nothing enabled."""
        vae = AutoencoderKL.from_pretrained(parts.vae)
        text_encoder = CLIPTextModel.from_pretrained(parts.text_encoder)
        unet = load_unet(parts.unet, parts.unet_from_config)
        if parts.scheduler:  # the folder's own schedule (clip_sample, steps_offset, ...) is kept
            scheduler = DDPMScheduler.from_pretrained(parts.scheduler, prediction_type=model_args.prediction_type)
        else:  # SD v1's schedule, as the tiny init folder has it
            with open(SCHEDULER_SD_V1, encoding="utf-8") as f:
                scheduler = DDPMScheduler.from_config(json.load(f), prediction_type=model_args.prediction_type)
        return cls(model_args, vae, text_encoder, unet, scheduler, text_encoder_lr_scale)

    def train(self):
        """The Trainer calls model.train() every step; frozen parts stay in eval mode."""
        super().train()
        self.vae.eval()
        if not self.train_text_encoder:
            self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------ trainer hooks
    def param_groups(self):
        """Optimizer groups; paddle's per-group learning_rate is a multiplier of the scheduler's value."""
        groups = [{"params": [p for p in self.unet.parameters() if not p.stop_gradient], "learning_rate": 1.0}]
        if self.train_text_encoder:
            groups.append({"params": [p for p in self.text_encoder.parameters() if not p.stop_gradient],
                           "learning_rate": self.text_encoder_lr_scale})
        return groups

    def save_trained(self, output_dir: str, only_updated: bool, tokenizer=None) -> None:
        """What a checkpoint holds of the model, in the layout from_pretrained loads: unet/, scheduler/ (the
        training schedule, prediction type included: samplers built from it match the training) and text_encoder/
        when trained; with only_updated False, a whole pipeline folder instead. With --use_ema the EMA weights are
        also saved the reference's way, as unet/'s variant "ema" (from_pretrained(unet, variant="ema")), and as
        unet_ema/ (eval --use_ema, export)."""
        unet_dir = os.path.join(output_dir, "unet")
        if only_updated:
            self.unet.save_pretrained(unet_dir)
            self.noise_scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
            if self.train_text_encoder:
                self.text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder"), safe_serialization=True)
        else:  # loadable by StableDiffusionPipeline.from_pretrained(output_dir)
            from sd.eval import sampling

            sampling.make_pipeline(self.vae, self.text_encoder, tokenizer, self.unet,
                                   self.noise_scheduler).save_pretrained(output_dir)
        if self.model_ema is not None:
            with self.ema_scope():
                self.unet.save_pretrained(unet_dir, variant=EMA_VARIANT)
                self.unet.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def save_resume_state(self, checkpoint: str) -> None:
        if self.model_ema is not None:  # fp32 shadow weights + warm-up counter, for an exact resume
            ckpt.save_tensors(os.path.join(checkpoint, ckpt.EMA_FILE), self.model_ema.state_dict(),
                              {"format": "sd_ema_state", "num_updates": self.model_ema.num_updates})

    def load_trained(self, checkpoint: str, trust_pickled: bool = False) -> None:
        """Weights and EMA of a checkpoint of this recipe, into the already-built model. Safetensors only, unless
        trust_pickled (--trust_pickled_checkpoint) allows the pickled files of older checkpoints."""
        unet_dir = os.path.join(checkpoint, "unet")
        if not os.path.isdir(unet_dir):
            raise FileNotFoundError(f"{checkpoint}: no unet/ folder (not a checkpoint of this recipe?)")
        ckpt.refuse_pickled_weights(unet_dir, "the checkpoint's UNet", trust_pickled)
        self.unet.set_state_dict(UNet2DConditionModel.from_pretrained(unet_dir).state_dict())
        if self.train_text_encoder:
            te_dir = os.path.join(checkpoint, "text_encoder")
            if not os.path.isdir(te_dir):
                raise FileNotFoundError(f"{checkpoint}: --train_text_encoder is on but it has no text_encoder/")
            ckpt.refuse_pickled_weights(te_dir, "the checkpoint's text encoder", trust_pickled)
            self.text_encoder.set_state_dict(CLIPTextModel.from_pretrained(te_dir).state_dict())
        if self.model_ema is not None:
            self._load_ema(checkpoint, trust_pickled)

    def _load_ema(self, checkpoint: str, trust_pickled: bool) -> None:
        ema_file, legacy = os.path.join(checkpoint, ckpt.EMA_FILE), os.path.join(checkpoint, "ema_state.pdparams")
        if os.path.isfile(ema_file):
            buffers, meta = ckpt.load_tensors(ema_file)
            if meta.get("format") != "sd_ema_state" or set(buffers) != set(self.model_ema.state_dict()):
                raise ckpt.CheckpointError(f"{ema_file} is not the EMA state of this model")
            num_updates = meta.get("num_updates")
        elif os.path.isfile(legacy) and trust_pickled:  # an older checkpoint's pickled EMA, trusted by the user
            logger.warning("%s: loading the pickled %s (trusted)", ckpt.TRUST_FLAG, legacy)
            saved = paddle.load(legacy)
            buffers, num_updates = saved["buffers"], saved["num_updates"]
        elif os.path.isfile(legacy):
            raise ckpt.CheckpointError(f"{legacy} is a pickled file: loading it can run code; pass "
                                       f"{ckpt.TRUST_FLAG} if you made it")
        else:
            raise FileNotFoundError(f"{checkpoint}: --use_ema is on but it has no {ckpt.EMA_FILE}")
        self.model_ema.set_state_dict(buffers)
        self.model_ema.num_updates = int(num_updates)

    def on_train_batch_end(self) -> None:
        if self.model_ema is not None:
            self.model_ema(self.unet)

    # ------------------------------------------------------------------------------------------ features
    def enable_recompute(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if self.train_text_encoder and hasattr(self.text_encoder, "gradient_checkpointing_enable"):
            self.text_encoder.gradient_checkpointing_enable()

    def enable_fused_linear(self) -> int:
        """Run the UNet's linear layers (nn.Linear and ppdiffusers' LoRACompatibleLinear subclass) through
        paddle.incubate's fused_linear (matmul + bias in one CUDA kernel). The layers and their parameters stay as
        they are, only their class gains the fused forward; the reference monkeypatched paddle.nn.Linear at import
        instead. Needs CUDA (sd/device.py switches the flag off elsewhere). Returns the number of layers."""
        fused_classes = {}
        count = 0
        for _, layer in self.unet.named_sublayers():
            if isinstance(layer, nn.Linear) and not isinstance(layer, FusedLinearForward):
                cls = type(layer)
                if cls not in fused_classes:
                    fused_classes[cls] = type(f"Fused{cls.__name__}", (FusedLinearForward, cls), {})
                layer.__class__ = fused_classes[cls]
                count += 1
        logger.info("fused linear: %d linear layers of the UNet run through fused_linear", count)
        return count

    def compile_unet(self) -> None:
        """--to_static: the UNet, where the compute is, runs as a static graph (compiled at its first call). The
        wrapper stays dynamic: its per-sample keyed draws are host-side numpy, which graph capture cannot trace."""
        self.unet = paddle.jit.to_static(self.unet)
        logger.info("to_static: the UNet runs as a static graph (compiled at the first step)")

    def enable_memory_efficient_attention(self) -> None:
        self.unet.enable_xformers_memory_efficient_attention()
        self.vae.enable_xformers_memory_efficient_attention()

    # ------------------------------------------------------------------------------------------ training
    def encode_text(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        if self.train_text_encoder:
            return self.text_encoder(input_ids)[0]
        with paddle.no_grad():
            return self.text_encoder(input_ids)[0]

    def forward(self, input_ids: Optional[paddle.Tensor] = None, pixel_values: Optional[paddle.Tensor] = None,
                sample_keys=None, latent_mean: Optional[paddle.Tensor] = None,
                latent_std: Optional[paddle.Tensor] = None, encoder_hidden_states: Optional[paddle.Tensor] = None,
                **kwargs) -> paddle.Tensor:
        """The training loss. `sample_keys` ([B] ints, from the Trainer) key each sample's random draws, so a
        sample's noise, timestep and VAE draw depend only on (seed, micro-step, global sample index): the same on
        1 card with batch 2B as on 2 cards with batch B, and the same after a resume.

        From a latent dataset the batch holds the cached posterior (latent_mean, latent_std, unscaled) instead of
        pixel_values, and encoder_hidden_states instead of input_ids when the text embeddings are cached: the VAE
        (and the text encoder) are skipped, and the posterior is sampled with the same keyed draw."""
        args = self.model_args
        if latent_mean is None:
            with paddle.no_grad():
                posterior = self.vae.encode(pixel_values).latent_dist
            latent_mean, latent_std = posterior.mean, posterior.std
        shape = latent_mean.shape
        d = losses.sample_draws(sample_keys, shape, self.noise_scheduler.config.num_train_timesteps)
        with paddle.no_grad():
            latents = (latent_mean + latent_std * d["vae"].astype(latent_mean.dtype)) * self.scaling_factor
        noise = losses.offset_noise(d["noise"], args.noise_offset, d["offset"]).astype(latents.dtype)
        input_noise = losses.perturb_noise(noise, args.input_perturbation, d["perturb"].astype(latents.dtype))
        timesteps = d["timesteps"]
        noisy_latents = self.noise_scheduler.add_noise(latents, input_noise, timesteps)
        target = losses.diffusion_target(self.prediction_type, latents, noise, timesteps, self.noise_scheduler)
        if encoder_hidden_states is None:
            encoder_hidden_states = self.encode_text(input_ids)
        pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        weights = None
        if args.snr_gamma is not None:
            snr = losses.snr_of(self.noise_scheduler, timesteps)
            weights = (losses.capped_x0_weights(snr, args.snr_gamma) if args.snr_weighting == "capped_x0"
                       else losses.min_snr_weights(snr, args.snr_gamma, self.prediction_type))
        return losses.diffusion_loss(pred, target, weights)

    @contextlib.contextmanager
    def ema_scope(self):
        """Swap the EMA weights into the UNet for sampling/saving and put the training weights back after."""
        if self.model_ema is None:
            yield
            return
        params = list(self.unet.parameters())
        self.model_ema.store(params)
        self.model_ema.copy_to(self.unet)
        try:
            yield
        finally:
            self.model_ema.restore(params)


def save_pipeline_folder(model: LatentDiffusionModel, components, output_dir: str) -> None:
    """The end of a run, after the Trainer saved the trained parts (save_trained): output_dir becomes a folder
    StableDiffusionPipeline.from_pretrained(output_dir) loads, with the training schedule in scheduler/. The parts
    training left unchanged (VAE, tokenizer, the text encoder unless trained) are copied byte for byte from where
    they were loaded (sd/components.Components), so eval's sd/components.py rule recognises the text encoder as
    the root's own (same sha256), and model_index.json names the classes. A run with a --model_max_length other
    than its tokenizer's writes that length into the copy's tokenizer_config.json, so the folder samples with
    the length it trained with."""
    untouched = {"vae": components.vae, "tokenizer": components.tokenizer}
    if not model.train_text_encoder:
        untouched["text_encoder"] = components.text_encoder
    for name, source in untouched.items():
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and os.path.samefile(source, target):  # output_dir is the root itself
            continue
        if os.path.isdir(target):  # a previous finish of this run (resumed), or a whole-pipeline save
            shutil.rmtree(target)
        shutil.copytree(source, target)
    length = model.model_args.model_max_length
    if length != tokenizer_max_length(components.tokenizer):  # trained with another length: sample with it too
        set_tokenizer_max_length(os.path.join(output_dir, "tokenizer"), length)
    write_json_atomic(os.path.join(output_dir, "model_index.json"), MODEL_INDEX)
    logger.info("pipeline folder: %s (StableDiffusionPipeline.from_pretrained loads it)", output_dir)
