"""What the two training benchmarks share: a timed run of the recipe (train.py's Trainer) on the tiny preset's math.

bench_train_step.py compares it with a bare loop, bench_train_from_latents.py runs it from images and from latents;
both build the same run here so they time the same thing.
"""
from __future__ import annotations

import time

from paddlenlp.trainer import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall and CPU seconds (this process, all threads) of every optimizer step after the first."""

    def __init__(self):
        self.times, self.cpu, self._last = [], [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.times.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        self._last = now


def train_argv(init: str, file_list: str, out_dir: str, resolution: int, batch_size: int, steps: int,
               workers: int) -> list:
    """train.py flags of a benchmark run: no image logging, no checkpoint inside the run, no reporting."""
    return ["--do_train", "--pretrained_model_name_or_path", init, "--file_list", file_list, "--output_dir", out_dir,
            "--resolution", str(resolution), "--center_crop", "True", "--per_device_train_batch_size", str(batch_size),
            "--learning_rate", "1e-3", "--max_steps", str(steps), "--logging_steps", "10",
            "--image_logging_steps", "0", "--save_steps", str(10 * steps), "--dataloader_num_workers", str(workers),
            "--seed", "23", "--disable_tqdm", "True", "--report_to", "none"]


def timed_recipe_run(argv: list):
    """Train with train.py's Trainer on `argv`; returns (StepTimer, trainer)."""
    from paddlenlp.trainer import set_seed

    from sd.args import parse_train_args, resolve_train
    from sd.paths import import_entry

    train_entry = import_entry("train")
    run = resolve_train(*parse_train_args(argv))
    set_seed(run.training.seed)
    trainer = train_entry.build_trainer(run)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return timer, trainer
