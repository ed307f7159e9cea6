"""Multi-process and multi-node training through paddle.distributed.launch, on CPU (gloo), with real processes.

Every job here is a real launch (`python -m paddle.distributed.launch`, or train.sh) of real train.py ranks that
talk through gloo on 127.0.0.1; "two nodes" are two launchers sharing one --master on loopback. Tiny data, a few
steps, one thread per process. Whatever a test started is killed at teardown (launchers, ranks, workers). The
launch-safety pieces alone (node checks, rank verdicts, die_with_parent) are tests/test_launch_checks.py.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Tuple

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import PY, ROOT, TINY_INIT
from sd.tiny.make_demo_data import generate_demo_dataset

pytestmark = pytest.mark.smoke

B = 2  # per-rank batch; the 1-process reference uses 2 * B
TRAIN_PY = os.path.join(ROOT, "train.py")


# ------------------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:  # a random high port nobody listens on
        port = random.randint(40000, 60000)
        return free_port() if s.connect_ex(("127.0.0.1", port)) == 0 else port


def proc_file(pid: int, name: str) -> str:
    """/proc/PID/NAME, or "" once the process (or thread) is gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def start_time(pid: int) -> str:
    """When a live process started (ticks since boot): with the pid it names one process even after the pid is
    reused; "" once it is gone or a zombie."""
    fields = proc_file(pid, "stat").rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""


def running(procs: Dict[int, str]) -> List[int]:
    return [pid for pid, start in procs.items() if start and start_time(pid) == start]


def children(pid: int) -> List[int]:
    tasks = os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []
    return [int(x) for tid in tasks for x in proc_file(pid, f"task/{tid}/children").split()]


def descendants(pid: int) -> Dict[int, str]:
    found, todo = {}, children(pid)
    while todo:
        p = todo.pop()
        found[p] = start_time(p)
        todo += children(p)
    return found


def rank_pid(launcher: int, rank: int) -> int:
    """The trainer process of global `rank` among a launcher's children (its environment says which)."""
    for pid in children(launcher):
        if f"\0PADDLE_TRAINER_ID={rank}\0" in "\0" + proc_file(pid, "environ"):
            return pid
    raise AssertionError(f"no rank {rank} under launcher {launcher}")


class Jobs:
    """Starts commands in sessions of their own; kills whatever is left of them at teardown."""

    def __init__(self):
        self.procs: List[subprocess.Popen] = []
        self.seen: Dict[int, str] = {}

    def start(self, cmd: List[str], log: str, cwd: str = ROOT, **env) -> subprocess.Popen:
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return self.procs[-1]

    def wait(self, p: subprocess.Popen, timeout: float, log, ok: bool = False) -> int:
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no end within {timeout} s; output:\n{read(log)[-6000:]}") from None
        assert code == 0 or not ok, read(log)[-6000:]
        return code

    def remember(self) -> Dict[int, str]:
        for p in self.procs:
            self.seen.update(descendants(p.pid))
        return dict(self.seen)

    def cleanup(self) -> None:
        self.remember()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # a launcher stops its ranks on SIGTERM
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in running(self.seen):  # ranks run in sessions of their own, outside the launcher's group
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def jobs():
    j = Jobs()
    yield j
    j.cleanup()


