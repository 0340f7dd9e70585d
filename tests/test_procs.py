"""harness/procs.py on real processes: a timeout or Ctrl-C kills the child's whole tree, even a
grandchild in a session of its own (as torchrun starts its workers), and the child is reaped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness import procs

# The child starts a grandchild in a new session, prints its pid, then both sleep.
TREE = ("import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        "print(g.pid, flush=True); time.sleep(600)")


def _grandchild(proc: subprocess.Popen) -> int:
    return int(proc.stdout.readline())


def test_timeout_kills_the_tree_and_reaps_the_child():
    started = time.monotonic()
    proc = procs.start([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    grandchild = _grandchild(proc)
    assert procs.is_alive(grandchild) and grandchild in procs.descendants(proc.pid)
    done = procs.wait(proc, timeout_s=1.0, grace_s=2.0)
    assert done.timed_out and done.returncode is None
    assert proc.returncode is not None  # reaped
    assert not procs.is_alive(grandchild)
    assert time.monotonic() - started < 30


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler for the test: a shell that starts a job in the background (as a CI
    runner may) sets SIGINT to ignored, and Python then never raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_kills_the_tree_and_is_re_raised(sigint_raises):
    proc = procs.start([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    grandchild = _grandchild(proc)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        procs.wait(proc, timeout_s=60, grace_s=2.0)
    timer.join()
    assert proc.returncode is not None
    assert not procs.is_alive(grandchild)


def test_run_passes_input_and_returns_output_and_exit_code():
    code = "import sys; data = sys.stdin.read(); print(data.upper()); sys.exit(3)"
    done = procs.run([sys.executable, "-c", code], 60, input="hello", text=True,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == 3 and done.stdout.strip() == "HELLO" and not done.timed_out


def test_a_stop_signal_while_a_child_starts_waits_until_its_tree_can_be_killed(monkeypatch):
    """SIGTERM between the child's start and the wait that would kill it: it must not orphan the child."""
    real_start, started = procs.start, []

    def start_then_signal(*args, **kwargs):
        proc = real_start(*args, **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)  # the child exists; wait() has not begun
        return proc

    monkeypatch.setattr(procs, "start", start_then_signal)
    with pytest.raises(procs.Interrupted):
        with procs.interruptible():
            procs.run([sys.executable, "-c", "import time; time.sleep(60)"], 120)
    (child,) = started
    assert child.returncode is not None and not procs.is_alive(child.pid)
