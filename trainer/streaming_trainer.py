"""paddlenlp Trainer subclass for pretraining on the streaming loader (the UNet, and the VAE stage).

What it adds to the Trainer, and nothing more:
- the streaming loader and its exact position, saved per rank in every checkpoint and restored on resume;
- checkpoints through the model wrapper's save_trained/save_resume_state/load_trained hooks (for the UNet: the
  layout StableDiffusionPipeline.from_pretrained loads, unet/, unet_ema/, text_encoder/, plus the EMA state);
- an AdamW that skips a step whose gradients are not finite, counts it, and stops after N in a row;
- per-component learning rates (the wrapper's param_groups) and the loader's skip counters in the training log.

The model side is the TrainableModel protocol (trainer/contract.py), checked at construction, as is the paddlenlp
version the overrides of its private methods (the marked section below) were written against.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

import paddle
import paddlenlp
from paddlenlp.trainer import Trainer

from data_tools.fileio import write_json_atomic
from trainer.contract import check_model, check_paddlenlp_private_api
from trainer.loader.text_image_dataset import LoaderStateTracker, build_dataloader

logger = logging.getLogger("sd")

COMPLETE_MARKER = ".complete"


def loader_state_file(checkpoint: str, rank: int) -> str:
    return os.path.join(checkpoint, f"loader_state_rank{rank}.json")


class GuardedAdamW(paddle.optimizer.AdamW):
    """AdamW that does not apply a step whose gradients hold a NaN or Inf (from a non-finite loss or an
    overflow). One fused reduction per step decides; under data parallelism gradients are already all-reduced,
    so every rank takes the same decision."""

    def __init__(self, *args, max_nonfinite_steps: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_skipped = 0
        self.nonfinite_in_a_row = 0

    def _grads(self):
        for group in self._param_groups:
            params = group["params"] if isinstance(group, dict) else [group]
            for p in params:
                if p.grad is not None:
                    yield p.grad

    @paddle.no_grad()
    def step(self):
        sq = [g.astype("float32").square().sum() for g in self._grads()]
        if sq and not bool(paddle.isfinite(paddle.add_n(sq)).item()):
            self.nonfinite_skipped += 1
            self.nonfinite_in_a_row += 1
            logger.warning("non-finite loss or gradient: step skipped (%d in a row, %d in all)",
                           self.nonfinite_in_a_row, self.nonfinite_skipped)
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient: stopping. "
                    "Lower the learning rate, enable --max_grad_norm, or check the data.")
            return
        self.nonfinite_in_a_row = 0
        super().step()


class StreamingTrainer(Trainer):
    def __init__(self, *args, run_config=None, **kwargs):
        """`run_config`: the stage's resolved config (a frozen dataclass with .save(folder)), written into
        output_dir at start and into every checkpoint, so each checkpoint says exactly how it was trained."""
        check_paddlenlp_private_api(Trainer, paddlenlp.__version__)
        super().__init__(*args, **kwargs)
        check_model(self.model)
        self.run_config = run_config
        self.loader_tracker: Optional[LoaderStateTracker] = None
        self._rng_checkpoint: Optional[str] = None
        self._micro_step = 0

    # ------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self):
        # The dataset shards itself by rank x worker and batches itself; the Trainer's IterableDatasetShard
        # (every rank reading everything) must not wrap it.
        loader = build_dataloader(self.train_dataset)
        self.loader_tracker = LoaderStateTracker(self.train_dataset)
        return loader

    def training_step(self, model, inputs):
        if self._rng_checkpoint is not None:
            # The Trainer only restores RNG when it skips data by iterating; our loader resumes by position, so
            # restore here, right before the first step, exactly where the straight run stood.
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        inputs = self.loader_tracker.consume(inputs)
        if self.model.uses_sample_keys:
            inputs["sample_keys"] = self.sample_keys(int(inputs["pixel_values"].shape[0]))
        self._micro_step += 1
        return super().training_step(model, inputs)

    def sample_keys(self, batch_size: int):
        """(seed, micro-step, global sample index) per sample: rank r's sample i is global index r*B + i, so 2
        ranks x B and 1 rank x 2B draw the same randomness for the same global batch."""
        first = self.args.dataset_rank * batch_size
        return [(self.args.seed, self._micro_step, first + i) for i in range(batch_size)]

    # ------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, lr_scheduler=None):
        if self.optimizer is not None:
            return self.optimizer
        decay = {p.name for n, p in self.model.named_parameters() if not any(k in n for k in ("bias", "norm"))}
        self.optimizer = GuardedAdamW(
            learning_rate=self.lr_scheduler if lr_scheduler is None else lr_scheduler,
            parameters=self.model.param_groups(),
            beta1=self.args.adam_beta1, beta2=self.args.adam_beta2, epsilon=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay,
            apply_decay_param_fun=lambda name: name in decay,
            grad_clip=paddle.nn.ClipGradByGlobalNorm(self.args.max_grad_norm) if self.args.max_grad_norm > 0 else None,
            multi_precision=self.args.fp16_opt_level == "O2" and (self.args.fp16 or self.args.bf16),
            max_nonfinite_steps=self.args.max_nonfinite_steps,
        )
        return self.optimizer

    # ------------------------------------------------------------------------------------------ logging
    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs:  # training logs only
            if self.loader_tracker is not None:
                for reason, n in sorted(self.loader_tracker.skip_counts().items()):
                    logs[f"data_skipped_{reason}"] = n
            if isinstance(self.optimizer, GuardedAdamW):
                logs["nonfinite_skipped"] = self.optimizer.nonfinite_skipped
            if self.model.train_text_encoder and self.lr_scheduler is not None:
                logs["text_encoder_learning_rate"] = self._get_learning_rate() * self.model.text_encoder_lr_scale
        super().log(logs, **kwargs)

    def save_run_config(self, folder: str) -> None:
        if self.run_config is not None and self.args.should_save:
            self.run_config.save(folder)

    # ------------------------------------------------------------------------------------------
    # paddlenlp private API. Everything below overrides (or calls) a private Trainer method; their names and
    # signatures are checked at construction (trainer/contract.py PADDLENLP_PRIVATE_API).
    # ------------------------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None, merge_tensor_parallel=False):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_trained(output_dir, self.args.only_save_updated_model, getattr(self, "sd_tokenizer", None))
        paddle.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, metrics=None):
        checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        os.makedirs(checkpoint, exist_ok=True)
        # Every rank writes its own loader position (shared storage: see README, multi-node).
        write_json_atomic(loader_state_file(checkpoint, self.args.dataset_rank), self.loader_tracker.state_dict())
        if self.args.should_save:
            self.model.save_resume_state(checkpoint)
        self.save_run_config(checkpoint)
        super()._save_checkpoint(model, metrics)
        if self.args.should_save:  # written last: a checkpoint without it was interrupted mid-save
            open(os.path.join(checkpoint, COMPLETE_MARKER), "w").close()
            self._rotate_complete_checkpoints()

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        """The Trainer rotates by directory mtime (fragile on network filesystems) before our checkpoint is
        marked complete; we rotate in _rotate_complete_checkpoints instead."""

    def _rotate_complete_checkpoints(self) -> None:
        """Keep the newest --save_total_limit complete checkpoints (by step); delete everything older, including
        interrupted saves. Only the world's rank 0 deletes: output_dir is shared storage."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        done = complete_checkpoints(self.args.output_dir)
        if len(done) <= limit:
            return
        oldest_kept = done[-limit][0]
        for step, path in checkpoint_dirs(self.args.output_dir):
            if step < oldest_kept:
                logger.info("deleting %s (--save_total_limit %d)", path, limit)
                shutil.rmtree(path)

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        if not resume_from_checkpoint:
            return
        self.model.load_trained(resume_from_checkpoint)
        state_file = loader_state_file(resume_from_checkpoint, self.args.dataset_rank)
        if os.path.isfile(state_file):
            with open(state_file, encoding="utf-8") as f:
                self.train_dataset.load_state_dict(json.load(f))
        else:
            logger.warning("%s is missing: the data stream restarts from its beginning (resume is not exact)",
                           state_file)
        self._rng_checkpoint = resume_from_checkpoint
        with open(os.path.join(resume_from_checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            self._micro_step = json.load(f)["global_step"] * self.args.gradient_accumulation_steps
        logger.info("resumed weights and loader position from %s", resume_from_checkpoint)


def checkpoint_dirs(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of every checkpoint-N folder, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isdir(path):
            found.append((int(name[11:]), path))
    return sorted(found)


def complete_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    return [(n, p) for n, p in checkpoint_dirs(output_dir) if os.path.isfile(os.path.join(p, COMPLETE_MARKER))]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint-N whose save finished (has the marker); half-written ones are skipped loudly."""
    done = complete_checkpoints(output_dir)
    for n, path in checkpoint_dirs(output_dir):
        if (n, path) not in done:
            logger.warning("%s was not saved completely: ignored for resume", path)
    return done[-1][1] if done else None
