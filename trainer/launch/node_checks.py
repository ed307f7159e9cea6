"""The checks of one node before `python -m paddle.distributed.launch`, so that a bad setup fails once, there,
with one clear message, instead of N times in N worker logs (or as a hang). scripts/preflight.py (run by
train.sh) is the command line over `node_preflight`.

The launch flags are `LaunchArguments` (validated there: --nproc_per_node, --nnodes, --master, --rank); what
they mean on this node is `resolve_launch`'s frozen `LaunchPlan`. The checks: the devices (--gpus on a machine
without CUDA GPUs, GPU ids that do not exist, processes per node), this node in --ips, the train flags through
train.py's own parser, data parts against ranks x DataLoader workers ("sharding by line" when short), free
/dev/shm against the DataLoader workers, and output_dir writable. `probe_output_dir` and `read_data_layout` are
also what the in-job checks use (trainer/launch/rank_checks.py).
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from data_tools.fileio import write_text_atomic
from data_tools.filelists import Source, read_filelist_list
from sd.components import CLIP_MODEL_MAX_LENGTH
from trainer.loader.sharding import BY_LINE, WorkerLayout, sharding_mode

# Set by paddle.distributed.launch inside a job. The preflight is not a rank: with them, parsing the training
# arguments would call init_parallel_env and wait for peers that never come.
DIST_ENV = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT",
            "PADDLE_RANK_IN_NODE", "PADDLE_GLOBAL_RANK", "PADDLE_GLOBAL_SIZE", "PADDLE_LOCAL_RANK",
            "PADDLE_LOCAL_SIZE", "PADDLE_MASTER", "PADDLE_NNODES")
SHM_PATH = "/dev/shm"
PREFETCH_FACTOR = 2  # paddle.io.DataLoader's default: batches in flight per worker


@dataclass(frozen=True)
class Finding:
    level: str  # "ok" | "warning" | "error"
    message: str


# ------------------------------------------------------------------------------------------------ launch flags
def _split(value: Optional[str]) -> Optional[Tuple[str, ...]]:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None


@dataclass
class LaunchArguments:
    """The launch flags train.sh passes, unchanged, to paddle.distributed.launch."""

    gpus: Optional[str] = field(default=None, metadata={"help": "GPU ids, one process each (NCCL), e.g. 0,1,2,3"})
    devices: Optional[str] = field(default=None, metadata={"help": "paddle's newer name for --gpus"})
    nproc_per_node: Optional[int] = field(default=None, metadata={
        "help": "processes on this node; unset: one per visible GPU, else 1 (on a CPU they talk through gloo)"})
    ips: Optional[str] = field(default=None, metadata={
        "help": "the nodes, IP1,IP2,...: a node's rank is its position (same command on every node)"})
    master: Optional[str] = field(default=None, metadata={"help": "IP:PORT of the master, with --nnodes"})
    nnodes: Optional[str] = field(default=None, metadata={"help": "number of nodes, with --master"})
    rank: Optional[int] = field(default=None, metadata={"help": "this node's rank, with --master (0 on the master)"})
    host: Optional[str] = field(default=None, metadata={
        "help": "this node's address, when its hostname does not resolve to the one in --ips"})
    log_dir: Optional[str] = field(default=None, metadata={"help": "the launcher's log folder; unset: log/"})
    job_id: Optional[str] = field(default=None, metadata={"help": "the launcher's job name"})
    start_port: Optional[int] = field(default=None, metadata={"help": "the first port the launcher uses; unset: 6070"})

    def __post_init__(self) -> None:
        if self.gpus is not None and self.devices is not None and _split(self.gpus) != _split(self.devices):
            raise ValueError(f"--gpus {self.gpus} and --devices {self.devices} disagree: give one of them")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ValueError(f"--nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes is not None and (not self.nnodes.isdigit() or int(self.nnodes) < 1):
            raise ValueError(f"--nnodes must be a number of nodes >= 1, got {self.nnodes!r} (elastic ranges are "
                             "not supported: the data sharding needs a fixed world size)")
        ips = _split(self.ips)
        if ips is not None and self.nnodes is not None and int(self.nnodes) != len(ips):
            raise ValueError(f"--nnodes {self.nnodes} but --ips lists {len(ips)} nodes")
        if self.master is not None:
            host, _, port = self.master.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--master must be IP:PORT, got {self.master!r}")
        if self.rank is not None:
            if self.master is None:
                raise ValueError("--rank needs --master IP:PORT (with --ips the order of the list decides)")
            nnodes = int(self.nnodes) if self.nnodes is not None else 1
            if not 0 <= self.rank < nnodes:
                raise ValueError(f"--rank {self.rank} is not in [0, --nnodes {nnodes})")


@dataclass(frozen=True)
class LaunchPlan:
    """What the launch flags mean on this node: made by resolve_launch, never changed."""

    args: LaunchArguments
    gpus: Optional[Tuple[str, ...]]  # --gpus or --devices, split
    ips: Optional[Tuple[str, ...]]
    nnodes: int  # len(--ips), else --nnodes, else 1


def resolve_launch(args: LaunchArguments) -> LaunchPlan:
    ips = _split(args.ips)
    nnodes = len(ips) if ips is not None else int(args.nnodes or 1)
    return LaunchPlan(args, _split(args.gpus if args.gpus is not None else args.devices), ips, nnodes)


# ------------------------------------------------------------------------------------------------ devices, nodes
def device_findings(plan: LaunchPlan, cuda_count: int, visible: Optional[List[str]], cpu_count: int,
                    omp_threads: Optional[str] = None) -> Tuple[int, List[Finding]]:
    """(processes on this node, findings). `visible`: CUDA_VISIBLE_DEVICES entries (the labels --gpus names);
    `omp_threads`: OMP_NUM_THREADS as the user set it (paddle makes it 1 when unset)."""
    out: List[Finding] = []
    labels = visible if visible is not None else [str(i) for i in range(cuda_count)]
    nproc = plan.args.nproc_per_node
    if plan.gpus is not None:
        gpus = ",".join(plan.gpus)
        if cuda_count == 0:
            return len(plan.gpus), [Finding("error", (
                f"--gpus {gpus}: paddle sees no CUDA GPU on this machine. On a CPU, start N processes with "
                "--nproc_per_node N (they talk through gloo)."))]
        if [g for g in plan.gpus if g not in labels] or len(set(plan.gpus)) != len(plan.gpus):
            out.append(Finding("error", f"--gpus {gpus}: ids must be distinct visible GPUs (visible: "
                                        f"{','.join(labels)}; CUDA_VISIBLE_DEVICES renumbers them)"))
        if nproc is not None and nproc != len(plan.gpus):
            out.append(Finding("error", f"--nproc_per_node {nproc} disagrees with --gpus {gpus}: give one of "
                                        "them (one process per GPU)"))
        return len(plan.gpus), out + [Finding("ok", f"devices: {len(plan.gpus)} GPU processes (NCCL)")]
    if cuda_count > 0:
        n = nproc or cuda_count  # paddle's default: every visible GPU
        if n > cuda_count:
            out.append(Finding("error", f"--nproc_per_node {n} but only {cuda_count} GPUs are visible"))
        return n, out + [Finding("ok", f"devices: {n} GPU processes (NCCL)")]
    n = nproc or 1
    threads = int(omp_threads) if omp_threads and omp_threads.isdigit() else 1
    out.append(Finding("ok", f"devices: {n} CPU process(es) of {threads} OpenMP thread(s) on {cpu_count} cores "
                             "(OMP_NUM_THREADS); paddle's launcher makes them talk through gloo"))
    if n * threads > cpu_count:
        out.append(Finding("warning", f"{n} processes x {threads} threads on {cpu_count} cores: oversubscribed, "
                                      f"they will crawl (OMP_NUM_THREADS={max(1, cpu_count // n)} fits)"))
    return n, out


def node_findings(plan: LaunchPlan, node_ip: str) -> List[Finding]:
    """This node among the nodes (--ips, or --master/--nnodes)."""
    out: List[Finding] = []
    if plan.ips is not None and len(plan.ips) > 1 and node_ip not in plan.ips:
        out.append(Finding("error", (
            f"this node's IP as paddle resolves it ({node_ip}) is not in --ips {','.join(plan.ips)}: paddle "
            "would make it node 0 as well. Pass --host <its address in the list>, or fix the list.")))
    if plan.nnodes > 1 and plan.args.master is None and plan.ips is None:
        out.append(Finding("warning", f"--nnodes {plan.nnodes} without --master: paddle starts a master on this "
                                      "node and prints the command to run on the others"))
    if plan.nnodes > 1:
        out.append(Finding("ok", f"nodes: {plan.nnodes} (this one: {node_ip}); run the same command on every node"))
    return out


def node_ip(plan: LaunchPlan) -> str:
    """The address paddle's launcher gives this node (launch/context/node.py, --host wins)."""
    if plan.args.host:
        return plan.args.host
    try:
        return socket.gethostbyname(socket.getfqdn(socket.gethostname()))
    except OSError:  # paddle's own choice then (Node.get_host_ip): the check must predict paddle
        return "127.0.0.1"