def read(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def launch_cmd(*launch_flags: str) -> List[str]:
    return [PY, "-u", "-m", "paddle.distributed.launch", *launch_flags]


def train_flags(file_list: str, out: str, *extra: str) -> List[str]:
    return ["--do_train", "--pretrained_model_name_or_path", TINY_INIT, "--file_list", file_list, "--output_dir",
            out, "--resolution", "32", "--center_crop", "True", "--caption_dropout_prob", "0", "--learning_rate",
            "1e-3", "--logging_steps", "1", "--image_logging_steps", "0", "--seed", "23", "--disable_tqdm", "True",
            "--report_to", "none", "--per_device_train_batch_size", str(B), *extra]


def unet_diff(run_a: str, run_b: str) -> float:
    """Largest difference between the saved UNet weights of two runs (or checkpoints)."""
    a, b = (load_file(os.path.join(run, "unet", "diffusion_paddle_model.safetensors")) for run in (run_a, run_b))
    return max(float(np.abs(a[k] - b[k]).max()) for k in a) if a.keys() == b.keys() else float("inf")


def two_nodes(jobs: Jobs, tmp_path, flags: List[str], sh: bool = False, cwds=(ROOT, ROOT), **env):
    """Two launchers (or train.sh), one --master on loopback, 1 process each: tmp_path/log{N}/, tmp_path/node{N}.out."""
    port = free_port()
    entry = ["sh", os.path.join(ROOT, "train.sh")] if sh else launch_cmd()
    return [jobs.start(entry + ["--master", f"127.0.0.1:{port}", "--nnodes", "2", "--rank", str(node),
                                "--nproc_per_node", "1", "--log_dir", str(tmp_path / f"log{node}")]
                       + ([] if sh else [TRAIN_PY]) + flags, str(tmp_path / f"node{node}.out"), cwd=cwds[node], **env)
            for node in (0, 1)]


@pytest.fixture(scope="module")
def same_image_data(tmp_path_factory) -> str:
    """64 copies of one demo image and caption in 4 gzip parts of 16, by the real tools. With every record the
    same, what two ranks read equals what one process reads: layouts can differ only in how gradients combine."""
    root = str(tmp_path_factory.mktemp("same_image"))
    copies = os.path.join(root, "raw", "copies.jsonl")
    line = read(generate_demo_dataset(os.path.join(root, "raw"), 1, image_size=32, seed=0)).strip()
    with open(copies, "w", encoding="utf-8") as f:
        f.write((line + "\n") * 64)
    subprocess.run([PY, os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", copies, "--output_path",
                    root, "--output_name", "same", "--per_part_file_num", "16", "--save_gzip_file",
                    "--num_workers", "0"], check=True, capture_output=True, cwd=ROOT)
    return os.path.join(root, "filelist", "same.filelist.list")


RUN_FLAGS = ("--max_steps", "4", "--save_steps", "2", "--dataloader_num_workers", "1")  # of the 2-rank run


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, same_image_data) -> Tuple[str, str]:
    """(output_dir, log_dir) of 2 processes x batch B, 4 steps, checkpoints at 2 and 4, a DataLoader worker each."""
    root, j = tmp_path_factory.mktemp("two_ranks"), Jobs()
    p = j.start(launch_cmd("--nproc_per_node", "2", "--log_dir", str(root / "log"), TRAIN_PY,
                           *train_flags(same_image_data, str(root / "out"), *RUN_FLAGS)), str(root / "launch.out"))
    try:
        j.wait(p, 150, root / "launch.out", ok=True)
    finally:
        j.cleanup()
    return str(root / "out"), str(root / "log")


