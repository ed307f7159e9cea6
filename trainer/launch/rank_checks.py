"""The checks a training job can only make once it runs, and the watchdog that ends a job whose rank is gone.
The checks of one node before the launch (devices, nodes, data shards, /dev/shm, output_dir) are in
scripts/preflight.py, which train.sh runs.

train.py calls rank_preflight() in every rank once the parallel env is up: output_dir must be one shared folder
(rank 0 writes a token, every rank reads it back), every rank must see the same data and resolve the same
checkpoint. It then starts a RankWatchdog; JobGuard.finish() marks the clean end.

Why a watchdog: paddle's launcher stops its own node's processes when one dies, but nothing tells the other
nodes; their ranks wait in a collective until the gloo (30 s) or NCCL (far longer) timeout, with an error that
names no rank. Every rank heartbeats through the job's TCP store (hosted by rank 0); rank 0 watches all, the
others watch rank 0, and whoever sees a silent peer ends the whole job with a message naming it.
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

logger = logging.getLogger("sd")

TIMEOUT_ENV = "SD_RANK_TIMEOUT"  # seconds without a heartbeat before a rank counts as gone
DEFAULT_TIMEOUT_S = 30.0
PEER_LOST_EXIT_CODE = 3
TOKEN_WAIT_S = 5.0  # some shared file systems show a new file to other clients with a delay
STORE_ERRORS = (ValueError, RuntimeError, OSError)  # what paddle's TCPStore raises


class PreflightError(RuntimeError):
    """The job cannot run as configured; the message says what to change."""


# ------------------------------------------------------------------------------------------------ in-rank
def data_signature(file_list: str) -> str:
    """What a rank reads, condensed: sources, weights and part paths. Equal on every rank of a good job."""
    h = hashlib.sha256()
    for src in read_filelist_list(file_list):
        h.update(f"{src.filelist}|{src.weight}|{'|'.join(src.parts)}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class RankReport:
    """What one rank found; gathered on every rank, so that all of them judge the same table."""

    rank: int
    host: str
    pid: int
    checkpoint: Optional[str]
    data: str = ""  # data_signature, or "error: ..." when this rank cannot read the data
    problems: List[str] = field(default_factory=list)


def host_label() -> str:
    ip = os.environ.get("PADDLE_CURRENT_ENDPOINT", "").rsplit(":", 1)[0]
    return f"{socket.gethostname()} ({ip})" if ip else socket.gethostname()


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


def rank_preflight(args, data_args, checkpoint: Optional[str]) -> "JobGuard":
    """Run in every rank right after resolve_checkpoint(). Raises PreflightError on every rank alike."""
    import paddle.distributed as dist

    install_worker_reaper()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:  # nothing to compare: a single process reports its own problems as they come
        return JobGuard(None)
    report = RankReport(rank, host_label(), os.getpid(), checkpoint)
    try:
        report.data = data_signature(data_args.file_list)
    except (OSError, ValueError) as e:  # into the gathered table, so that every rank stops together
        report.data = f"error: {e}"
        report.problems.append(f"cannot read the data: {e}")
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
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
    path, status = os.path.join(output_dir, name), [None]
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(token[0])
        except OSError as e:
            status = [f"output_dir {output_dir} is not writable: {e}"]
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


# ------------------------------------------------------------------------------------------------ watchdog
# Run by a tiny child interpreter per rank (no paddle import), on the read end of a pipe only the rank writes to.
# The rank's last word: f(inished), q(uiet: preflight error). Anything else is an abnormal end: EOF without a
# word means the rank vanished (SIGKILL, OOM killer, native abort), which it can no longer say itself, so this
# says it, in the rank's own log, which its launcher prints. Then, once the rank and its DataLoader workers are
# gone, it removes the batches the workers left in /dev/shm: their only reader is dead, and a crash per run
# would otherwise fill /dev/shm (GBs at SD scale) until the next run dies with a bus error.
_DEATH_REPORTER = r"""
import contextlib, glob, os, select, sys, time
rank, kids, word = os.getppid(), set(), b""
while not select.select([0], [], [], 1.0)[0]:  # meanwhile, note the rank's children (its DataLoader workers)
    tasks = os.listdir(f"/proc/{rank}/task") if os.path.isdir(f"/proc/{rank}/task") else []
    for tid in tasks:
        with contextlib.suppress(OSError):  # a thread that ends while we look has no children to note
            with open(f"/proc/{rank}/task/{tid}/children") as f:
                kids.update(int(k) for k in f.read().split() if int(k) != os.getpid())
word = os.read(0, 1)
if word in (b"f", b"q"):
    sys.exit(0)
if not word:
    sys.stderr.write("JOB: " + sys.argv[1] + " died: its process ended without finishing and without a Python "
                     "error: killed by a signal (SIGKILL, the OOM killer) or aborted in native code (e.g. a "
                     "collective failing because another rank died: see the lines above)\n")
    sys.stderr.flush()
deadline = time.time() + 30
while time.time() < deadline and (os.getppid() == rank or any(os.path.exists(f"/proc/{k}") for k in kids)):
    time.sleep(0.2)
