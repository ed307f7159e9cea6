"""The ranks of an eval job started by `python -m paddle.distributed.launch ... eval.py ...`, and how they meet
without ever waiting for each other in a collective.

Why no barrier: ranks finish their share of images at different times (minutes apart on 30,000 prompts), and a
rank waiting in a gloo or NCCL collective meanwhile times out; that is the "NCCL timeout while one rank generates
validation images" users report. So the one collective is at the start (every rank arrives within seconds): it
shares the job's run id and host names. After it, each rank writes its share and its own index file (atomically,
marked complete with the run id), and rank 0 polls the folder for every rank's complete file before it merges.

What ends a job whose rank is gone: the launcher stops its own node's ranks when one dies; across nodes the rank
watchdog (trainer/launch/watchdog.py, heartbeats through the job's TCP store) ends every rank within
SD_RANK_TIMEOUT seconds, naming the rank, so rank 0 never polls forever. A rank calls `finish()` when its share is
written, which tells the watchdog it ended cleanly.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Tuple

from trainer.launch.watchdog import JobGuard, RankWatchdog, host_label, timeout_from_env

logger = logging.getLogger("sd.eval")

POLL_S = 1.0  # rank 0's look at the folder for the other ranks' index files; a merge waits at most this long


def launch_layout(environ: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """(rank, world size) as paddle.distributed.launch sets them; (0, 1) for a plain `python eval.py`."""
    env = os.environ if environ is None else environ
    try:
        rank, world = int(env.get("PADDLE_TRAINER_ID") or 0), int(env.get("PADDLE_TRAINERS_NUM") or 1)
    except ValueError:
        raise ValueError(f"PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM are not integers: "
                         f"{env.get('PADDLE_TRAINER_ID')!r} / {env.get('PADDLE_TRAINERS_NUM')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"launch environment: rank {rank} of {world} ranks is not a rank")
    return rank, world


def share(items, rank: int, world: int):
    """This rank's items: every world-th one from position `rank`. Disjoint over ranks, together all of them, a
    pure function of (items, rank, world), and balanced to within one item."""
    return items[rank::world]


@dataclass
class EvalJob:
    """One rank's place in the job; `run_id` is the same on every rank and new for every launch."""

    rank: int
    world: int
    run_id: str
    guard: JobGuard

    def finish(self) -> None:
        self.guard.finish()


def join_job(rank: int, world: int) -> EvalJob:
    """Start this rank's part of the job: a single process needs nothing; under a launch, the process group (and
    with it the job's TCP store), the watchdog, then one collective that gives every rank rank 0's run id and
    every rank's host (named in the watchdog's messages)."""
    if world == 1:
        return EvalJob(0, 1, uuid.uuid4().hex, JobGuard(None))
    import paddle.distributed as dist

    dist.init_parallel_env()
    watchdog = RankWatchdog(rank, world, timeout_from_env())
    watchdog.start()  # before the collective: a rank missing there is then named instead of waited for
    gathered = []
    dist.all_gather_object(gathered, (host_label(), uuid.uuid4().hex))
    watchdog.hosts = [host for host, _ in gathered]
    logger.info("eval job: rank %d of %d on %s; watchdog timeout %.0f s", rank, world, gathered[rank][0],
                watchdog.timeout)
    return EvalJob(rank, world, gathered[0][1], JobGuard(watchdog))


def wait_until(done: Callable[[], bool], what: str, poll_s: float = POLL_S,
               clock: Callable[[], float] = time.monotonic) -> float:
    """Poll `done` until it holds; returns the seconds waited. It is never given up on by time (a slow rank is
    legitimate): a rank that is gone ends the job through the watchdog. Logs once a minute what it waits for."""
    start = last_log = clock()
    while not done():
        if clock() - last_log >= 60:
            logger.info("still waiting for %s (%.0f s)", what, clock() - start)
            last_log = clock()
        time.sleep(poll_s)
    return clock() - start
