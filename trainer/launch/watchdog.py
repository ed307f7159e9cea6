"""The rank watchdog: ends a job whose rank is gone, in seconds, with a message naming the rank.

Why: paddle's launcher stops its own node's processes when one dies, but nothing tells the other nodes; their
ranks wait in a collective until the gloo (30 s) or NCCL (far longer) timeout, with an error that names no rank.
Every rank heartbeats through the job's TCP store (hosted by rank 0); rank 0 watches all, the others watch rank
0, and whoever sees a silent peer ends the whole job with a message naming it. Started by
trainer/launch/rank_checks.rank_preflight; JobGuard.finish() marks the clean end.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from trainer.launch.reaper import DeathReporter

logger = logging.getLogger("sd")

TIMEOUT_ENV = "SD_RANK_TIMEOUT"  # seconds without a heartbeat before a rank counts as gone
DEFAULT_TIMEOUT_S = 30.0
PEER_LOST_EXIT_CODE = 3
STORE_ERRORS = (ValueError, RuntimeError, OSError)  # what paddle's TCPStore raises


def timeout_from_env() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def host_label() -> str:
    ip = os.environ.get("PADDLE_CURRENT_ENDPOINT", "").rsplit(":", 1)[0]
    return f"{socket.gethostname()} ({ip})" if ip else socket.gethostname()


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
        self._dying = threading.Lock()
        self._request: Optional[tuple] = None  # ("finish",) | ("quiet",) | ("fail", message): from the main thread
        self._last_ok = time.monotonic()
        self._store = None
        self._reporter: Optional[DeathReporter] = None

    def _key(self, *parts) -> str:
        return "/".join((self.PREFIX,) + tuple(str(p) for p in parts))

    def _peer(self, p: int) -> str:
        return f"rank {p} on {self.hosts[p]}"

    def start(self) -> None:
        self._reporter = DeathReporter(f"rank {self.rank} of {self.world} on {host_label()} (local rank "
                                       f"{os.environ.get('PADDLE_LOCAL_RANK', '?')}, pid {os.getpid()})")
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
        if self._reporter is not None:
            self._reporter.say(word)

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
