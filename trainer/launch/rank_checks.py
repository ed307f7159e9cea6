"""The checks a training job can only make once it runs. The checks of one node before the launch (devices,
nodes, data shards, /dev/shm, output_dir) are trainer/launch/node_checks.py, which train.sh runs through
scripts/preflight.py.

train.py calls rank_preflight() in every rank once the parallel env is up: output_dir must be one shared folder
(rank 0 writes a token, every rank reads it back), every rank must see the same data and resolve the same
checkpoint. It then installs the worker reaper (trainer/launch/reaper.py) and starts a RankWatchdog
(trainer/launch/watchdog.py); the returned JobGuard's finish() marks the clean end.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from trainer.launch.node_checks import probe_output_dir, read_data_layout
from trainer.launch.reaper import install_worker_reaper
from trainer.launch.watchdog import TIMEOUT_ENV, JobGuard, RankWatchdog, host_label, timeout_from_env

logger = logging.getLogger("sd")

TOKEN_WAIT_S = 5.0  # some shared file systems show a new file to other clients with a delay


class PreflightError(RuntimeError):
    """The job cannot run as configured; the message says what to change."""


@dataclass
class RankReport:
    """What one rank found; gathered on every rank, so that all of them judge the same table."""

    rank: int
    host: str
    pid: int
    checkpoint: Optional[str]
    data: str = ""  # DataLayout.signature, or "error: ..." when this rank cannot read the data
    problems: List[str] = field(default_factory=list)


def judge_reports(reports: List[RankReport], output_dir: str) -> List[str]:
    """The job's problems, one line each; [] when every rank is fine and agrees with rank 0."""
    first, where = reports[0], {}
    for r in reports:  # one line per distinct problem: every rank of a node without the share says it
        for p in r.problems:
            where.setdefault(p, []).append(f"{r.rank}@{r.host}")
    problems = [f"{p} (rank {', '.join(ranks)})" for p, ranks in where.items()]
    for r in reports[1:]:
        if r.data != first.data:
            problems.append(f"rank {r.rank} on {r.host} sees other data than rank 0 on {first.host} ({r.data} vs "
                            f"{first.data}): every node needs the same --file_list, filelists and part paths.")
        if r.checkpoint != first.checkpoint:
            problems.append(f"rank {r.rank} on {r.host} would resume from {r.checkpoint} but rank 0 from "
                            f"{first.checkpoint}: output_dir {output_dir} is not the same shared folder on every "
                            "node.")
    return problems


def rank_preflight(args, data_args, checkpoint: Optional[str]) -> JobGuard:
    """Run in every rank right after resolve_checkpoint(). Raises PreflightError on every rank alike."""
    import paddle.distributed as dist

    install_worker_reaper()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:  # nothing to compare: a single process reports its own problems as they come
        return JobGuard(None)
    report = RankReport(rank, host_label(), os.getpid(), checkpoint)
    try:
        report.data = read_data_layout(data_args.file_list, world, args.dataloader_num_workers).signature
    except (OSError, ValueError) as e:  # into the gathered table, so that every rank stops together
        report.data = f"error: {e}"
        report.problems.append(f"cannot read the data: {e}")
    timeout = timeout_from_env()
    watchdog = RankWatchdog(rank, world, timeout)  # first: a rank missing below is then named, not waited for
    watchdog.start()
    _check_shared_output_dir(args.output_dir, rank, report, dist)
    reports: List[RankReport] = []
    dist.all_gather_object(reports, report)
    watchdog.hosts = [r.host for r in reports]
    problems = judge_reports(reports, args.output_dir)
    if problems:
        watchdog.stand_down()
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))
    if rank == 0:
        logger.info("preflight: %d ranks: %s; watchdog timeout %.0f s (%s)", world,
                    ", ".join(f"{r.rank}@{r.host} pid {r.pid}" for r in reports), timeout, TIMEOUT_ENV)
    return JobGuard(watchdog)


def _check_shared_output_dir(output_dir: str, rank: int, report: RankReport, dist) -> None:
    """Rank 0 writes a fresh token under output_dir, every rank reads it back. The first collective orders it
    after every rank's resolve_checkpoint (which lists output_dir)."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    name = f".shared-folder-check-{token[0]}"
    path = os.path.join(output_dir, name)
    status = [probe_output_dir(output_dir, name, token[0]) if rank == 0 else None]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:  # rank 0 cannot write there: its report says why
        report.problems += [status[0]] if rank == 0 else []
        return
    deadline = time.monotonic() + TOKEN_WAIT_S
    while time.monotonic() < deadline and not (os.path.isdir(output_dir) and name in os.listdir(output_dir)):
        time.sleep(0.5)  # listdir, not stat: it revalidates a network file system's cached directory
    seen = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            seen = f.read()
    if seen != token[0]:
        report.problems.append(
            f"output_dir {output_dir} is not the same shared folder on every node: this rank cannot read {name}, "
            f"written there by rank 0 just now ({'not found' if seen is None else 'other content'}). Put "
            "output_dir on storage every node mounts at the same path (NFS, CephFS, Lustre, ...) and use absolute "
            "paths; else checkpoints would silently lack the files of the ranks that cannot see it.")
    dist.barrier()  # every rank has looked before rank 0 removes the token
    if rank == 0:
        os.remove(path)
