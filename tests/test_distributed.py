"""Multi-process and multi-node training through paddle.distributed.launch, on CPU (gloo), with real processes.

Every job here is a real launch: `python -m paddle.distributed.launch` (or train.sh) starting real train.py ranks
that talk through gloo on 127.0.0.1. "Two nodes" are two launchers sharing one --master on loopback. Tiny data,
a few steps, one thread per process. Every process started is killed at teardown (launcher, ranks, workers).
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
import sys
import time
from typing import Dict, List

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import PY, ROOT, TINY_INIT

pytestmark = pytest.mark.smoke

B = 2  # per-rank batch; the 1-process reference uses 2 * B


# ------------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    for _ in range(50):
        port = random.randint(40000, 60000)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port found in 40000-60000")


def children(pid: int) -> List[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:  # the thread ended while we looked
            continue
    return out


def descendants(pid: int) -> List[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def rank_pid(launcher: int, rank: int, wait: float = 60) -> int:
    """The trainer process of global `rank` among a launcher's children (its environment says which)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        for pid in children(launcher):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except FileNotFoundError:
                continue
            if env.get(b"PADDLE_TRAINER_ID") == str(rank).encode():
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under launcher {launcher}")


class Jobs:
    """Starts launch commands in their own sessions and kills whatever is left of them at teardown."""

    def __init__(self):
        self.procs: List[subprocess.Popen] = []
        self.seen: set = set()

    def start(self, cmd: List[str], log: str, cwd: str = ROOT, **env) -> subprocess.Popen:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def wait(self, p: subprocess.Popen, timeout: float, log: str) -> int:
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job did not end within {timeout} s; its output:\n{tail(log)}") from None

    def remember(self) -> None:
        for p in self.procs:
            self.seen.update(descendants(p.pid))

    def cleanup(self) -> None:
        self.remember()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the launcher stops its ranks on SIGTERM
        deadline = time.time() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in self.seen:  # ranks run in sessions of their own: not in the launcher's group
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def jobs():
    j = Jobs()
    yield j
    j.cleanup()


