"""Processes that must not outlive the process they work for, and what they leave behind in /dev/shm.

- `die_with_parent(pid)`: the one way a helper process ends itself once `pid` is gone. Used by the trainer's
  DataLoader workers (through `install_worker_reaper`'s fork hook) and by create_pretraining_data.py's pool
  workers (data_tools/ingest.init_worker). Without it, a SIGKILLed parent (OOM killer, a user) leaves its
  workers blocked forever on a full result queue, holding /dev/shm, sockets and the forkserver.
- `DeathReporter(label)`: a tiny child interpreter per rank that says in the rank's log when the rank
  vanished without a word, then removes the batches the rank's DataLoader workers left in /dev/shm.

Import-light on purpose (no paddle, no numpy): the data tool's workers import this.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

ORPHAN_EXIT_CODE = 70  # what a helper exits with when its parent is gone (nobody is left to read it)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# ------------------------------------------------------------------------------------------------ parent death
def die_with_parent(parent_pid: int, period: float = 0.5) -> None:
    """End this process (exit ORPHAN_EXIT_CODE, or SIGKILL from the kernel) once `parent_pid` has ended.

    When `parent_pid` is this process's own parent and the OS has PR_SET_PDEATHSIG (Linux), the kernel does it
    the moment the parent dies; a parent that died before prctl took effect is caught by re-reading getppid.
    The caller must have been forked by a thread that lives as long as the parent: the signal fires when the
    forking *thread* ends. Otherwise (another OS, or `parent_pid` is not the direct parent, e.g. the main
    process of a forkserver pool) a daemon thread polls for it every `period` seconds."""
    if not _alive(parent_pid):
        os._exit(ORPHAN_EXIT_CODE)
    if os.getppid() == parent_pid and _set_pdeathsig():
        if os.getppid() != parent_pid:  # the parent died between the two getppid calls
            os._exit(ORPHAN_EXIT_CODE)
        return
    threading.Thread(target=_exit_when_gone, args=(parent_pid, period), name="parent-watch", daemon=True).start()


_libc: list = []  # loaded once, in the parent when it can be: dlopen in a forked child could meet a held lock


def _load_libc() -> Optional[ctypes.CDLL]:
    if not _libc:
        _libc.append(ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None)
    return _libc[0]


def _set_pdeathsig() -> bool:
    libc = _load_libc()
    return libc is not None and libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def _exit_when_gone(pid: int, period: float) -> None:
    while _alive(pid):
        time.sleep(period)
    os._exit(ORPHAN_EXIT_CODE)


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting to be reaped (a killed child of a live shell or test)."""
    stat = f"/proc/{pid}/stat"
    if os.path.isdir("/proc/self"):
        try:
            with open(stat, "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except FileNotFoundError:
            return False
    try:  # no procfs: signal 0 tells whether the pid exists (a zombie still counts as alive here)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


# ------------------------------------------------------------------------------------------------ fork hooks
_reaper_installed = False
_fork_parent = {"pid": 0, "main_thread": False}
_reporter_pipes: set = set()  # the death reporter's pipe: a forked child reports its pid on it, then closes it


def install_worker_reaper() -> None:
    """Processes forked by this process's main thread (paddle DataLoader workers) die with it: a SIGKILLed rank
    would otherwise leave its workers holding /dev/shm and the rank's sockets (which also hides the death from
    the other ranks). Forks from other threads are left alone: PR_SET_PDEATHSIG fires when the forking thread
    ends, which for them is not the death of the process."""
    global _reaper_installed
    if _reaper_installed:
        return
    _load_libc()

    def before() -> None:
        _fork_parent.update(pid=os.getpid(), main_thread=threading.current_thread() is threading.main_thread())

    def in_child() -> None:
        for fd in _reporter_pipes:
            with contextlib.suppress(BrokenPipeError):  # the reporter is gone: so is the rank, and this child next
                os.write(fd, b"k%d\n" % os.getpid())
            os.close(fd)
        _reporter_pipes.clear()
        if _fork_parent["main_thread"]:
            die_with_parent(_fork_parent["pid"])

    os.register_at_fork(before=before, after_in_child=in_child)
    _reaper_installed = True


# ------------------------------------------------------------------------------------------------ death reporter
# Run by a tiny child interpreter per rank (no paddle import), on the read end of a pipe only the rank and its
# forks write to, one line per write (atomic: shorter than PIPE_BUF). Each fork's first act is "k<pid>" (the fork
# hook above), before it can make a batch, so no DataLoader worker goes unnoticed however short-lived (the
# workers of an epoch shorter than any polling period). The rank's last word: f(inished), q(uiet: preflight
# error); anything else is an abnormal end. EOF without a word means the rank vanished (SIGKILL, OOM killer,
# native abort), which it can no longer say itself, so this says it, in the rank's own log, which its launcher
# prints. Then, once the rank and its workers are gone, it removes the batches the workers left in /dev/shm: their
# only reader is dead, and a crash per run would otherwise fill /dev/shm (GBs at SD scale) until the next run
# dies with a bus error.
_DEATH_REPORTER = r"""
import contextlib, glob, os, sys, time
rank, data = int(sys.argv[2]), b""  # not getppid(): the rank may be dead before this starts
chunk = os.read(0, 4096)
while chunk:  # until every writer is gone: the rank (its word, or its death) and its forks (once they are up)
    data += chunk
    chunk = os.read(0, 4096)
lines = data.split(b"\n")
kids = {int(line[1:]) for line in lines if line.startswith(b"k")}
word = b"".join(line for line in lines if not line.startswith(b"k"))
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


class DeathReporter:
    """This process's pipe to its death reporter. `say` its last word once: b"f" finished, b"q" quiet stop,
    anything else an abnormal end (the reporter then cleans /dev/shm without a message of its own)."""

    def __init__(self, label: str):
        read_fd, self._fd = os.pipe()
        self.process: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, "-c", _DEATH_REPORTER, label, str(os.getpid())], stdin=read_fd)
        os.close(read_fd)
        _reporter_pipes.add(self._fd)  # a forked DataLoader worker reports its pid on it, then closes it
        self._lock = threading.Lock()  # the main and the watchdog thread may both get here

    def say(self, word: bytes) -> None:
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, word + b"\n")
                os.close(self._fd)
                _reporter_pipes.discard(self._fd)
                self._fd = -1
