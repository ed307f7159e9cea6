"""paddlenlp Trainer subclass for pretraining on the streaming loader (the UNet, and the VAE stage).

What it adds to the Trainer, and nothing more:
- the streaming loader and its exact position, saved per rank in every checkpoint and restored on resume;
- checkpoints through the model wrapper's save_trained/save_resume_state/load_trained hooks (for the UNet: the
  layout StableDiffusionPipeline.from_pretrained loads, unet/, unet_ema/, text_encoder/, plus the EMA state),
  written whole and renamed when complete, verified file by file before a resume, with the optimizer, LR
  scheduler and RNG state as safetensors and JSON instead of the Trainer's pickles (trainer/checkpoint.py);
- an AdamW that skips a step whose gradients are not finite, counts it, and stops after N in a row;
- per-component learning rates (the wrapper's param_groups) and the loader's skip counters in the training log.

The model side is the TrainableModel protocol (trainer/contract.py), checked at construction, as is the paddlenlp
version the overrides of its private methods (the marked section below) were written against.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, Optional

import paddle
import paddlenlp
from paddlenlp.trainer import Trainer

from data_tools.fileio import write_json_atomic
from trainer import checkpoint as ckpt
from trainer.contract import check_model, check_paddlenlp_private_api
from trainer.loader.loader_state import load_state_file
from trainer.loader.text_image_dataset import LoaderStateTracker, build_dataloader

logger = logging.getLogger("sd")


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
            inputs["sample_keys"] = self.sample_keys(batch_size_of(inputs))
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
                # --aspect_ratio_buckets: samples trained per bucket, cumulative across resumes (this rank's)
                for name, n in sorted(self.loader_tracker.bucket_samples().items()):
                    logs[f"data_bucket_{name}"] = n
            if isinstance(self.optimizer, GuardedAdamW):
                logs["nonfinite_skipped"] = self.optimizer.nonfinite_skipped
            if self.model.train_text_encoder and self.lr_scheduler is not None:
                logs["text_encoder_learning_rate"] = self._get_learning_rate() * self.model.text_encoder_lr_scale
        super().log(logs, **kwargs)

    def save_run_config(self, folder: str) -> None:
        if self.run_config is not None and self.args.should_save:
            self.run_config.save(folder)

    def train(self, resume_from_checkpoint=None, ignore_keys_for_eval=None):
        """Before the first step, rank 0 removes the checkpoints of output_dir this run does not continue, when
        --overwrite_output_dir asks for it (trainer/entry.py resolve_checkpoint refuses the start otherwise): a
        later resume can then never pick up a checkpoint of another run."""
        if self.args.should_save and self.args.overwrite_output_dir:
            ckpt.remove_folders(ckpt.checkpoints_not_continued(self.args.output_dir, resume_from_checkpoint) +
                                ckpt.leftovers(self.args.output_dir), "--overwrite_output_dir: not continued by this run")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, ignore_keys_for_eval=ignore_keys_for_eval)

    # ------------------------------------------------------------------------------------------
    # paddlenlp private API. Everything below overrides (or calls) a private Trainer method; their names and
    # signatures are checked at construction (trainer/contract.py PADDLENLP_PRIVATE_API). The Trainer's own
    # versions write and read optimizer, scheduler and RNG state with paddle.save/paddle.load (pickle); these
    # write and read them as safetensors and JSON (trainer/checkpoint.py).
    # ------------------------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None, merge_tensor_parallel=False):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_trained(output_dir, self.args.only_save_updated_model, getattr(self, "sd_tokenizer", None))
        paddle.save(self.args, os.path.join(output_dir, "training_args.bin"))  # the Trainer's record; never read

    def _save_checkpoint(self, model, metrics=None):
        """checkpoint-N, written whole into checkpoint-N.tmp-PID by rank 0 and renamed when complete. Every
        rank's loader position and RNG state reach rank 0 through one gather: one writer, and no wait for other
        nodes' files to show on shared storage."""
        step = self.state.global_step
        mine = {"dataset_rank": self.args.dataset_rank, "loader": self.loader_tracker.state_dict(),
                "rng": ckpt.rng_state_now()}
        everyone = [mine]
        if self.args.world_size > 1:
            everyone = []
            paddle.distributed.all_gather_object(everyone, mine)
        if not self.args.should_save:
            return
        final = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        tmp = ckpt.begin(final)
        try:
            self.model.save_trained(tmp, self.args.only_save_updated_model, getattr(self, "sd_tokenizer", None))
            self.model.save_resume_state(tmp)
            for entry in {e["dataset_rank"]: e for e in everyone}.values():
                write_json_atomic(loader_state_file(tmp, entry["dataset_rank"]), entry["loader"])
            write_json_atomic(os.path.join(tmp, ckpt.RNG_FILE), {"format": "sd_rng_state", "world_size": len(
                everyone), "ranks": [e["rng"] for e in everyone]})
            extra = {}
            if isinstance(self.optimizer, GuardedAdamW):
                extra = {"nonfinite_skipped": self.optimizer.nonfinite_skipped,
                         "nonfinite_in_a_row": self.optimizer.nonfinite_in_a_row}
            ckpt.optimizer_to_file(self.optimizer.state_dict(), os.path.join(tmp, ckpt.OPTIMIZER_FILE), extra)
            ckpt.write_state_json(os.path.join(tmp, ckpt.LR_SCHEDULER_FILE), self.lr_scheduler.state_dict(),
                                  "lr_scheduler")
            if self.do_grad_scaling:
                ckpt.write_state_json(os.path.join(tmp, ckpt.GRAD_SCALER_FILE), self.scaler.state_dict(),
                                      "grad_scaler")
            self.state.save_to_json(os.path.join(tmp, ckpt.TRAINER_STATE_FILE))
            self.save_run_config(tmp)
            ckpt.publish(tmp, final, step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind, even on Ctrl-C
            raise
        self._rotate_complete_checkpoints()

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        """The Trainer rotates by directory mtime (fragile on network filesystems); we rotate by step in
        _rotate_complete_checkpoints instead."""

    def _rotate_complete_checkpoints(self) -> None:
        """Keep the newest --save_total_limit complete checkpoints (by step); delete everything older, including
        interrupted saves, and the folders of killed saves. Only the world's rank 0 deletes: output_dir is shared
        storage."""
        ckpt.remove_folders([p for p in ckpt.leftovers(self.args.output_dir) if not p.endswith(f"-{os.getpid()}")],
                            "left by a killed save")
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        done = ckpt.complete_checkpoints(self.args.output_dir)
        if len(done) <= limit:
            return
        oldest_kept = done[-limit][0]
        ckpt.remove_folders([path for step, path in ckpt.checkpoint_dirs(self.args.output_dir) if step < oldest_kept],
                            f"--save_total_limit {limit}")

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        if not resume_from_checkpoint:
            return
        trust = ckpt.trusts_pickles(self.args)
        ckpt.verify_checkpoint(resume_from_checkpoint, trust)  # every file's sha256, before anything is read
        # The loader's position first: a resume it refuses (another file list, or another resolution or bucket set
        # without --allow_resolution_change) ends the run in one line before any weight is loaded.
        state_file = loader_state_file(resume_from_checkpoint, self.args.dataset_rank)
        if os.path.isfile(state_file):
            saved = load_state_file(state_file)
            try:
                self.train_dataset.load_state_dict(saved)
            except ValueError as e:
                raise ckpt.CheckpointError(f"{resume_from_checkpoint}: {e}") from None
        else:
            logger.warning("%s is missing: the data stream restarts from its beginning (resume is not exact)",
                           state_file)
        self.model.load_trained(resume_from_checkpoint, trust_pickled=trust)
        self._rng_checkpoint = resume_from_checkpoint
        state = ckpt.read_json(os.path.join(resume_from_checkpoint, ckpt.TRAINER_STATE_FILE))
        self._micro_step = int(state["global_step"]) * self.args.gradient_accumulation_steps
        logger.info("resumed weights and loader position from %s", resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.args.ignore_load_lr_and_optim:
            return
        path = os.path.join(checkpoint, ckpt.OPTIMIZER_FILE)
        if not os.path.isfile(path):  # a checkpoint of an older version (pickled state), trusted or refused
            self._legacy_pickled(checkpoint, "optimizer.pdopt", ckpt.OPTIMIZER_FILE)
            return super()._load_optimizer_and_scheduler(checkpoint)
        state, extra = ckpt.optimizer_from_file(path)
        self.optimizer.set_state_dict(state)
        if isinstance(self.optimizer, GuardedAdamW):
            self.optimizer.nonfinite_skipped = int(extra.get("nonfinite_skipped", 0))
            self.optimizer.nonfinite_in_a_row = int(extra.get("nonfinite_in_a_row", 0))
        self.lr_scheduler.set_state_dict(
            ckpt.read_state_json(os.path.join(checkpoint, ckpt.LR_SCHEDULER_FILE), "lr_scheduler"))
        scaler_file = os.path.join(checkpoint, ckpt.GRAD_SCALER_FILE)
        if self.do_grad_scaling and os.path.isfile(scaler_file):
            self.scaler.load_state_dict(ckpt.read_state_json(scaler_file, "grad_scaler"))

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ckpt.RNG_FILE)
        if not os.path.isfile(path):
            self._legacy_pickled(checkpoint, "rng_state.pth" if self.args.world_size == 1 else
                                 f"rng_state_{self.args.world_size}.pth", ckpt.RNG_FILE)
            return super()._load_rng_state(checkpoint)
        saved = ckpt.read_json(path)
        ranks = saved.get("ranks") if isinstance(saved, dict) else None
        if not isinstance(ranks, list) or saved.get("format") != "sd_rng_state":
            raise ckpt.CheckpointError(f"{path} is not an RNG state file of this recipe")
        if len(ranks) != self.args.world_size:
            logger.warning("%s holds the RNG state of %d ranks, this run has %d: RNG not restored (resume is not "
                           "exact)", path, len(ranks), self.args.world_size)
            return
        ckpt.set_rng_state(ranks[self.args.process_index], path)

    def _legacy_pickled(self, checkpoint: str, name: str, safe_name: str) -> None:
        """Older checkpoints hold the Trainer's pickled state: loaded only with the trust flag."""
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise ckpt.CheckpointError(f"{os.path.join(checkpoint, safe_name)} is missing")
        if not ckpt.trusts_pickles(self.args):
            raise ckpt.CheckpointError(
                f"{os.path.join(checkpoint, name)}: this checkpoint keeps its state pickled (an older version of "
                f"the recipe): loading a pickle can run code; pass {ckpt.TRUST_FLAG} if you made it")
        logger.warning("%s: loading the pickled %s of %s (trusted)", ckpt.TRUST_FLAG, name, checkpoint)


def batch_size_of(inputs) -> int:
    """The samples in a batch: of its images, or of its cached latents (a latent dataset)."""
    return int(inputs["pixel_values" if "pixel_values" in inputs else "latent_mean"].shape[0])
