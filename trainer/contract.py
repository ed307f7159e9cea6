"""What the Trainer needs from a model, and which of paddlenlp's private Trainer methods the recipe overrides.

Two models train through trainer/streaming_trainer.StreamingTrainer: the UNet wrapper (sd/model.py) and the VAE
stage (sd/vae_model.py). `TrainableModel` is the whole of what the Trainer asks of them, checked when the Trainer
is built. The Trainer subclass also overrides a few of paddlenlp's *private* methods (saving, checkpoint rotation,
resume, and the loading of optimizer, scheduler and RNG state, which paddlenlp unpickles); those were written against one paddlenlp version, so `check_paddlenlp_private_api` refuses, at start and
in one line, a paddlenlp whose version or method signatures differ, instead of failing mid-run at the first save.
"""
from __future__ import annotations

import inspect
from typing import Any, ContextManager, Dict, List, Protocol, Tuple, runtime_checkable

# The private Trainer methods StreamingTrainer overrides or calls, with the parameters it relies on.
PADDLENLP_PRIVATE_API: Dict[str, Tuple[str, ...]] = {
    "_save": ("self", "output_dir", "state_dict", "merge_tensor_parallel"),
    "_save_checkpoint": ("self", "model", "metrics"),
    "_rotate_checkpoints": ("self", "use_mtime", "output_dir"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_load_rng_state": ("self", "checkpoint"),
    "_get_learning_rate": ("self",),
}
PADDLENLP_WRITTEN_AGAINST = (2, 8)  # major, minor


@runtime_checkable
class TrainableModel(Protocol):
    """The model side of the model-to-trainer contract."""

    uses_sample_keys: bool  # forward() takes per-sample keys (seed, micro-step, global index) for its draws
    train_text_encoder: bool

    def param_groups(self) -> List[Dict[str, Any]]:
        """Optimizer groups; each group's learning_rate is a multiplier of the scheduler's value."""

    def save_trained(self, output_dir: str, only_updated: bool, tokenizer: Any = None) -> None:
        """The trained weights, in the layout ppdiffusers' from_pretrained loads."""

    def save_resume_state(self, checkpoint: str) -> None:
        """Whatever else an exact resume needs (EMA shadow weights), beside the Trainer's own state; safetensors
        or JSON only (trainer/checkpoint.py refuses a checkpoint holding pickles)."""

    def load_trained(self, checkpoint: str, trust_pickled: bool = False) -> None:
        """Weights (and resume state) of a verified checkpoint of this recipe, into the already-built model;
        pickled files are refused unless `trust_pickled` (--trust_pickled_checkpoint)."""

    def on_train_batch_end(self) -> None:
        """After every optimizer step (the EMA update)."""

    def ema_scope(self) -> ContextManager[None]:
        """EMA weights swapped in for sampling or saving, training weights back after (a no-op without EMA)."""


def check_model(model: Any) -> None:
    if not isinstance(model, TrainableModel):
        missing = [name for name in ("uses_sample_keys", "train_text_encoder", "param_groups", "save_trained",
                                     "save_resume_state", "load_trained", "on_train_batch_end", "ema_scope")
                   if not hasattr(model, name)]
        raise TypeError(f"{type(model).__name__} is not a TrainableModel (trainer/contract.py): missing {missing}")


def check_paddlenlp_private_api(trainer_cls: type, version: str) -> None:
    """Refuse a paddlenlp whose private Trainer API is not the one the overrides were written against."""
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if major_minor != PADDLENLP_WRITTEN_AGAINST:
        raise RuntimeError(
            f"paddlenlp {version}: the recipe's Trainer overrides paddlenlp's private methods "
            f"{sorted(PADDLENLP_PRIVATE_API)} as written for paddlenlp "
            f"{'.'.join(map(str, PADDLENLP_WRITTEN_AGAINST))}.x; install the version pinned in requirements.txt")
    for name, expected in PADDLENLP_PRIVATE_API.items():
        method = getattr(trainer_cls, name, None)
        got = tuple(inspect.signature(method).parameters) if method is not None else None
        if got is None or got[:len(expected)] != expected:
            raise RuntimeError(f"paddlenlp {version}: Trainer.{name}{got or ' (missing)'} differs from the "
                               f"{expected} the recipe's override was written against")
