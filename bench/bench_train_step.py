"""Seconds per step of the recipe (train.py's Trainer, streaming loader and callbacks) against a bare loop over
the same tiny model, batch and pre-loaded data, in the same run. Target: overhead at most 5% once warm.

    .venv/bin/python bench/bench_train_step.py [--steps 60] [--warmup 10] [--batch_size 16] [--workers 0]

Both sides build the model from sd/tiny_init with the same seed and run the same forward (LatentDiffusionModel
with per-sample keyed draws) and AdamW. The bare loop feeds batches collected from the loader beforehand; the
recipe reads them through the loader during the run (with --workers 0 its decoding is on the training thread, so
the difference is the whole cost of the recipe on this machine).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from timed_training import timed_recipe_run, train_argv


def recipe_times(file_list, out_dir, opts):
    from sd.paths import TINY_INIT_DIR

    timer, trainer = timed_recipe_run(train_argv(TINY_INIT_DIR, file_list, out_dir, 32, opts.batch_size, opts.steps,
                                                 opts.workers))
    return timer.times, trainer


def bare_times(trainer, opts):
    """The same model, optimizer and per-sample draws in a plain loop over batches collected beforehand."""
    import paddle
    from itertools import islice

    from paddlenlp.trainer import set_seed
    from sd.args import ModelArguments
    from sd.components import resolve_components
    from sd.model import LatentDiffusionModel
    from sd.paths import TINY_INIT_DIR

    set_seed(23)
    model = LatentDiffusionModel.from_components(ModelArguments(), resolve_components("train", TINY_INIT_DIR))
    model.train()
    batches = [{k: paddle.to_tensor(v) for k, v in b.items() if k != "loader_state"}
               for b in islice(iter(trainer.train_dataset), opts.steps)]
    opt = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.param_groups()[0]["params"],
                                 weight_decay=0.0)
    times, last = [], None
    for step, batch in enumerate(batches):
        keys = [(23, step, i) for i in range(opts.batch_size)]
        loss = model(**batch, sample_keys=keys)
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)  # the Trainer syncs on the loss for logging too
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    opts = p.parse_args()
    print("command: .venv/bin/python bench/bench_train_step.py " + " ".join(sys.argv[1:]), flush=True)
    from sd.tiny.make_demo_data import make_demo_parts as make_parts

    with tempfile.TemporaryDirectory() as tmp:
        file_list = make_parts(os.path.join(tmp, "data"), 256, image_size=64, per_part=64)
        recipe, trainer = recipe_times(file_list, os.path.join(tmp, "run"), opts)
        bare = bare_times(trainer, opts)
    r = statistics.median(recipe[opts.warmup:])
    b = statistics.median(bare[opts.warmup:])
    print(f"\n{'':28}{'median s/step':>14}{'mean s/step':>13}")
    print(f"{'recipe (Trainer+loader)':28}{r:>14.4f}{statistics.mean(recipe[opts.warmup:]):>13.4f}")
    print(f"{'bare loop (pre-loaded)':28}{b:>14.4f}{statistics.mean(bare[opts.warmup:]):>13.4f}")
    print(f"overhead of the recipe once warm: {100 * (r / b - 1):+.1f}% (target <= 5%), "
          f"batch {opts.batch_size}, 32 px, {opts.steps} steps, first {opts.warmup} excluded, "
          f"workers {opts.workers}")


if __name__ == "__main__":
    main()