# ------------------------------------------------------------------------------------------------ shm
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


# ------------------------------------------------------------------------------------------------ output_dir
def probe_output_dir(output_dir: str, name: str, content: str) -> Optional[str]:
    """Create output_dir (training would) and write `content` to the file `name` in it, which the caller
    removes. None when that worked, else the problem in one line. Used before the launch and by rank 0."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        write_text_atomic(os.path.join(output_dir, name), content)
    except OSError as e:
        return f"output_dir {output_dir} is not writable: {e}"
    return None


def output_dir_finding(output_dir: str) -> Finding:
    name = f".preflight-write-{os.getpid()}"
    problem = probe_output_dir(output_dir, name, "ok")
    if problem is not None:
        return Finding("error", problem)
    os.remove(os.path.join(output_dir, name))
    return Finding("ok", f"output_dir {output_dir} is writable")


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class DataLayout:
    """A file list's sources and the readers of the job that split them (ranks x DataLoader workers)."""

    sources: Tuple[Source, ...]
    world_size: int
    workers_per_rank: int

    @property
    def global_readers(self) -> int:
        return self.world_size * self.workers_per_rank

    def mode(self, source: Source) -> str:
        return sharding_mode(len(source.parts), self.global_readers)

    @property
    def signature(self) -> str:
        """What a rank reads, condensed: sources, weights and part paths. Equal on every rank of a good job."""
        h = hashlib.sha256()
        for src in self.sources:
            h.update(f"{src.filelist}|{src.weight}|{'|'.join(src.parts)}\n".encode())
        return h.hexdigest()[:16]