# ------------------------------------------------------------------------------------------------ tests
def test_two_ranks_train_to_the_weights_of_one_process_with_double_batch(tmp_path, two_rank_run, same_image_data):
    """Same init (seed), same records (all identical: see same_image_data), the same random draws per global
    sample (StreamingTrainer.sample_keys): 2 ranks x B reach the weights of 1 process x 2B only if the ranks'
    gradients are averaged. (Measured: 1 process x B, i.e. one rank's gradient alone, ends 7e-3 away.)"""
    one = str(tmp_path / "one")
    proc = subprocess.run([PY, TRAIN_PY, *train_flags(same_image_data, one, *RUN_FLAGS[:4]),
                           "--per_device_train_batch_size", str(2 * B), "--dataloader_num_workers", "0"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = two_rank_run[0]
    diff, moved = unet_diff(two, one), unet_diff(two, os.path.join(two, "checkpoint-2"))
    assert moved > 1e-3, f"steps 3-4 did not move the weights ({moved})"
    assert diff < 1e-5, f"2 x {B} and 1 x {2 * B} differ by {diff} (steps 3-4 alone moved them by {moved})"


def test_checkpoints_and_resume_under_two_ranks(tmp_path, two_rank_run, same_image_data, jobs):
    """Every checkpoint of the 2-rank run holds one loader state per rank and one set of model files (rank 0
    alone saves and logs). Cut back to its checkpoint-2 and resumed with 2 ranks, it reaches the same weights and
    the same loader position on each rank as the run that never stopped."""
    straight, out, logs = two_rank_run[0], str(tmp_path / "resumed"), tmp_path / "log"
    assert {"checkpoint-2", "checkpoint-4", "unet"} <= set(os.listdir(straight))
    assert not [n for n in os.listdir(straight) if n.startswith(".")]  # the preflight's shared-folder token is gone
    for step in (2, 4):
        ckpt = os.path.join(straight, f"checkpoint-{step}")
        states = [json.loads(read(p)) for p in sorted(glob.glob(os.path.join(ckpt, "loader_state_rank*.json")))]
        assert [(s["rank"], s["world_size"], s["batches_consumed"]) for s in states] == [(0, 2, step), (1, 2, step)]
        assert len(glob.glob(os.path.join(ckpt, "unet", "*.safetensors"))) == 1
    rank0, rank1 = (read(os.path.join(two_rank_run[1], f"workerlog.{r}")) for r in (0, 1))
    assert rank0.count("global_step: ") == 4 and "global_step: " not in rank1  # the training log: rank 0 only
    assert "preflight: 2 ranks: 0@" in rank0 and "watchdog timeout 30 s" in rank0
    shutil.copytree(straight, out)
    for name in ("checkpoint-4", "unet", "training_args.bin"):
        (shutil.rmtree if os.path.isdir(os.path.join(out, name)) else os.remove)(os.path.join(out, name))
    p = jobs.start(launch_cmd("--nproc_per_node", "2", "--log_dir", str(logs), TRAIN_PY,
                              *train_flags(same_image_data, out, *RUN_FLAGS)), str(tmp_path / "launch.out"))
    jobs.wait(p, 150, tmp_path / "launch.out", ok=True)
    for r in (0, 1):
        assert f"resumed weights and loader position from {out}/checkpoint-2" in read(logs / f"workerlog.{r}")
        name = os.path.join("checkpoint-4", f"loader_state_rank{r}.json")
        assert json.loads(read(os.path.join(out, name))) == json.loads(read(os.path.join(straight, name)))
    assert json.loads(read(os.path.join(out, "checkpoint-4", "trainer_state.json")))["global_step"] == 4
    assert unet_diff(out, straight) < 1e-6


PROBE = r'''
"""One rank of a real launch: the (part, line) of every record its logical workers read."""
import itertools, json, sys
import paddle.distributed as dist
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset

dist.init_parallel_env()
rank, world = dist.get_rank(), dist.get_world_size()  # what TrainingArguments.dataset_rank/_world_size return
result = {}
for workers, draws in ((1, 80), (3, 40)):  # 2 or 6 global readers for 4 parts: by part, then by line
    ds = TextImageDataset(DataArguments(sys.argv[2], resolution=8, center_crop=True, buffer_size=4), None, 1,
                          rank, world, workers, seed=42)
    result[workers] = [[s.ref for s in itertools.islice(ds.iter_samples(w), draws)] for w in range(workers)]
with open(f"{sys.argv[3]}.{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": world, "refs": result}, f)
dist.barrier()
'''


def test_ranks_read_disjoint_shards_that_cover_the_data(tmp_path, same_image_data, jobs):
    """Two real ranks started by paddle.distributed.launch build the training dataset from their launch
    environment: the records of an epoch ((part, line) of epoch 0) never overlap and together are all."""
    probe, out = tmp_path / "probe.py", str(tmp_path / "refs")
    probe.write_text(PROBE)
    p = jobs.start(launch_cmd("--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"), str(probe), ROOT,
                              same_image_data, out), str(tmp_path / "launch.out"))
    jobs.wait(p, 120, tmp_path / "launch.out", ok=True)
    got = [json.loads(read(f"{out}.{r}.json")) for r in (0, 1)]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    everything = {(part, line) for part in range(4) for line in range(16)}
    for workers in ("1", "3"):
        readers = [{(ref[2], ref[3]) for ref in refs if ref[1] == 0} for g in got for refs in g["refs"][workers]]
        assert all(readers), f"{workers} workers: a reader got nothing"
        assert sum(len(r) for r in readers) == len(everything), f"{workers} workers: readers overlap"
        assert set().union(*readers) == everything, f"{workers} workers: records missing"


def test_two_nodes_on_loopback_through_train_sh_write_one_checkpoint(tmp_path, same_image_data, jobs):
    """Two train.sh commands (--master --nnodes 2 --rank R, 1 process each) form one job: one set of model files
    and one loader state per rank in the checkpoint; samples and VisualDL logs from rank 0 only."""
    out = str(tmp_path / "out")
    procs = two_nodes(jobs, tmp_path, train_flags(
        same_image_data, out, "--max_steps", "2", "--save_steps", "2", "--image_logging_steps", "2",
        "--num_inference_steps", "2", "--report_to", "visualdl", "--dataloader_num_workers", "1"), sh=True)
    for node, p in enumerate(procs):
        jobs.wait(p, 150, tmp_path / f"node{node}.out", ok=True)
        assert "[preflight] ok: world: 2 ranks (2 node(s) x 1)" in read(tmp_path / f"node{node}.out")
    ckpt = os.path.join(out, "checkpoint-2")
    states = sorted(glob.glob(os.path.join(ckpt, "loader_state_rank*.json")))
    assert [(os.path.basename(p), json.loads(read(p))["rank"]) for p in states] == [
        ("loader_state_rank0.json", 0), ("loader_state_rank1.json", 1)]
    for name in ("unet/config.json", "optimizer.safetensors", "trainer_state.json", ".complete"):
        assert os.path.exists(os.path.join(ckpt, name)), name
    assert len(glob.glob(os.path.join(ckpt, "unet", "*.safetensors"))) == 1
    assert len(glob.glob(os.path.join(out, "runs", "*", "vdlrecords*"))) == 1
    assert glob.glob(os.path.join(out, "samples", "step-0000002_samples_cfg7.5.png"))
    rank0, rank1 = (read(tmp_path / f"log{node}" / "workerlog.0") for node in (0, 1))
    assert "logged reconstruction" in rank0 and "logged" not in rank1


def start_long_job(jobs, tmp_path, file_list: str) -> List[subprocess.Popen]:
    """A 2-node job that would run for hours (a DataLoader worker per rank), returned once rank 0 trains."""
    procs = two_nodes(jobs, tmp_path, train_flags(file_list, str(tmp_path / "out"), "--max_steps", "100000",
                                                  "--save_steps", "100000", "--dataloader_num_workers", "1"),
                      SD_RANK_TIMEOUT="8")
    log0, deadline = tmp_path / "log0" / "workerlog.0", time.time() + 120
    while not (log0.exists() and "global_step: 2," in read(log0)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), read(tmp_path / "node0.out")
        time.sleep(0.5)
    return procs


def test_a_killed_rank_ends_the_job_on_every_node_and_is_named(tmp_path, same_image_data, jobs):
    """SIGKILL the rank-1 trainer (not a launcher) mid-run: both launchers exit non-zero within 60 s, the dead
    rank's log (which its launcher names) says which global rank died, and nothing of the job is left: no
    process (DataLoader workers included), no batch in /dev/shm."""
    procs = start_long_job(jobs, tmp_path, same_image_data)
    victim, job = rank_pid(procs[1].pid, 1), jobs.remember()
    assert len(job) >= 6, job  # 2 trainers, their DataLoader workers and death reporters, at least
    os.kill(victim, signal.SIGKILL)
    codes = [jobs.wait(p, 60, str(tmp_path / f"node{n}.out")) for n, p in enumerate(procs)]
    assert all(c != 0 for c in codes), codes
    dead = read(tmp_path / "log1" / "workerlog.0")
    assert "JOB: rank 1 of 2 on" in dead and "died: its process ended without finishing" in dead
    assert "status failed" in read(tmp_path / "node1.out") and "log1/workerlog.0" in read(tmp_path / "node1.out")
    deadline = time.time() + 20
    while running(job) and time.time() < deadline:  # orphans would never end: DataLoader workers die with a rank
        time.sleep(0.2)
    assert not running(job), "processes of the job outlived it"
    assert not [f for pid in job for f in glob.glob(f"/dev/shm/paddle_{pid}_*")], "its batches stayed in /dev/shm"


def test_a_hung_rank_is_named_by_the_watchdog_and_the_job_ends(tmp_path, same_image_data, jobs):
    """SIGSTOP rank 1 (a frozen rank: no crash, no closed socket, its launcher sees nothing): rank 0's watchdog
    names it after SD_RANK_TIMEOUT (8 s here) and ends the job. Woken up, rank 1 meets the closed job: its
    watchdog, or first a gloo error, ends it; either way it says so."""
    procs = start_long_job(jobs, tmp_path, same_image_data)
    victim = rank_pid(procs[1].pid, 1)
    os.kill(victim, signal.SIGSTOP)
    try:
        code0 = jobs.wait(procs[0], 40, str(tmp_path / "node0.out"))  # 8 s + at most 2 intervals, measured 8-9 s
    finally:
        os.kill(victim, signal.SIGCONT)
    assert code0 != 0 and jobs.wait(procs[1], 40, str(tmp_path / "node1.out")) != 0
    node0, node1 = read(tmp_path / "node0.out"), read(tmp_path / "node1.out")
    assert "JOB WATCHDOG (rank 0): rank 1 on" in node0 and "sent no heartbeat for" in node0
    # Woken, rank 1 is ended by its own watchdog, by the death reporter, or first by gloo's own timeout on the
    # collective it was frozen in (seen in CI): each names the ranks involved.
    assert ("JOB WATCHDOG (rank 1):" in node1 or "JOB: rank 1 of 2 on" in node1
            or "TIMEOUT self_rank = 1 pair_rank = 0" in node1), node1[-3000:]


def test_output_dir_that_is_not_shared_stops_every_rank_with_a_clear_error(tmp_path, same_image_data, jobs):
    """A relative --output_dir resolves against each node's working directory: two different folders. Every
    rank stops at start, with the message, instead of writing checkpoints that silently lack files."""
    cwds = [tmp_path / f"cwd{node}" for node in (0, 1)]
    for cwd in cwds:
        cwd.mkdir()
    procs = two_nodes(jobs, tmp_path, train_flags(same_image_data, "out", "--max_steps", "2"), cwds=cwds)
    for node, p in enumerate(procs):
        assert jobs.wait(p, 120, str(tmp_path / f"node{node}.out")) != 0
        log = read(tmp_path / f"log{node}" / "workerlog.0")
        # train.py's cli(): the rank check's PreflightError as one line, no traceback
        assert "error: " in log and "output_dir out is not the same shared folder on every node" in log
    assert os.listdir(cwds[0] / "out") == []  # rank 0's token is removed again


def test_preflight_script_stops_a_bad_launch_before_it_starts(tmp_path, same_image_data):
    """--gpus on this CPU machine, a node list without this node, more readers than parts: one run names every
    problem and exits 1, before anything is launched."""
    flags = train_flags(same_image_data, str(tmp_path / "out"), "--max_steps", "2", "--dataloader_num_workers", "2")
    proc = subprocess.run([PY, os.path.join(ROOT, "scripts", "preflight.py"), "--gpus", "0,1", "--ips",
                           "10.255.0.1,10.255.0.2", "--", *flags], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "ERROR: --gpus 0,1: paddle sees no CUDA GPU on this machine" in text and "--nproc_per_node N" in text
    assert "is not in --ips 10.255.0.1,10.255.0.2: paddle would make it node 0 as well" in text
    assert "has 4 parts for 8 global readers (4 ranks x 2 workers): sharding by line" in text
    assert "not launching" in text
