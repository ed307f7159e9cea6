#!/usr/bin/env python
"""Checks run by train.sh on each node before `python -m paddle.distributed.launch`, so that a bad setup fails
once, here, with one clear message, instead of N times in N worker logs (or as a hang).

    python scripts/preflight.py [LAUNCH FLAGS] -- [TRAIN FLAGS]     exit 0: go, 1: a problem (printed), 2: usage

Checks: the devices (--gpus on a machine without CUDA GPUs, GPU ids that do not exist, processes per node), the
nodes (this node in --ips, --master IP:PORT, --nnodes/--rank), the train flags through train.py's own parser, data
parts against ranks x DataLoader workers ("sharding by line" when short), free /dev/shm against the DataLoader
workers, and output_dir writable. What needs the running job (output_dir shared by every node, the same data and
checkpoint on every rank, a rank that dies) is checked inside the job: trainer/preflight.py.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from trainer.preflight import (Finding, free_shm_bytes, output_dir_finding, shard_findings,  # noqa: E402
                               shm_bytes_needed, shm_finding)

# Set by paddle.distributed.launch inside a job. This script is not a rank: with them, parsing the training
# arguments would call init_parallel_env and wait for peers that never come.
DIST_ENV = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT",
            "PADDLE_RANK_IN_NODE", "PADDLE_GLOBAL_RANK", "PADDLE_GLOBAL_SIZE", "PADDLE_LOCAL_RANK",
            "PADDLE_LOCAL_SIZE", "PADDLE_MASTER", "PADDLE_NNODES")


@dataclass
class LaunchPlan:
    """The launch flags train.sh passes to paddle.distributed.launch."""

    gpus: Optional[List[str]] = None
    nproc_per_node: Optional[int] = None
    ips: Optional[List[str]] = None
    master: Optional[str] = None
    nnodes: Optional[str] = None
    rank: Optional[int] = None
    host: Optional[str] = None


def parse_launch(argv: List[str]) -> LaunchPlan:
    p = argparse.ArgumentParser(prog="preflight.py", add_help=False)
    p.add_argument("--gpus", "--devices", dest="gpus")
    p.add_argument("--nproc_per_node", type=int)
    for name in ("--ips", "--master", "--nnodes", "--host", "--log_dir", "--job_id", "--start_port"):
        p.add_argument(name)
    p.add_argument("--rank", type=int)
    a = p.parse_args(argv)
    split = (lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None)
    return LaunchPlan(split(a.gpus), a.nproc_per_node, split(a.ips), a.master, a.nnodes, a.rank, a.host)


def device_findings(plan: LaunchPlan, cuda_count: int, visible: Optional[List[str]],
                    cpu_count: int) -> Tuple[int, List[Finding]]:
    """(processes on this node, findings). `visible`: CUDA_VISIBLE_DEVICES entries (the labels --gpus names)."""
    out: List[Finding] = []
    labels = visible if visible is not None else [str(i) for i in range(cuda_count)]
    if plan.nproc_per_node is not None and plan.nproc_per_node < 1:
        return 1, [Finding("error", f"--nproc_per_node must be >= 1, got {plan.nproc_per_node}")]
    if plan.gpus is not None:
        if cuda_count == 0:
            return len(plan.gpus), [Finding("error", (
                f"--gpus {','.join(plan.gpus)}: paddle sees no CUDA GPU on this machine. On a CPU, start N "
                "processes with --nproc_per_node N (they talk through gloo)."))]
        missing = [g for g in plan.gpus if g not in labels]
        if missing or len(set(plan.gpus)) != len(plan.gpus):
            out.append(Finding("error", f"--gpus {','.join(plan.gpus)}: ids must be distinct visible GPUs "
                                        f"(visible: {','.join(labels)}; CUDA_VISIBLE_DEVICES renumbers them)"))
        if plan.nproc_per_node is not None and plan.nproc_per_node != len(plan.gpus):
            out.append(Finding("error", f"--nproc_per_node {plan.nproc_per_node} disagrees with --gpus "
                                        f"{','.join(plan.gpus)}: give one of them (one process per GPU)"))
        return len(plan.gpus), out + [Finding("ok", f"devices: {len(plan.gpus)} GPU processes (NCCL)")]
    if cuda_count > 0:
        n = plan.nproc_per_node or cuda_count  # paddle's default: every visible GPU
        if n > cuda_count:
            out.append(Finding("error", f"--nproc_per_node {n} but only {cuda_count} GPUs are visible"))
        return n, out + [Finding("ok", f"devices: {n} GPU processes (NCCL)")]
    n = plan.nproc_per_node or 1
    out.append(Finding("ok", f"devices: {n} CPU process(es); paddle's launcher makes them talk through gloo"))
    if n > 1 and "OMP_NUM_THREADS" not in os.environ:
        out.append(Finding("warning", f"each of the {n} CPU processes would use all {cpu_count} cores: export "
                                      f"OMP_NUM_THREADS={max(1, cpu_count // n)}"))
    if n > cpu_count:
        out.append(Finding("warning", f"{n} processes on {cpu_count} CPU cores: they will crawl"))
    return n, out


def node_findings(plan: LaunchPlan, node_ip: str) -> Tuple[int, List[Finding]]:
    """(number of nodes, findings) from --ips or --master/--nnodes/--rank."""
    out: List[Finding] = []
    nnodes = 1
    if plan.nnodes is not None:
        if not plan.nnodes.isdigit() or int(plan.nnodes) < 1:
            return 1, [Finding("error", f"--nnodes must be a number of nodes >= 1, got {plan.nnodes!r} (elastic "
                                        "ranges are not supported: the data sharding needs a fixed world size)")]
        nnodes = int(plan.nnodes)
    if plan.ips is not None:
        if plan.nnodes is not None and nnodes != len(plan.ips):
            out.append(Finding("error", f"--nnodes {nnodes} but --ips lists {len(plan.ips)} nodes"))
        nnodes = len(plan.ips)
        if len(plan.ips) > 1 and node_ip not in plan.ips:
            out.append(Finding("error", (
                f"this node's IP as paddle resolves it ({node_ip}) is not in --ips {','.join(plan.ips)}: paddle "
                "would make it node 0 as well. Pass --host <its address in the list>, or fix the list.")))
    if plan.master is not None:
        host, _, port = plan.master.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            out.append(Finding("error", f"--master must be IP:PORT, got {plan.master!r}"))
    if plan.rank is not None:
        if plan.master is None:
            out.append(Finding("error", "--rank needs --master IP:PORT (with --ips the order of the list decides)"))
        elif not 0 <= plan.rank < nnodes:
            out.append(Finding("error", f"--rank {plan.rank} is not in [0, --nnodes {nnodes})"))
    if nnodes > 1 and plan.master is None and plan.ips is None:
        out.append(Finding("warning", f"--nnodes {nnodes} without --master: paddle starts a master on this node "
                                      "and prints the command to run on the others"))
    if nnodes > 1:
        out.append(Finding("ok", f"nodes: {nnodes} (this one: {node_ip}); run the same command on every node"))
    return nnodes, out


def parse_train(train_argv: List[str]):
    """train.py's own dataclasses and parser, so that a bad flag is caught before N processes start."""
    for name in DIST_ENV:
        os.environ.pop(name, None)
    from paddlenlp.trainer import PdArgumentParser

    from sd.args import DataArguments, ModelArguments, SDTrainingArguments

    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    if len(train_argv) == 1 and train_argv[0].endswith(".json"):  # train.py's json form
        return parser.parse_json_file(os.path.abspath(train_argv[0]))
    return parser.parse_args_into_dataclasses(args=train_argv)