for path in (p for k in kids for p in glob.glob(f"/dev/shm/paddle_{k}_*")):
    with contextlib.suppress(FileNotFoundError):  # already removed by paddle
        os.remove(path)
"""


class RankWatchdog:
    """Heartbeats through the job's TCP store; ends this process when a peer is gone or the job aborts.

    Keys: beat/<r> (counter), done/<r> (clean end), abort + abort_msg (whoever ends the job). Rank 0 watches every
    rank, the others rank 0 and the abort flag: O(world) store calls per interval in all. Every store call is made
    by the watchdog thread with SIGCHLD blocked, since paddle's store does not retry a call a signal interrupted
    (exiting DataLoader workers send SIGCHLD). The thread runs while the main thread waits in a collective
    (paddle releases the GIL there), and os._exit ends the process even then."""

    PREFIX = "sd_watchdog"

    def __init__(self, rank: int, world: int, timeout: float):
        if timeout <= 0:
            raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {timeout}")
        self.rank, self.world, self.timeout = rank, world, timeout
        self.interval = min(2.0, timeout / 5)
        self.hosts = ["?"] * world
        self._wake, self._handled = threading.Event(), threading.Event()
        self._dying, self._settling = threading.Lock(), threading.Lock()
        self._request: Optional[tuple] = None  # ("finish",) | ("quiet",) | ("fail", message): from the main thread
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
    def finish(self) -> None:
        """A clean end of this rank. Rank 0 hosts the store, so it waits (bounded) until the others are done."""
        self._ask("finish", word=b"f", wait=self.timeout + 10)

    def stand_down(self) -> None:
        """Stop without telling the other ranks (all of them raise the same preflight error)."""
        self._ask("quiet", word=b"q", wait=self.timeout)

    def _at_exit(self) -> None:
        """An exit without finish(): a Python error (its traceback is in this log) or sys.exit. Tell the others
        now instead of letting them wait for the timeout."""
        if self._request is None:
            err = getattr(sys, "last_value", None)  # set by the interpreter for an uncaught exception
            why = (f"{type(err).__name__}: {err}".rstrip(": ") if err is not None
                   else "exited without finishing (see its log)")
            self._ask("fail", f"{self._peer(self.rank)} failed: {why}", word=b"e", wait=10)

    def _ask(self, *request, word: bytes, wait: float) -> None:
        self._settle(word)
        self._request = request
        self._wake.set()
        self._handled.wait(wait)

    def _settle(self, word: bytes) -> None:
        """Tell the death reporter how this rank ends (it then stays silent)."""
        with self._settling:  # the main and the watchdog thread may both get here
            if self._report_fd >= 0:
                os.write(self._report_fd, word)
                os.close(self._report_fd)
                _close_in_children.discard(self._report_fd)
                self._report_fd = -1

    # ---------------------------------------------------------------------------------------- watchdog thread
    def _connect(self) -> None:
        from paddle.base import core

        host, port = _master_endpoint()  # an own client: the process group's is not safe to share across threads
        self._store = core.TCPStore(host, port, False, 0, 10)

    def _call(self, op: str, key: str, *value):
        """A store call; a failed one is retried once on a fresh connection (the old one may be mid-reply)."""
        try:
            return getattr(self._store, op)(key, *value)
        except STORE_ERRORS as e:
            logger.warning("watchdog: store call failed (%s): reconnecting", e)
            self._connect()
            return getattr(self._store, op)(key, *value)

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
                if self.rank == 0:  # the store dies with this process: let the others read why first
                    time.sleep(1.5 * self.interval)
            elif self._request[0] == "finish":
                self._call("add", self._key("done", self.rank), 1)
                deadline = time.monotonic() + self.timeout
                while self.rank == 0 and watched and time.monotonic() < deadline:
                    watched = [p for p in watched if self._call("add", self._key("done", p), 0) == 0]
                    time.sleep(0.2 if watched else 0)
                if self.rank == 0 and watched:
                    logger.warning("ranks %s did not finish within %.0f s after rank 0", watched, self.timeout)
        except STORE_ERRORS as e:
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
        self._settle(b"w")
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
    """Returned by rank_preflight; finish() once training and saving are done."""

    watchdog: Optional[RankWatchdog]

    def finish(self) -> None:
        if self.watchdog is not None:
            self.watchdog.finish()


# ------------------------------------------------------------------------------------------------ worker reaper
_reaper_installed = False
_fork_parent = {"pid": 0, "main_thread": False}
_close_in_children: set = set()  # fds a forked child must not inherit (the death reporter's pipe)


def install_worker_reaper() -> None:
    """Processes forked by this rank's main thread (paddle DataLoader workers) die with it. Without this, a
    SIGKILLed rank leaves its workers blocked forever on a full queue, holding /dev/shm and the rank's sockets
    (which also hides the death from the other ranks). Linux only; forks from other threads are left alone, as
    PR_SET_PDEATHSIG fires when the forking *thread* ends."""
    global _reaper_installed
    if _reaper_installed or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def before() -> None:
        _fork_parent.update(pid=os.getpid(), main_thread=threading.current_thread() is threading.main_thread())

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
