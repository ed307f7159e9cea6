"""Launch safety without launching: the node checks (trainer/launch/node_checks.py) on real files and real flag
parsing, the in-job verdict over rank reports, and die_with_parent (trainer/launch/reaper.py) with real processes
whose parent is killed. The real multi-process jobs are tests/test_distributed.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT, records, write_filelist_list, write_source
from sd.config import parse_args
from trainer.launch.node_checks import (LaunchArguments, device_findings, node_findings, output_dir_finding,
                                        probe_output_dir, read_data_layout, resolve_launch, shard_findings,
                                        shm_bytes_needed, shm_finding)
from trainer.launch.rank_checks import RankReport, judge_reports
from trainer.launch.reaper import ORPHAN_EXIT_CODE


def plan(**flags):
    return resolve_launch(LaunchArguments(**flags))


def levels(findings):
    return [f.level for f in findings]


# ------------------------------------------------------------------------------------------------ launch flags
@pytest.mark.unit
def test_every_launch_flag_of_before_is_accepted_and_devices_is_gpus():
    with open(os.path.join(ROOT, "tests", "golden", "entry_flags.json"), encoding="utf-8") as f:
        golden = json.load(f)["entries"]["scripts/preflight.py"]
    values = {"--gpus": "0,1", "--devices": "0,1", "--nproc_per_node": "2", "--rank": "1", "--ips": "a,b"}
    # train.sh passes these too (its launch case list): the launcher's own, which the preflight must tolerate
    extra = {"--master": "10.0.0.1:29500", "--nnodes": "2", "--host": "10.0.0.2", "--log_dir": "log",
             "--job_id": "sd", "--start_port": "6070"}
    argv = [x for flag in sorted(set(golden) | set(extra)) if flag != "--ips"
            for x in (flag, {**values, **extra}[flag])]
    (args,) = parse_args([LaunchArguments], argv)
    p = resolve_launch(args)
    assert (p.gpus, p.nnodes, args.rank, args.start_port, args.log_dir) == (("0", "1"), 2, 1, 6070, "log")
    (args,) = parse_args([LaunchArguments], ["--devices=2,3", "--ips", "10.0.0.1, 10.0.0.2"])
    assert (resolve_launch(args).gpus, resolve_launch(args).ips) == (("2", "3"), ("10.0.0.1", "10.0.0.2"))


@pytest.mark.unit
@pytest.mark.parametrize("flags, message", [
    ({"nproc_per_node": 0}, "--nproc_per_node must be >= 1, got 0"),
    ({"nnodes": "2:4"}, "--nnodes must be a number of nodes >= 1, got '2:4'"),
    ({"nnodes": "3", "ips": "a,b"}, "--nnodes 3 but --ips lists 2 nodes"),
    ({"master": "10.0.0.1"}, "--master must be IP:PORT, got '10.0.0.1'"),
    ({"master": "10.0.0.1:70000"}, "--master must be IP:PORT"),
    ({"rank": 1}, "--rank needs --master IP:PORT"),
    ({"rank": 2, "master": "h:1", "nnodes": "2"}, "--rank 2 is not in [0, --nnodes 2)"),
    ({"gpus": "0,1", "devices": "2"}, "--gpus 0,1 and --devices 2 disagree"),
])
def test_bad_launch_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LaunchArguments(**flags)


# ------------------------------------------------------------------------------------------------ devices, nodes
@pytest.mark.unit
def test_device_findings():
    n, found = device_findings(plan(gpus="0,1"), 0, None, 8)
    assert n == 2 and levels(found) == ["error"] and "paddle sees no CUDA GPU" in found[0].message
    n, found = device_findings(plan(gpus="0,5,5", nproc_per_node=2), 4, None, 8)
    assert n == 3 and levels(found) == ["error", "error", "ok"]
    assert "ids must be distinct visible GPUs (visible: 0,1,2,3" in found[0].message
    assert "--nproc_per_node 2 disagrees with --gpus 0,5,5" in found[1].message
    assert device_findings(plan(gpus="4,6"), 2, ["4", "6"], 8)[1][0].level == "ok"  # CUDA_VISIBLE_DEVICES labels
    n, found = device_findings(plan(), 4, None, 8)
    assert n == 4 and found[-1].message == "devices: 4 GPU processes (NCCL)"  # paddle's default: every GPU
    assert levels(device_findings(plan(nproc_per_node=5), 4, None, 8)[1]) == ["error", "ok"]
    n, found = device_findings(plan(nproc_per_node=2), 0, None, 2, "1")
    assert n == 2 and levels(found) == ["ok"] and "2 CPU process(es) of 1 OpenMP thread(s) on 2 cores" in \
        found[0].message
    n, found = device_findings(plan(nproc_per_node=2), 0, None, 2, "2")
    assert levels(found) == ["ok", "warning"] and "oversubscribed" in found[1].message and \
        "OMP_NUM_THREADS=1 fits" in found[1].message


@pytest.mark.unit
def test_node_findings_this_node_in_ips():
    ips = "10.0.0.1,10.0.0.2"
    found = node_findings(plan(ips=ips), "10.0.0.9")
    assert levels(found) == ["error", "ok"]
    assert "(10.0.0.9) is not in --ips 10.0.0.1,10.0.0.2: paddle would make it node 0 as well" in found[0].message
    assert levels(node_findings(plan(ips=ips), "10.0.0.2")) == ["ok"]
    assert node_findings(plan(ips="10.0.0.1"), "10.0.0.9") == []  # one node: the list is not consulted
    assert levels(node_findings(plan(nnodes="2"), "10.0.0.9")) == ["warning", "ok"]  # no --master
    assert levels(node_findings(plan(master="10.0.0.1:1", nnodes="2", rank=1), "10.0.0.2")) == ["ok"]


# ------------------------------------------------------------------------------------------------ shm, output_dir
@pytest.mark.unit
def test_shm_check_gives_numbers_and_the_fix():
    needed = shm_bytes_needed(8, 4, 8, 512)  # 8 GPUs x 4 workers, batch 8 at 512 px: (2 x 4 + 1) batches each
    assert needed == 8 * 9 * 8 * (3 * 512 * 512 * 4 + 77 * 8)
    small = shm_finding(64 * 2**20, needed, 8, 4)  # docker's default --shm-size
    assert small.level == "error" and "/dev/shm has 64 MiB free; 8 process(es) x 4 DataLoader workers need" in \
        small.message and "--shm-size=4g" in small.message and "lower --dataloader_num_workers" in small.message
    assert [shm_finding(free, needed, 8, 4).level for free in (needed + 1, 3 * needed)] == ["warning", "ok"]
    assert shm_finding(0, shm_bytes_needed(8, 0, 8, 512), 8, 0).level == "ok"  # no workers: no shm
    assert shm_finding(None, needed, 8, 4).level == "warning"


@pytest.mark.unit
def test_output_dir_probe(tmp_path):
    new = tmp_path / "a" / "b"
    found = output_dir_finding(str(new))
    assert found.level == "ok" and os.listdir(new) == []  # created, and the probe file removed again
    assert probe_output_dir(str(new), "token", "abc") is None and (new / "token").read_text() == "abc"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    # root ignores modes: /proc/self is a folder in which nobody can create a file
    ro = "/proc/self" if os.geteuid() == 0 else str(read_only)
    for bad in (str(a_file), str(a_file / "sub"), ro):
        found = output_dir_finding(bad)
        assert found.level == "error" and found.message.startswith(f"output_dir {bad} is not writable: "), bad


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.unit
def test_shard_findings_and_signature_on_a_real_file_list(tmp_path):
    four = write_source(str(tmp_path), "four", [records(f"p{i}", 2) for i in range(4)])
    empty = write_source(str(tmp_path), "empty", [])
    fl = write_filelist_list(str(tmp_path / "train.filelist.list"), [(four, None), (empty, 2.0)])
    by_part = shard_findings(read_data_layout(fl, 2, 2))
    assert levels(by_part) == ["ok", "warning"]
    assert by_part[0].message.endswith("four.filelist: 4 parts for 4 global readers: sharding by part")
    assert "empty.filelist lists no parts: it contributes nothing" in by_part[1].message
    by_line = shard_findings(read_data_layout(fl, 2, 3))[0]
    assert by_line.level == "warning" and "has 4 parts for 6 global readers (2 ranks x 3 workers): sharding by " \
        "line" in by_line.message and ">= 6 parts" in by_line.message
    alone = shard_findings(read_data_layout(fl, 5, 0))[0]  # 0 workers: the main process reads, 1 reader a rank
    assert "for 5 global readers (5 ranks x 1 workers)" in alone.message
    same = read_data_layout(fl, 2, 2).signature
    assert read_data_layout(fl, 8, 0).signature == same  # what is read, not how it is split
    write_filelist_list(fl, [(four, None), (empty, 3.0)])
    assert read_data_layout(fl, 2, 2).signature != same
    os.remove(os.path.join(os.path.dirname(four), "..", "laion400m_format_data", "part-000002"))
    with pytest.raises(FileNotFoundError, match="part not found: .*part-000002"):
        read_data_layout(fl, 2, 2)


@pytest.mark.unit
def test_rank_reports_are_judged_alike_on_every_rank():
    assert judge_reports([RankReport(r, f"n{r}", r, "/out/checkpoint-2", "abc") for r in (0, 1)], "/out") == []
    bad = [RankReport(0, "node0", 1, "/out/checkpoint-2", "abc"), RankReport(1, "node1", 2, None, "abd"),
           RankReport(2, "node1", 3, None, "abc", ["no share"]), RankReport(3, "node1", 4, None, "abc", ["no share"])]
    problems = judge_reports(bad, "/out")
    assert problems[0] == "no share (rank 2@node1, 3@node1)"  # one line for the ranks of a node
    assert any("rank 1 on node1 sees other data than rank 0" in p for p in problems)
    assert sum("output_dir /out is not the same shared folder on every node" in p for p in problems) == 3


# ------------------------------------------------------------------------------------------------ die_with_parent
# A parent that starts a helper and prints the helper's pid, then sleeps until killed. The helper ends itself
# through die_with_parent (prctl when the watched process is its parent, polling when it is its grandparent, the
# fork hook for a fork of the main thread) and otherwise would sleep for a minute.
PARENT = textwrap.dedent(r'''
    import os, subprocess, sys, time
    from trainer.launch.reaper import die_with_parent, install_worker_reaper
    mode, me = sys.argv[1], os.getpid()
    helper = f"import time; from trainer.launch.reaper import die_with_parent; die_with_parent({me}); time.sleep(60)"
    if mode == "direct":
        pid = subprocess.Popen([sys.executable, "-c", helper]).pid
    elif mode == "grandparent":  # the watched process is not the parent, as for a forkserver's pool workers
        middle = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
                  "stdout=subprocess.DEVNULL).pid)")
        pid = int(subprocess.run([sys.executable, "-c", middle, helper], stdout=subprocess.PIPE, text=True).stdout)
    else:
        install_worker_reaper()
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
    print(pid, flush=True)
    time.sleep(60)
''')


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


@pytest.mark.smoke
@pytest.mark.parametrize("mode", ["direct", "grandparent", "fork_hook"])
def test_a_helper_dies_with_the_process_it_watches(mode):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    helper = 0
    try:
        helper = int(parent.stdout.readline())
        time.sleep(1.0)  # the helper is up and watching
        assert not gone(helper), "the helper ended while its parent lives"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 3
        while not gone(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(helper), f"{mode}: the helper outlived the process it watches"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if helper and not gone(helper):
            os.kill(helper, signal.SIGKILL)


@pytest.mark.smoke
def test_a_helper_whose_parent_is_already_gone_exits_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    proc = subprocess.run([sys.executable, "-c", "import time; from trainer.launch.reaper import die_with_parent; "
                           f"die_with_parent({dead.pid}); time.sleep(60)"], cwd=ROOT, timeout=30)
    assert proc.returncode == ORPHAN_EXIT_CODE


# A rank in miniature: the fork hook and a death reporter, then a fork that leaves a batch-like file in /dev/shm
# (named as paddle names a DataLoader worker's) and sleeps; the rank prints the fork's pid and file, then waits.
RANK = textwrap.dedent(r'''
    import os, sys, time
    from trainer.launch.reaper import DeathReporter, install_worker_reaper
    install_worker_reaper()
    reporter = DeathReporter("rank 9 of 10 in a test")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        path = f"/dev/shm/paddle_{os.getpid()}_0_test"
        open(path, "wb").close()
        os.write(write_end, path.encode())
        time.sleep(60)
        os._exit(0)
    print(pid, os.read(read_end, 4096).decode(), flush=True)
    time.sleep(60)
''')


@pytest.mark.smoke
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this OS")
def test_a_killed_rank_is_reported_and_its_fresh_workers_batches_removed():
    """SIGKILL a rank right after it forked a worker (well inside any polling period: the worker is known because
    it reported itself on fork): the death reporter says so in the rank's stderr and removes the worker's file."""
    rank = subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    worker, path = rank.stdout.readline().split()
    try:
        assert os.path.exists(path)
        rank.send_signal(signal.SIGKILL)
        rank.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(path), "the killed rank's worker left its batch in /dev/shm"
        assert gone(int(worker)), "the worker outlived its rank"
        assert "JOB: rank 9 of 10 in a test died: its process ended without finishing" in rank.stderr.read()
    finally:
        if os.path.exists(path):
            os.remove(path)