def node_ip(plan: LaunchPlan) -> str:
    """The address paddle's launcher gives this node (launch/context/node.py, --host wins)."""
    if plan.host:
        return plan.host
    try:
        return socket.gethostbyname(socket.getfqdn(socket.gethostname()))
    except OSError:
        return "127.0.0.1"


def run(launch_argv: List[str], train_argv: List[str]) -> List[Finding]:
    import paddle

    plan = parse_launch(launch_argv)
    cuda = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    env_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = env_visible.split(",") if env_visible and env_visible != "all" and cuda else None
    local_procs, findings = device_findings(plan, cuda, visible, os.cpu_count() or 1)
    nnodes, more = node_findings(plan, node_ip(plan))
    findings += more
    try:
        model_args, data_args, args = parse_train(train_argv)
    except (ValueError, OSError) as e:  # the dataclasses' own checks: they name the flag
        return findings + [Finding("error", f"train flags: {e}")]
    world = local_procs * nnodes
    workers = args.dataloader_num_workers
    findings.append(Finding("ok", f"world: {world} ranks ({nnodes} node(s) x {local_procs}), global batch "
                                  f"{world * args.per_device_train_batch_size * args.gradient_accumulation_steps}"))
    findings += shard_findings(data_args.file_list, world, workers)
    needed = shm_bytes_needed(local_procs, workers, args.per_device_train_batch_size, data_args.resolution,
                              model_args.model_max_length)
    findings.append(shm_finding(free_shm_bytes(), needed, local_procs, workers))
    findings.append(output_dir_finding(args.output_dir))
    return findings


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: preflight.py [LAUNCH FLAGS] -- [TRAIN FLAGS]", file=sys.stderr)
        return 2
    cut = argv.index("--")
    findings = run(argv[:cut], argv[cut + 1:])
    for f in findings:
        print(f"[preflight] {'ok' if f.level == 'ok' else f.level.upper()}: {f.message}",
              file=sys.stderr if f.level != "ok" else sys.stdout, flush=True)
    errors = sum(f.level == "error" for f in findings)
    if errors:
        print(f"[preflight] {errors} problem(s): not launching", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
