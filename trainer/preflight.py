"""Checks before a training job starts, and the watchdog that ends a job whose rank is gone.

Two callers:
- scripts/preflight.py, run by train.sh on each node before `paddle.distributed.launch`: the node-local checks
  below (data shards, /dev/shm, output_dir), so a bad setup fails once with one clear message instead of N
  times in N worker logs.
- train.py, inside every rank once the parallel env is up: rank_preflight() proves output_dir is one shared
  folder (rank 0 writes a token, every rank reads it back), that every rank sees the same data and resolved the
  same checkpoint, then starts a RankWatchdog. Its JobGuard.finish() marks a clean end.

Why a watchdog: paddle's launcher stops its own node's processes when one dies, but nothing tells the other
nodes; their ranks then wait in a collective until the gloo (30 s) or NCCL (much longer) timeout, with an error
that names no rank. Every rank heartbeats through the job's TCP store (hosted by rank 0); rank 0 watches all,
the others watch rank 0, and whoever sees a silent peer ends the whole job with a message naming it.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from data_tools.part_format import read_filelist_list
from trainer.sharding import BY_LINE, sharding_mode

logger = logging.getLogger("sd")

TIMEOUT_ENV = "SD_RANK_TIMEOUT"  # seconds without a heartbeat before a rank counts as gone
DEFAULT_TIMEOUT_S = 30.0
PEER_LOST_EXIT_CODE = 3
SHM_PATH = "/dev/shm"
PREFETCH_FACTOR = 2  # paddle.io.DataLoader's default: batches in flight per worker
TOKEN_WAIT_S = 10.0  # network file systems may show a new file to other clients with a short delay


class PreflightError(RuntimeError):
    """The job cannot run as configured; the message says what to change."""


@dataclass
class Finding:
    level: str  # "ok" | "warning" | "error"
    message: str


# ------------------------------------------------------------------------------------------------ node checks
def shard_findings(file_list: str, world_size: int, num_workers: int) -> List[Finding]:
    """How each source is split over the global readers (world_size x max(1, num_workers))."""
    G = world_size * max(1, num_workers)
    out = []
    for src in read_filelist_list(file_list):
        n = len(src.parts)
        if n == 0:
            out.append(Finding("warning", f"data: {src.filelist} lists no parts: it contributes nothing"))
        elif sharding_mode(n, G) == BY_LINE:
            out.append(Finding("warning", (
                f"data: {src.filelist} has {n} parts for {G} global readers ({world_size} ranks x "
                f"{max(1, num_workers)} workers): sharding by line (every reader opens every part and keeps 1 "
                f"line in {G}; correct, but each reader decodes {G}x more gzip). For sharding by part give it "
                f">= {G} parts (create_pretraining_data.py --per_part_file_num smaller).")))
        else:
            out.append(Finding("ok", f"data: {src.filelist}: {n} parts for {G} global readers: sharding by part"))
    return out


def shm_bytes_needed(local_procs: int, num_workers: int, batch_size: int, resolution: int,
                     model_max_length: int = 77) -> int:
    """Shared memory the DataLoaders of one node hold at once: every worker's batches in flight (float32
    pixels + int64 token ids), plus the batch being consumed, per process. 0 without workers (no shm used)."""
    if num_workers <= 0:
        return 0
    batch = batch_size * (3 * resolution * resolution * 4 + model_max_length * 8)
    return local_procs * (PREFETCH_FACTOR * num_workers + 1) * batch


def shm_finding(free: Optional[int], needed: int, local_procs: int, num_workers: int) -> Finding:
    if needed == 0:
        return Finding("ok", "shm: no DataLoader workers (--dataloader_num_workers 0): no shared memory needed")
    if free is None:
        return Finding("warning", f"shm: {SHM_PATH} does not exist: paddle DataLoader workers may fail")
    what = (f"{SHM_PATH} has {free / 2**20:.0f} MiB free; {local_procs} process(es) x {num_workers} DataLoader "
            f"workers need about {needed / 2**20:.0f} MiB")
    fix = (f"Give the container more (docker run --shm-size={max(1, -(-2 * needed // 2**30))}g, or Kubernetes "
           "an emptyDir with medium: Memory on /dev/shm) or lower --dataloader_num_workers.")
    if free < needed:
        return Finding("error", f"shm: {what}: workers would die with a bus error mid-run. {fix}")
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


def data_signature(file_list: str) -> str:
    """What a rank reads, condensed: its sources, weights and part paths. Equal on every rank of a good job."""
    h = hashlib.sha256()
    for src in read_filelist_list(file_list):
        h.update(f"{src.filelist}|{src.weight}|{'|'.join(src.parts)}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ in-rank
@dataclass
class RankReport:
    """What one rank found; gathered on every rank so that all of them judge the same table."""

    rank: int
    host: str
    pid: int
    checkpoint: Optional[str]
    data: str  # data_signature, or "error: ..." when this rank cannot read the data
    problems: List[str] = field(default_factory=list)


def host_label() -> str:
    ip = os.environ.get("PADDLE_CURRENT_ENDPOINT", "").rsplit(":", 1)[0]
    return f"{socket.gethostname()} ({ip})" if ip else socket.gethostname()


def judge_reports(reports: List[RankReport], output_dir: str) -> List[str]:
    """Problems of the job as a whole, worst first; [] when every rank agrees with rank 0."""
    first = reports[0]
    where: Dict[str, List[str]] = {}  # one line per distinct problem: 8 ranks of a node share their /dev/shm
    for r in reports:
        for p in r.problems:
            where.setdefault(p, []).append(f"{r.rank}@{r.host}")
    problems = [f"{p} (rank {', '.join(ranks)})" for p, ranks in where.items()]
    for r in reports[1:]:
        if r.data != first.data:
            problems.append(
                f"rank {r.rank} on {r.host} sees other data than rank 0 on {first.host} ({r.data} vs {first.data}): "
                "every node needs the same --file_list, filelists and part paths (same mount points).")
        if r.checkpoint != first.checkpoint:
            problems.append(
                f"rank {r.rank} on {r.host} would resume from {r.checkpoint} but rank 0 on {first.host} from "
                f"{first.checkpoint}: output_dir {output_dir} is not the same shared folder on every node.")
    return problems


def rank_preflight(args, data_args, checkpoint: Optional[str]) -> "JobGuard":
    """Run in every rank right after resolve_checkpoint(). Raises PreflightError on every rank alike."""
    import paddle.distributed as dist

    install_worker_reaper()
    world, rank = dist.get_world_size(), dist.get_rank()
    report = RankReport(rank, host_label(), os.getpid(), checkpoint, "")
    try:
        report.data = data_signature(data_args.file_list)
    except (OSError, ValueError) as e:  # reported in the gathered table, so that every rank stops together
        report.data = f"error: {e}"
        report.problems.append(f"cannot read the data: {e}")
    local_procs = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))
    needed = shm_bytes_needed(local_procs, args.dataloader_num_workers, args.per_device_train_batch_size,
                              data_args.resolution)
    shm = shm_finding(free_shm_bytes(), needed, local_procs, args.dataloader_num_workers)
    if shm.level == "error":
        report.problems.append(shm.message)
    elif shm.level == "warning":
        logger.warning("preflight: %s", shm.message)
    if world == 1:
        out = output_dir_finding(args.output_dir)
        problems = report.problems + ([out.message] if out.level == "error" else [])
        if problems:
            raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))
        return JobGuard(None)

    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    watchdog = RankWatchdog(rank, world, timeout)  # first, so that a rank missing below is named, not waited for
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
        for f in shard_findings(data_args.file_list, args.dataset_world_size, args.dataloader_num_workers):
            (logger.warning if f.level != "ok" else logger.info)("preflight: %s", f.message)
        logger.info("preflight: %d ranks: %s; watchdog timeout %.0f s (%s)", world,
                    ", ".join(f"{r.rank}@{r.host} pid {r.pid}" for r in reports), timeout, TIMEOUT_ENV)
    return JobGuard(watchdog)


def _check_shared_output_dir(output_dir: str, rank: int, report: RankReport, dist) -> None:
    """Rank 0 writes a fresh token under output_dir; every rank must read it back there. Runs after every rank
    has passed resolve_checkpoint (which lists output_dir): the collectives below order it so."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(output_dir, f".shared-folder-check-{token[0]}")
    status = [None]
    if rank == 0:
        out = output_dir_finding(output_dir)
        if out.level == "error":
            status = [out.message]
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(token[0])
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:  # rank 0 cannot write there: its report says why, the others just stop
        if rank == 0:
            report.problems.append(status[0])
        return
    deadline = time.monotonic() + TOKEN_WAIT_S
    while not os.path.isfile(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            seen = f.read()
    if seen != token[0]:
        found = "not found" if seen is None else "other content"
        report.problems.append(
            f"output_dir {output_dir} is not the same shared folder on every node: this rank cannot read "
            f"{os.path.basename(path)}, written there by rank 0 just now ({found}). Put output_dir on storage "
            "every node mounts at the same path (NFS, CephFS, Lustre, ...) and use absolute paths; else "
            "checkpoints would silently lack the files of the ranks that cannot see it.")
    dist.barrier()  # every rank has read the token before rank 0 removes it
    if rank == 0:
        os.remove(path)


# ------------------------------------------------------------------------------------------------ watchdog
# Run by a tiny child interpreter per rank (no paddle import): it holds the read end of a pipe whose write end
# only this rank holds; EOF without a word means the rank vanished (SIGKILL, OOM killer, native crash), which the
# rank itself can no longer say. The line lands in the rank's own log, which its launcher prints on failure.
_DEATH_REPORTER = r"""
import sys
if not sys.stdin.buffer.read(1):
    sys.stderr.write("JOB: " + sys.argv[1] + " died: its process ended without finishing and without a Python "
                     "error: killed by a signal (SIGKILL, the OOM killer) or aborted in native code (e.g. a "
                     "collective failing because another rank died: see the lines above)\n")
"""


class RankWatchdog:
    """Heartbeats through the job's TCP store; ends this process when a peer is gone or the job aborts.

    Keys: beat/<r> (counter), done/<r> (clean end), abort + abort_msg (whoever ends the job). Rank 0 watches every
    rank, the others watch rank 0 and the abort flag: O(world) store calls per interval in all. All store calls
    happen in the watchdog thread, with SIGCHLD blocked: paddle's C++ store does not retry a call interrupted by
    a signal (DataLoader workers and the death reporter exiting send SIGCHLD). The thread runs while the main
    thread waits in a collective (paddle releases the GIL there), and os._exit ends the process even then."""

    PREFIX = "sd_watchdog"

    def __init__(self, rank: int, world: int, timeout: float):
        if timeout <= 0:
            raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {timeout}")
        self.rank, self.world, self.timeout = rank, world, timeout
        self.interval = min(2.0, timeout / 5)
        self.hosts = ["?"] * world
        self._wake, self._handled = threading.Event(), threading.Event()
        self._dying, self._settling = threading.Lock(), threading.Lock()
        self._request: Optional[tuple] = None  # ("finish",) | ("fail", message) | ("quiet",), from the main thread
        self._last_ok = time.monotonic()
        self._store = None
        self._report_fd = -1

    def _key(self, *parts) -> str:
        return "/".join((self.PREFIX,) + tuple(str(p) for p in parts))

    def _peer(self, p: int) -> str:
        return f"rank {p} on {self.hosts[p]}"

    def start(self) -> None:
        read_fd, self._report_fd = os.pipe()
        label = (f"rank {self.rank} of {self.world} on {host_label()} (local rank "
                 f"{os.environ.get('PADDLE_LOCAL_RANK', '?')}, pid {os.getpid()})")
        self._reporter = subprocess.Popen([sys.executable, "-c", _DEATH_REPORTER, label], stdin=read_fd)
        os.close(read_fd)
        _close_in_children.add(self._report_fd)  # a forked DataLoader worker must not keep the pipe open
        atexit.register(self._at_exit)
        for target in (self._loop, self._stall_check):
            threading.Thread(target=target, name=f"sd-watchdog{target.__name__}", daemon=True).start()

    # ---------------------------------------------------------------------------------------- main thread
    def _ask(self, *request, wait: float) -> None:
        self._settle()
        self._request = request
        self._wake.set()
        self._handled.wait(wait)

    def _settle(self) -> None:
        """Tell the death reporter this rank ends knowingly (it then stays silent)."""
        with self._settling:  # the main thread and the watchdog thread may both get here
            if self._report_fd >= 0:
                os.write(self._report_fd, b"x")
                os.close(self._report_fd)
                _close_in_children.discard(self._report_fd)
                self._report_fd = -1

    def finish(self) -> None:
        """A clean end of this rank. Rank 0 hosts the store, so it waits (bounded) until the others are done."""
        self._ask("finish", wait=self.timeout + 10)

    def stand_down(self) -> None:
        """Stop watching without telling the other ranks (all of them raise the same preflight error)."""
        self._ask("quiet", wait=self.timeout)

    def _at_exit(self) -> None:
        """An exit without finish(): a Python error (its traceback is in this log) or sys.exit. Tell the others
        now rather than letting them wait for the timeout."""
        if self._request is None:
            err = getattr(sys, "last_value", None)  # set by the interpreter for an uncaught exception
            why = f"{type(err).__name__}: {err}" if err is not None else "exited without finishing (see its log)"
            self._ask("fail", f"{self._peer(self.rank)} failed: {why}", wait=10)

    # ---------------------------------------------------------------------------------------- watchdog thread
    def _connect(self) -> None:
        from paddle.base import core

        # An own connection: the process group's store client is not safe to share across threads.
        host, port = _master_endpoint()
        self._store = core.TCPStore(host, port, False, 0, 10)

    def _call(self, op: str, key: str, *value):
        """A store call; a failed one is retried once on a fresh connection (the old one may be mid-reply)."""
        for attempt in (0, 1):
            try:
                return getattr(self._store, op)(key, *value)
            except (ValueError, RuntimeError, OSError) as e:  # what paddle's store raises
                if attempt:
                    raise
                logger.warning("watchdog: store call failed (%s): reconnecting", e)
                self._connect()

    def _loop(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        watched = list(range(1, self.world)) if self.rank == 0 else [0]
        seen: Dict[int, tuple] = {p: (-1, time.monotonic()) for p in watched}
        try:
            self._connect()
            while self._request is None:
                self._beat(watched, seen)
                self._last_ok = time.monotonic()
                self._wake.wait(self.interval)
            if self._request[0] == "fail":
                self._call("set", self._key("abort_msg"), self._request[1].encode())
                self._call("add", self._key("abort"), 1)
            elif self._request[0] == "finish":
                self._call("add", self._key("done", self.rank), 1)
                deadline = time.monotonic() + self.timeout
                while watched and self.rank == 0 and time.monotonic() < deadline:
                    watched = [p for p in watched if self._call("add", self._key("done", p), 0) == 0]
                    time.sleep(0.2 if watched else 0)
                if watched and self.rank == 0:
                    logger.warning("ranks %s did not finish within %.0f s after rank 0", watched, self.timeout)
        except (ValueError, RuntimeError, OSError) as e:
            if self._request is None:
                self._die(f"lost the job's store on {self._peer(0)}: rank 0 died or its node is unreachable ({e})")
            logger.error("watchdog: could not tell the other ranks (%s)", e)
        finally:
            self._handled.set()

    def _beat(self, watched: List[int], seen: Dict[int, tuple]) -> None:
        self._call("add", self._key("beat", self.rank), 1)
        if self._call("add", self._key("abort"), 0) > 0:
            self._die(f"the job is ending: {self._call('get', self._key('abort_msg')).decode(errors='replace')}")
        now = time.monotonic()
        for p in watched:
            if self._call("add", self._key("done", p), 0) > 0:
                continue
            beats = self._call("add", self._key("beat", p), 0)
            if beats != seen[p][0]:
                seen[p] = (beats, now)
            elif now - seen[p][1] > self.timeout:
                msg = (f"{self._peer(p)} {'never sent' if beats == 0 else 'sent no'} heartbeat for "
                       f"{now - seen[p][1]:.0f} s: its process died, hangs, or its node is unreachable (see that "
                       f"node's log); ended by rank {self.rank}")
                self._call("set", self._key("abort_msg"), msg.encode())
                self._call("add", self._key("abort"), 1)
                self._die(msg)

    def _stall_check(self) -> None:
        # A store call to a node that vanished (no TCP reset) can block forever: judge from outside the loop.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while not self._handled.wait(self.interval):
            if self._request is None and time.monotonic() - self._last_ok > self.timeout + 2 * self.interval:
                self._die(f"no answer from the job's store on {self._peer(0)} for {self.timeout:.0f} s: rank 0's "
                          "node is unreachable or hangs")

    def _die(self, message: str) -> None:
        if not self._dying.acquire(blocking=False):  # the other thread is already ending the process
            threading.Event().wait()
        logger.error("JOB WATCHDOG (rank %d): %s. Ending this rank (exit %d) so that the launcher stops the job "
                     "instead of waiting in a collective.", self.rank, message, PEER_LOST_EXIT_CODE)
        self._settle()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PEER_LOST_EXIT_CODE)  # the main thread may be blocked in C++: no exception could reach it


def _master_endpoint():
    """The job store's address, by paddle.distributed.init_parallel_env's own rule."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        ep = os.environ.get("PADDLE_MASTER") or os.environ["PADDLE_TRAINER_ENDPOINTS"].split(",")[0]
        addr, port = ep.rsplit(":", 1)
    return addr, int(port)


@dataclass
class JobGuard:
    """Returned by rank_preflight; call finish() once training and saving are done."""

    watchdog: Optional[RankWatchdog]

    def finish(self) -> None:
        if self.watchdog is not None:
            self.watchdog.finish()


# ------------------------------------------------------------------------------------------------ worker reaper
_reaper_installed = False
_fork_parent = {"pid": 0, "main_thread": False}
_close_in_children: set = set()  # fds a forked child must not inherit (the death reporter's pipe)


def install_worker_reaper() -> None:
    """Make processes forked by this rank's main thread (paddle DataLoader workers) die with it. Without it a
    SIGKILLed rank leaves its workers blocked forever on a full queue, holding /dev/shm and the rank's
    sockets (which also hides the death from the other ranks). Linux only; forks from other threads are left
    alone, since PR_SET_PDEATHSIG fires when the forking *thread* ends."""
    global _reaper_installed
    if _reaper_installed or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def before() -> None:
        _fork_parent["pid"] = os.getpid()
        _fork_parent["main_thread"] = threading.current_thread() is threading.main_thread()

    def in_child() -> None:
        for fd in _close_in_children:
            os.close(fd)
        _close_in_children.clear()
        if _fork_parent["main_thread"]:
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != _fork_parent["pid"]:  # the parent died before prctl took effect
                os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)
    _reaper_installed = True