def tail(path: str, n: int = 6000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def launch_cmd(*launch_flags: str) -> List[str]:
    return [PY, "-u", "-m", "paddle.distributed.launch", *launch_flags]


TRAIN_PY = os.path.join(ROOT, "train.py")


def train_flags(file_list: str, out: str, *extra: str) -> List[str]:
    return ["--do_train", "--pretrained_model_name_or_path", TINY_INIT,
            "--file_list", file_list, "--output_dir", out, "--resolution", "32", "--center_crop", "True",
            "--caption_dropout_prob", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--image_logging_steps", "0", "--seed", "23", "--disable_tqdm", "True", "--report_to", "none", *extra]


def unet(folder: str) -> Dict[str, np.ndarray]:
    return load_file(os.path.join(folder, "unet", "diffusion_paddle_model.safetensors"))


def max_diff(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def same_image_data(tmp_path_factory) -> str:
    """64 copies of one demo image and caption in 4 gzip parts of 16 (real tools: make_demo_data and
    create_pretraining_data.py). With every record the same, the data two ranks read equals the data one
    process reads, so runs in different layouts differ only in how gradients are combined."""
    from data_tools.make_demo_data import generate_demo_dataset

    root = str(tmp_path_factory.mktemp("same_image"))
    jsonl = generate_demo_dataset(os.path.join(root, "raw"), 1, image_size=32, seed=0)
    line = read(jsonl).strip()
    copies = os.path.join(root, "raw", "copies.jsonl")
    with open(copies, "w", encoding="utf-8") as f:
        f.write((line + "\n") * 64)
    subprocess.run([PY, os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", copies, "--output_path",
                    root, "--output_name", "same", "--per_part_file_num", "16", "--save_gzip_file",
                    "--num_workers", "0"], check=True, capture_output=True, cwd=ROOT)
    return os.path.join(root, "filelist", "same.filelist.list")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, same_image_data):
    """2 processes x batch B, 4 steps, checkpoints at 2 and 4, one DataLoader worker per rank."""
    root = tmp_path_factory.mktemp("two_ranks")
    out, logs = str(root / "out"), str(root / "log")
    j = Jobs()
    try:
        t0 = time.time()
        p = j.start(launch_cmd("--nproc_per_node", "2", "--log_dir", logs, TRAIN_PY) + train_flags(
            same_image_data, out, "--per_device_train_batch_size", str(B), "--max_steps", "4", "--save_steps", "2",
            "--dataloader_num_workers", "1"), str(root / "launch.out"))
        assert j.wait(p, 150, str(root / "launch.out")) == 0, tail(str(root / "launch.out"))
        print(f"2-rank run: {time.time() - t0:.1f} s")
    finally:
        j.cleanup()
    return {"root": root, "out": out, "logs": logs}


# ------------------------------------------------------------------------------------------------ tests
def test_two_ranks_train_to_the_weights_of_one_process_with_double_batch(tmp_path, two_rank_run, same_image_data):
    """Same init (seed), same records (all identical: see same_image_data), same random draws per global sample
    (StreamingTrainer.sample_keys): 2 ranks x B must reach 1 process x 2B's weights, which holds only if the
    ranks' gradients are averaged. Noise, timesteps and VAE draws differ per sample, so a rank that trained on
    its own gradient would drift away by about one Adam step (~lr) per step."""
    one = str(tmp_path / "one")
    proc = subprocess.run([PY, TRAIN_PY] + train_flags(same_image_data, one, "--per_device_train_batch_size", str(2 * B),
                                             "--max_steps", "4", "--save_steps", "2", "--dataloader_num_workers", "0"),
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = two_rank_run["out"]
    diff = max_diff(unet(two), unet(one))
    moved = max_diff(unet(two), unet(os.path.join(two, "checkpoint-2")))  # steps 3-4 alone
    assert moved > 1e-3, f"training did not move the weights ({moved})"
    assert diff < 1e-5 and diff < moved / 100, f"2x{B} and 1x{2 * B} differ by {diff} (steps 3-4 moved {moved})"


def test_rank_zero_alone_saves_logs_and_every_rank_keeps_its_loader_state(two_rank_run):
    out, logs = two_rank_run["out"], two_rank_run["logs"]
    names = os.listdir(out)
    assert {"checkpoint-2", "checkpoint-4", "unet"} <= set(names), names
    assert not [n for n in names if n.startswith(".")], names  # the preflight's shared-folder token is gone
    for step in (2, 4):
        ckpt = os.path.join(out, f"checkpoint-{step}")
        states = [json.loads(read(os.path.join(ckpt, f"loader_state_rank{r}.json"))) for r in (0, 1)]
        assert [(s["rank"], s["world_size"], s["batches_consumed"]) for s in states] == [(0, 2, step), (1, 2, step)]
        assert {json.loads(read(os.path.join(ckpt, "trainer_state.json")))["global_step"]} == {step}
        assert len(glob.glob(os.path.join(ckpt, "unet", "*.safetensors"))) == 1
    rank0, rank1 = read(os.path.join(logs, "workerlog.0")), read(os.path.join(logs, "workerlog.1"))
    assert rank0.count("global_step: ") == 4 and "global_step: " not in rank1  # training log: rank 0 only
    assert "preflight: 2 ranks: 0@" in rank0 and "sharding by part" in rank0


def test_resume_under_two_ranks_continues_from_the_checkpoint(tmp_path, two_rank_run, same_image_data, jobs):
    """Cut the 4-step run back to its checkpoint-2 and resume it with 2 ranks: the same weights and the same
    per-rank loader positions as the run that never stopped."""
    out = str(tmp_path / "resumed")
    shutil.copytree(two_rank_run["out"], out)
    for name in ("checkpoint-4", "unet", "training_args.bin"):
        (shutil.rmtree if os.path.isdir(os.path.join(out, name)) else os.remove)(os.path.join(out, name))
    logs, launch_out = str(tmp_path / "log"), str(tmp_path / "launch.out")
    p = jobs.start(launch_cmd("--nproc_per_node", "2", "--log_dir", logs, TRAIN_PY) + train_flags(
        same_image_data, out, "--per_device_train_batch_size", str(B), "--max_steps", "4", "--save_steps", "2",
        "--dataloader_num_workers", "1"), launch_out)
    assert jobs.wait(p, 150, launch_out) == 0, tail(launch_out)
    for r in (0, 1):
        assert "resumed weights and loader position from" in read(os.path.join(logs, f"workerlog.{r}"))
    straight = os.path.join(two_rank_run["out"], "checkpoint-4")
    for r in (0, 1):
        name = f"loader_state_rank{r}.json"
        assert json.loads(read(os.path.join(out, "checkpoint-4", name))) == json.loads(read(os.path.join(straight,
                                                                                                         name)))
    assert json.loads(read(os.path.join(out, "checkpoint-4", "trainer_state.json")))["global_step"] == 4
    assert max_diff(unet(out), unet(two_rank_run["out"])) < 1e-6


PROBE = r'''
"""One rank of a real launch: the (part, line) of every record this rank's logical workers read."""
import itertools, json, sys
sys.path.insert(0, sys.argv[1])
import paddle.distributed as dist
from trainer.text_image_dataset import LoaderConfig, TextImageDataset

dist.init_parallel_env()
rank, world = dist.get_rank(), dist.get_world_size()  # what TrainingArguments.dataset_rank/_world_size return
result = {}
for workers, draws in ((1, 80), (3, 40)):  # 2 or 6 global readers for 4 parts: by part, then by line
    cfg = LoaderConfig(sys.argv[2], resolution=8, center_crop=True, shuffle_buffer_size=4)
    ds = TextImageDataset(cfg, None, 1, rank, world, workers)
    result[workers] = [[list(s.ref) for s in itertools.islice(ds.iter_samples(w), draws)] for w in range(workers)]
with open(f"{sys.argv[3]}.{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": world, "refs": result}, f)
dist.barrier()
'''


def test_ranks_read_disjoint_shards_that_cover_the_data(tmp_path, same_image_data, jobs):
    """Two real ranks started by paddle.distributed.launch build the training dataset from their launch
    environment; over an epoch their records ((part, line) of epoch 0) never overlap and together cover all."""
    probe, out = tmp_path / "probe.py", str(tmp_path / "refs")
    probe.write_text(PROBE)
    launch_out = str(tmp_path / "launch.out")
    p = jobs.start(launch_cmd("--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"), str(probe), ROOT,
                              same_image_data, out), launch_out)
    assert jobs.wait(p, 120, launch_out) == 0, tail(launch_out)
    got = [json.loads(read(f"{out}.{r}.json")) for r in (0, 1)]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    everything = {(part, line) for part in range(4) for line in range(16)}
    for workers in ("1", "3"):
        per_reader = [{(ref[2], ref[3]) for ref in refs if ref[1] == 0} for g in got for refs in g["refs"][workers]]
        assert all(per_reader), f"{workers} workers: a reader got nothing"
        assert sum(len(r) for r in per_reader) == len(everything), f"{workers} workers: readers overlap"
        assert set().union(*per_reader) == everything, f"{workers} workers: records missing"


def test_two_nodes_on_loopback_through_train_sh_write_one_checkpoint(tmp_path, same_image_data, jobs):
    """Two launch commands (train.sh --master --nnodes 2 --rank R, 1 process each) form one job: one set of model
    files and one loader state per rank in the checkpoint; samples and VisualDL logs from rank 0 only."""
    out, port = str(tmp_path / "out"), free_port()
    flags = train_flags(same_image_data, out, "--per_device_train_batch_size", str(B), "--max_steps", "2",
                        "--save_steps", "2", "--image_logging_steps", "2", "--num_inference_steps", "2",
                        "--report_to", "visualdl", "--dataloader_num_workers", "1")
    procs = [jobs.start(["sh", os.path.join(ROOT, "train.sh"), "--master", f"127.0.0.1:{port}", "--nnodes", "2",
                         "--rank", str(node), "--nproc_per_node", "1", "--log_dir", str(tmp_path / f"log{node}"),
                         *flags], str(tmp_path / f"node{node}.out")) for node in (0, 1)]
    for node, p in enumerate(procs):
        assert jobs.wait(p, 150, str(tmp_path / f"node{node}.out")) == 0, tail(str(tmp_path / f"node{node}.out"))
        assert "[preflight] ok: world: 2 ranks (2 node(s) x 1)" in read(str(tmp_path / f"node{node}.out"))
    ckpt = os.path.join(out, "checkpoint-2")
    assert sorted(glob.glob(os.path.join(ckpt, "loader_state_rank*.json"))) == [
        os.path.join(ckpt, f"loader_state_rank{r}.json") for r in (0, 1)]
    assert [json.loads(read(os.path.join(ckpt, f"loader_state_rank{r}.json")))["rank"] for r in (0, 1)] == [0, 1]
    for name in ("unet/config.json", "optimizer.pdopt", "trainer_state.json", ".complete"):
        assert os.path.exists(os.path.join(ckpt, name)), name
    assert len(glob.glob(os.path.join(ckpt, "unet", "*.safetensors"))) == 1
    assert len(glob.glob(os.path.join(out, "runs", "*", "vdlrecords*"))) == 1
    assert glob.glob(os.path.join(out, "samples", "step-0000002_samples_cfg7.5.png"))
    rank0, rank1 = (read(str(tmp_path / f"log{node}" / "workerlog.0")) for node in (0, 1))
    assert "logged reconstruction" in rank0 and "logged" not in rank1


def start_two_nodes(jobs, tmp_path, file_list: str, timeout_s: int = 8):
    """A long 2-node loopback job (1 process per node, a DataLoader worker each), once rank 0 trains."""
    port, out = free_port(), str(tmp_path / "out")
    flags = train_flags(file_list, out, "--per_device_train_batch_size", str(B), "--max_steps", "100000",
                        "--save_steps", "100000", "--dataloader_num_workers", "1")
    procs = [jobs.start(launch_cmd("--master", f"127.0.0.1:{port}", "--nnodes", "2", "--rank", str(node),
                                   "--nproc_per_node", "1", "--log_dir", str(tmp_path / f"log{node}"), TRAIN_PY,
                                   *flags), str(tmp_path / f"node{node}.out"), SD_RANK_TIMEOUT=str(timeout_s))
             for node in (0, 1)]
    log0 = str(tmp_path / "log0" / "workerlog.0")
    deadline = time.time() + 120
    while not (os.path.exists(log0) and "global_step: 2," in read(log0)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), tail(str(tmp_path / "node0.out"))
        time.sleep(0.5)
    return procs


def test_a_killed_rank_ends_the_job_on_every_node_and_is_named(tmp_path, same_image_data, jobs):
    """SIGKILL the rank-1 trainer (not a launcher) mid-run: both launchers exit non-zero within 60 s, the dead
    rank's node says which global rank died, and no process of the job is left (DataLoader workers included)."""
    procs = start_two_nodes(jobs, tmp_path, same_image_data)
    victim = rank_pid(procs[1].pid, 1)
    jobs.remember()
    job_pids = set(jobs.seen)
    assert len(job_pids) >= 6, job_pids  # 2 trainers, their DataLoader workers and death reporters at least
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    codes = [jobs.wait(p, 60, str(tmp_path / f"node{n}.out")) for n, p in enumerate(procs)]
    elapsed = time.time() - t0
    print(f"killed rank: job ended in {elapsed:.1f} s")
    assert all(c != 0 for c in codes), codes
    node1 = read(str(tmp_path / "node1.out"))
    assert "JOB: rank 1 of 2 on" in node1 and "died: its process ended without finishing" in node1
    deadline = time.time() + 10
    while [pid for pid in job_pids if alive(pid)] and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in job_pids if alive(pid)], "processes of the job outlived it"


def test_a_hung_rank_is_named_by_the_watchdog_and_the_job_ends(tmp_path, same_image_data, jobs):
    """SIGSTOP rank 1 (a frozen rank: no crash, no closed socket, its node's launcher sees nothing): rank 0's
    watchdog names it after SD_RANK_TIMEOUT and ends the job; once rank 1 runs again it ends too."""
    procs = start_two_nodes(jobs, tmp_path, same_image_data, timeout_s=8)
    victim = rank_pid(procs[1].pid, 1)
    t0 = time.time()
    os.kill(victim, signal.SIGSTOP)
    try:
        code0 = jobs.wait(procs[0], 40, str(tmp_path / "node0.out"))
        print(f"stopped rank: node 0 ended in {time.time() - t0:.1f} s")
    finally:
        os.kill(victim, signal.SIGCONT)
    code1 = jobs.wait(procs[1], 40, str(tmp_path / "node1.out"))
    assert code0 != 0 and code1 != 0
    node0, node1 = read(str(tmp_path / "node0.out")), read(str(tmp_path / "node1.out"))
    assert "JOB WATCHDOG (rank 0): rank 1 on" in node0 and "sent no heartbeat for" in node0
    # Resumed, rank 1 meets the closed job: its watchdog or (first) a gloo error ends it; either way it says so.
    assert "JOB WATCHDOG (rank 1):" in node1 or "JOB: rank 1 of 2 on" in node1


def test_output_dir_that_is_not_shared_stops_every_rank_with_a_clear_error(tmp_path, same_image_data, jobs):
    """A relative --output_dir resolves against each node's working directory: two different folders. Every
    rank stops at start with the message, before any checkpoint silently lacks files."""
    port, procs = free_port(), []
    for node in (0, 1):
        cwd = tmp_path / f"cwd{node}"
        cwd.mkdir()
        procs.append(jobs.start(launch_cmd("--master", f"127.0.0.1:{port}", "--nnodes", "2", "--rank", str(node),
                                           "--nproc_per_node", "1", "--log_dir", str(cwd / "log"), TRAIN_PY,
                                           *train_flags(same_image_data, "out", "--max_steps", "2")),
                                str(tmp_path / f"node{node}.out"), cwd=str(cwd)))
    for node, p in enumerate(procs):
        assert jobs.wait(p, 120, str(tmp_path / f"node{node}.out")) != 0
        log = read(str(tmp_path / f"cwd{node}" / "log" / "workerlog.0"))
        assert "PreflightError" in log and "output_dir out is not the same shared folder on every node" in log
    assert os.listdir(tmp_path / "cwd0" / "out") == []  # rank 0's token is removed again
