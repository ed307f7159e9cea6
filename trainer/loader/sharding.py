"""Who reads what: the pure assignment of parts and lines to global workers.

Kept free of I/O so that "every record exactly once per epoch across ranks x workers" is a unit test over
integers, not a training run. The reference handed each worker whole parts and hung when there were fewer
parts than workers; here a source with fewer parts than global workers is split by line instead, so every
worker always has something to read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

# Domain tags keep the counter-based RNG streams of different purposes independent even when their other
# key components happen to coincide.
TAG_PART_ORDER = 1
TAG_SOURCE_CHOICE = 2
TAG_BUFFER_PICK = 3

BY_PART = "part"
BY_LINE = "line"


@dataclass(frozen=True)
class WorkerLayout:
    """The world of data readers: `world_size` ranks, each with max(1, num_workers) logical workers."""

    rank: int
    world_size: int
    num_workers: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @property
    def workers_per_rank(self) -> int:
        # num_workers=0 means the main process reads: still one logical worker.
        return max(1, self.num_workers)

    @property
    def global_workers(self) -> int:
        return self.world_size * self.workers_per_rank

    def global_id(self, logical_worker: int) -> int:
        if not 0 <= logical_worker < self.workers_per_rank:
            raise ValueError(f"logical worker must be in [0, {self.workers_per_rank}), got {logical_worker}")
        return self.rank * self.workers_per_rank + logical_worker


def sharding_mode(num_parts: int, global_workers: int) -> str:
    """By part when every global worker can own at least one part, else by line."""
    return BY_PART if num_parts >= global_workers else BY_LINE


def epoch_part_order(num_parts: int, seed: int, source: int, epoch: int) -> List[int]:
    """The permutation of a source's part indices used in `epoch`; the same on every worker, so the
    workers' slices of it partition the parts."""
    rng = np.random.default_rng([seed, TAG_PART_ORDER, source, epoch])
    return [int(i) for i in rng.permutation(num_parts)]


def worker_parts(num_parts: int, seed: int, source: int, epoch: int, global_worker: int,
                 global_workers: int) -> List[int]:
    """Part indices (into the source's part list) that `global_worker` reads in `epoch`, in reading order.

    By part: the worker's stride of the epoch's shuffled order. By line: every part, and `keeps_line`
    filters lines."""
    order = epoch_part_order(num_parts, seed, source, epoch)
    if sharding_mode(num_parts, global_workers) == BY_PART:
        return order[global_worker::global_workers]
    return order


def keeps_line(mode: str, line_no: int, position: int, epoch: int, global_worker: int,
               global_workers: int) -> bool:
    """Whether a worker keeps line `line_no` of the part at `position` of its epoch order.

    In line mode every worker reads the same parts in the same order, and for a fixed (position, epoch) the
    map line -> (line + position + epoch) % G hands each line to exactly one worker. The position and epoch
    shifts stop a part shorter than G lines from always feeding the same few workers: a worker that got
    nothing this epoch gets lines in a later one."""
    if mode == BY_PART:
        return True
    return (line_no + position + epoch) % global_workers == global_worker


def assignment_table(num_parts: int, lines_per_part: List[int], seed: int, source: int, epoch: int,
                     global_workers: int) -> List[List[Tuple[int, int]]]:
    """For tests and `describe`: per global worker, the (part index, line) pairs it reads in `epoch`."""
    if len(lines_per_part) != num_parts:
        raise ValueError(f"lines_per_part has {len(lines_per_part)} entries for {num_parts} parts")
    mode = sharding_mode(num_parts, global_workers)
    table: List[List[Tuple[int, int]]] = []
    for g in range(global_workers):
        got = []
        for position, part in enumerate(worker_parts(num_parts, seed, source, epoch, g, global_workers)):
            got.extend((part, ln) for ln in range(lines_per_part[part])
                       if keeps_line(mode, ln, position, epoch, g, global_workers))
        table.append(got)
    return table


def choose_source(cumulative_weights: np.ndarray, seed: int, global_worker: int, counter: int) -> int:
    """Index of the source feeding the `counter`-th insertion of a worker, proportional to the weights.
    Counter-based, so a resumed worker needs only the counter, no RNG state."""
    if len(cumulative_weights) == 1:
        return 0
    u = np.random.default_rng([seed, TAG_SOURCE_CHOICE, global_worker, counter]).random()
    return int(np.searchsorted(cumulative_weights, u * cumulative_weights[-1], side="right"))


def buffer_pick(size: int, seed: int, global_worker: int, counter: int) -> int:
    """Index of the shuffle-buffer slot emitted at a worker's `counter`-th emission."""
    return int(np.random.default_rng([seed, TAG_BUFFER_PICK, global_worker, counter]).integers(size))
