#!/usr/bin/env python
"""Checks run by train.sh on each node before `python -m paddle.distributed.launch`, so that a bad setup fails
once, here, with one clear message, instead of N times in N worker logs (or as a hang).

    python scripts/preflight.py [LAUNCH FLAGS] -- [TRAIN FLAGS]     exit 0: go, 1: a problem (printed), 2: usage

Checks: the devices (--gpus on a machine without CUDA GPUs, GPU ids that do not exist, processes per node), the
nodes (this node in --ips, --master IP:PORT, --nnodes/--rank), the train flags through train.py's own parser, data
parts against ranks x DataLoader workers ("sharding by line" when short), free /dev/shm against the DataLoader
workers, and output_dir writable. What needs the running job (output_dir shared by every node, the same data and
checkpoint on every rank, a rank that dies) is checked inside the job: trainer/launch/rank_checks.py.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple


from data_tools.part_format import read_filelist_list  # noqa: E402
from trainer.loader.sharding import BY_LINE, sharding_mode  # noqa: E402

# Set by paddle.distributed.launch inside a job. This script is not a rank: with them, parsing the training
# arguments would call init_parallel_env and wait for peers that never come.
DIST_ENV = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT",
            "PADDLE_RANK_IN_NODE", "PADDLE_GLOBAL_RANK", "PADDLE_GLOBAL_SIZE", "PADDLE_LOCAL_RANK",
            "PADDLE_LOCAL_SIZE", "PADDLE_MASTER", "PADDLE_NNODES")
SHM_PATH = "/dev/shm"
PREFETCH_FACTOR = 2  # paddle.io.DataLoader's default: batches in flight per worker


@dataclass
class Finding:
    level: str  # "ok" | "warning" | "error"
    message: str


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


def shm_bytes_needed(local_procs: int, num_workers: int, batch_size: int, resolution: int,
                     model_max_length: int = 77) -> int:
    """Shared memory the DataLoaders of one node hold at once: per process, every worker's batches in flight
    plus the one being consumed (float32 pixels + int64 token ids). 0 without workers: no shm is used."""
    if num_workers <= 0:
        return 0
    batch = batch_size * (3 * resolution * resolution * 4 + model_max_length * 8)
    return local_procs * (PREFETCH_FACTOR * num_workers + 1) * batch


def shm_finding(free: Optional[int], needed: int, local_procs: int, num_workers: int) -> Finding:
    if needed == 0:
        return Finding("ok", "shm: no DataLoader workers (--dataloader_num_workers 0): no shared memory needed")
    if free is None:
        return Finding("warning", f"shm: there is no {SHM_PATH}: paddle DataLoader workers may fail")
    what = (f"{SHM_PATH} has {free / 2**20:.0f} MiB free; {local_procs} process(es) x {num_workers} DataLoader "
            f"workers need about {needed / 2**20:.1f} MiB")
    fix = (f"Give it more (docker run --shm-size={max(1, -(-2 * needed // 2**30))}g; on Kubernetes an emptyDir "
           "with medium: Memory mounted on /dev/shm) or lower --dataloader_num_workers.")
    if free < needed:
        return Finding("error", f"shm: {what}: the workers would die with a bus error mid-run. {fix}")
    if free < 2 * needed:
        return Finding("warning", f"shm: {what}, with little margin. {fix}")
    return Finding("ok", f"shm: {what}")


def free_shm_bytes() -> Optional[int]:
    if not os.path.isdir(SHM_PATH):
        return None
    st = os.statvfs(SHM_PATH)
    return st.f_bavail * st.f_frsize


def output_dir_finding(output_dir: str) -> Finding:
    """Create output_dir (training would) and write, then remove, a probe file in it."""
    probe = os.path.join(output_dir, f".preflight-write-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return Finding("error", f"output_dir {output_dir} is not writable: {e}")
    return Finding("ok", f"output_dir {output_dir} is writable")


def shard_findings(file_list: str, world_size: int, num_workers: int) -> List[Finding]:
    """How each source is split over the global readers (world_size x max(1, num_workers))."""
    G, out = world_size * max(1, num_workers), []
    for src in read_filelist_list(file_list):
        n = len(src.parts)
        if n == 0:
            out.append(Finding("warning", f"data: {src.filelist} lists no parts: it contributes nothing"))
        elif sharding_mode(n, G) == BY_LINE:
            out.append(Finding("warning", (
                f"data: {src.filelist} has {n} parts for {G} global readers ({world_size} ranks x "
                f"{max(1, num_workers)} workers): sharding by line (every reader opens every part and keeps 1 "
                f"line in {G}: correct, but each reader decompresses {G}x more). For sharding by part give it "
                f">= {G} parts (create_pretraining_data.py --per_part_file_num smaller).")))
        else:
            out.append(Finding("ok", f"data: {src.filelist}: {n} parts for {G} global readers: sharding by part"))
    return out


def device_findings(plan: LaunchPlan, cuda_count: int, visible: Optional[List[str]], cpu_count: int,
                    omp_threads: Optional[str] = None) -> Tuple[int, List[Finding]]:
    """(processes on this node, findings). `visible`: CUDA_VISIBLE_DEVICES entries (the labels --gpus names);
    `omp_threads`: OMP_NUM_THREADS as the user set it (paddle makes it 1 when unset)."""
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
    threads = int(omp_threads) if omp_threads and omp_threads.isdigit() else 1
    out.append(Finding("ok", f"devices: {n} CPU process(es) of {threads} OpenMP thread(s) on {cpu_count} cores "
                             "(OMP_NUM_THREADS); paddle's launcher makes them talk through gloo"))
    if n * threads > cpu_count:
        out.append(Finding("warning", f"{n} processes x {threads} threads on {cpu_count} cores: oversubscribed, "
                                      f"they will crawl (OMP_NUM_THREADS={max(1, cpu_count // n)} fits)"))
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
    from sd.args import parse_train_args

    return parse_train_args(train_argv)


def node_ip(plan: LaunchPlan) -> str:
    """The address paddle's launcher gives this node (launch/context/node.py, --host wins)."""
    if plan.host:
        return plan.host
    try:
        return socket.gethostbyname(socket.getfqdn(socket.gethostname()))
    except OSError:  # paddle's own choice then (Node.get_host_ip): the check below must predict paddle
        return "127.0.0.1"


def run(launch_argv: List[str], train_argv: List[str]) -> List[Finding]:
    omp_threads = os.environ.get("OMP_NUM_THREADS")  # before paddle's import sets it to 1 when unset
    import paddle

    plan = parse_launch(launch_argv)
    cuda = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    env_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = env_visible.split(",") if env_visible and env_visible != "all" and cuda else None
    local_procs, findings = device_findings(plan, cuda, visible, os.cpu_count() or 1, omp_threads)
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
    try:
        findings += shard_findings(data_args.file_list, world, workers)
    except (OSError, ValueError) as e:  # a filelist or part that is missing or malformed: named by the reader
        findings.append(Finding("error", f"data: {e}"))
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