def read_data_layout(file_list: str, world_size: int, num_workers: int) -> DataLayout:
    """Raises OSError/ValueError naming the missing or malformed filelist or part."""
    readers = WorkerLayout(0, world_size, num_workers)
    return DataLayout(tuple(read_filelist_list(file_list)), world_size, readers.workers_per_rank)


def shard_findings(layout: DataLayout) -> List[Finding]:
    """How each source is split over the global readers."""
    G, W, out = layout.global_readers, layout.workers_per_rank, []
    for src in layout.sources:
        n = len(src.parts)
        if n == 0:
            out.append(Finding("warning", f"data: {src.filelist} lists no parts: it contributes nothing"))
        elif layout.mode(src) == BY_LINE:
            out.append(Finding("warning", (
                f"data: {src.filelist} has {n} parts for {G} global readers ({layout.world_size} ranks x {W} "
                f"workers): sharding by line (every reader opens every part and keeps 1 line in {G}: correct, "
                f"but each reader decompresses {G}x more). For sharding by part give it >= {G} parts "
                "(create_pretraining_data.py --per_part_file_num smaller).")))
        else:
            out.append(Finding("ok", f"data: {src.filelist}: {n} parts for {G} global readers: sharding by part"))
    return out


# ------------------------------------------------------------------------------------------------ all of them
def parse_train(train_argv: List[str]):
    """train.py's own dataclasses and parser, so that a bad flag is caught before N processes start."""
    for name in DIST_ENV:
        os.environ.pop(name, None)
    from sd.args import parse_train_args

    return parse_train_args(train_argv)


def node_preflight(launch: LaunchArguments, train_argv: List[str], omp_threads: Optional[str]) -> List[Finding]:
    """Every check of this node. `omp_threads`: OMP_NUM_THREADS read before paddle's import sets it."""
    import paddle

    plan = resolve_launch(launch)
    cuda = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    env_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = env_visible.split(",") if env_visible and env_visible != "all" and cuda else None
    local_procs, findings = device_findings(plan, cuda, visible, os.cpu_count() or 1, omp_threads)
    findings += node_findings(plan, node_ip(plan))
    try:
        model_args, data_args, args = parse_train(train_argv)
    except (ValueError, OSError) as e:  # the dataclasses' own checks: they name the flag
        return findings + [Finding("error", f"train flags: {e}")]
    world = local_procs * plan.nnodes
    workers = args.dataloader_num_workers
    findings.append(Finding("ok", f"world: {world} ranks ({plan.nnodes} node(s) x {local_procs}), global batch "
                                  f"{world * args.per_device_train_batch_size * args.gradient_accumulation_steps}"))
    try:
        findings += shard_findings(read_data_layout(data_args.file_list, world, workers))
    except (OSError, ValueError) as e:  # a filelist or part that is missing or malformed: named by the reader
        findings.append(Finding("error", f"data: {e}"))
    # Unset, the length is the tokenizer's (resolved later, in the ranks): SD's 77 bounds the tiny default's 16.
    needed = shm_bytes_needed(local_procs, workers, args.per_device_train_batch_size, data_args.resolution,
                              model_args.model_max_length or CLIP_MODEL_MAX_LENGTH)
    findings.append(shm_finding(free_shm_bytes(), needed, local_procs, workers))
    findings.append(output_dir_finding(args.output_dir))
    return findings
