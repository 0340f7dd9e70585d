"""The one way the harness starts a child process and makes sure it, and everything it started, ends.

A trial child, a `check` worker and torchrun all run in a session of their
own (so a stray signal to our terminal's group cannot half-kill them, and so
Ctrl-C reaches them only through us), and torchrun starts every worker in a
session of its own too. Killing the child's process group is therefore not
enough: the tree is collected with psutil (parent links, pid-reuse safe),
every process and every process group in it gets SIGTERM, and whatever is
still alive after a grace period gets SIGKILL. The child is always reaped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

GRACE_S = 5.0  # between SIGTERM and SIGKILL
_POLL_S = 0.05


@dataclass
class Finished:
    """How a child ended: its exit code, or None when it ran past its timeout and its tree was killed."""

    returncode: int | None
    stdout: str | bytes | None = None
    stderr: str | bytes | None = None

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def start(argv: list[str], *, input_pipe: bool = False, **popen_kwargs) -> subprocess.Popen:
    """Popen in a new session; stdin is /dev/null unless the caller will send `input` (input_pipe)."""
    popen_kwargs.setdefault("stdin", subprocess.PIPE if input_pipe else subprocess.DEVNULL)
    return subprocess.Popen(argv, start_new_session=True, **popen_kwargs)


def wait(proc: subprocess.Popen, timeout_s: float, *, input: str | bytes | None = None,
         grace_s: float = GRACE_S, _release_held: bool = False) -> Finished:
    """Wait for `proc` (feeding `input`, collecting piped output); on timeout kill its tree.

    On anything else that interrupts the wait (Ctrl-C above all: the child's own
    session does not get the terminal's SIGINT) the tree is killed and the
    exception re-raised, so no child outlives the harness.
    """
    try:
        if _release_held:
            _release()
        out, err = proc.communicate(input=input, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc, grace_s)
        out, err = proc.communicate()  # what the child wrote before it was killed
        return Finished(None, out, err)
    except BaseException:  # KeyboardInterrupt and the like: clean up the tree, then let it propagate
        kill_tree(proc, grace_s)
        raise
    return Finished(proc.returncode, out, err)


def run(argv: list[str], timeout_s: float, *, input: str | bytes | None = None, grace_s: float = GRACE_S,
        **popen_kwargs) -> Finished:
    """start() then wait(): the launch-and-reap path for one child.

    A Ctrl-C or SIGTERM that arrives while the child is being started (inside Popen, or before
    wait() is in its try) is held until wait() can kill the child's tree; raised there, it would
    leave the child running with no one to kill it (a fresh clone's test once found one)."""
    _HELD.append(True)
    try:
        proc = start(argv, input_pipe=input is not None, **popen_kwargs)
    except BaseException:
        _HELD.pop()
        raise
    return wait(proc, timeout_s, input=input, grace_s=grace_s, _release_held=True)


# ----------------------------------------------------------------- the tree

def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _alive(p: psutil.Process) -> bool:
    """Running or sleeping; a zombie has finished and only waits to be reaped."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_alive(pid: int) -> bool:
    p = _process(pid)
    return p is not None and _alive(p)


def _tree(root: psutil.Process | None) -> list[psutil.Process]:
    """`root` and everything below it now (psutil.Process guards against a reused pid)."""
    if root is None:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    return {p.pid for p in _tree(_process(pid))[1:] if _alive(p)}


def _signal_all(processes: dict[int, psutil.Process], sig: int) -> None:
    """`sig` to each live process and to its process group (unless that group is ours)."""
    own_group = os.getpgrp()
    for p in processes.values():
        if not _alive(p):
            continue
        try:
            pgid = os.getpgid(p.pid)
            if pgid != own_group:
                os.killpg(pgid, sig)
            p.send_signal(sig)  # psutil checks the pid still names the same process
        except (ProcessLookupError, psutil.NoSuchProcess):  # it exited between the check and the signal
            continue


def kill_tree(proc: subprocess.Popen | int, grace_s: float = GRACE_S) -> None:
    """SIGTERM `proc`'s whole tree (every process group in it), SIGKILL what is left after grace_s; reap proc.

    The tree is collected before anything is signalled and re-collected while
    the root lives, because a worker whose parent dies is re-parented away
    from the tree and could no longer be found.
    """
    root = _process(proc if isinstance(proc, int) else proc.pid)
    seen = {p.pid: p for p in _tree(root)}
    _signal_all(seen, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        seen.update({p.pid: p for p in _tree(root)})
        if not any(_alive(p) for p in seen.values()):
            break
        time.sleep(_POLL_S)
    seen.update({p.pid: p for p in _tree(root)})
    _signal_all(seen, signal.SIGKILL)
    if isinstance(proc, subprocess.Popen):
        proc.wait()
    elif root is not None:
        psutil.wait_procs([root], timeout=grace_s)


# ----------------------------------------------------------------- stopping the parent

_HELD: list[bool] = []  # non-empty while run() starts a child: a stop signal waits (interruptible())
_PENDING: list[int] = []  # the stop signal that waited
_STOPPING: list[int] = []  # the stop signal being handled: later ones are ignored


def _release() -> None:
    """End one hold; raise the stop signal that waited for it, if any."""
    if _HELD:
        _HELD.pop()
    if _PENDING and not _HELD:
        signum = _PENDING.pop()
        _STOPPING.append(signum)
        raise Interrupted(signum)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised like Ctrl-C so the same clean-up (wait() kills the child's tree) runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted; while that clean-up runs (bounded by the grace
    period), further signals are ignored so it cannot itself be cut short and leave children."""
    stopping = _STOPPING
    stopping.clear()
    _PENDING.clear()

    def handler(signum, frame):
        if stopping or _PENDING:
            return
        if _HELD:  # a child is being started: raised in wait(), where its tree gets killed
            _PENDING.append(signum)
            return
        stopping.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
