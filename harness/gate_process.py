"""The two sides of a gate and the worker processes that measure them.

A side is a source tree: the candidate is the working tree the gate runs in;
a paired baseline is a revision checked out into a scratch git worktree
(:func:`scratch_worktree`). Each side's workers run ``python -m
harness.gate_worker`` with that tree first on the import path, so the side's
own systems, workloads and plugins are what gets measured. A tree that holds
no moebench (a user's project with a plugin file) gets this moebench after it.
Both sides use this interpreter and its installed packages.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import procs
from harness.errors import UsageError

MOEBENCH_ROOT = Path(__file__).resolve().parent.parent
SETUP_TIMEOUT_S = 600.0
MEASURE_TIMEOUT_S = 300.0


class WorkerFailed(RuntimeError):
    """A worker answered with an error, died, or did not answer in time."""


@dataclass(frozen=True)
class Side:
    label: str  # "baseline" | "candidate"
    root: Path  # the source tree whose code this side runs
    revision: str  # what it is: a commit, or "working tree"

    def python_path(self) -> str:
        paths = [str(self.root)]
        if self.root != MOEBENCH_ROOT:
            paths.append(str(MOEBENCH_ROOT))
        return os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH", "")])])

    def plugin(self, ref: str, candidate_root: Path) -> str:
        """A plugin reference as this side sees it: a file inside the candidate's tree is the same
        file in this side's tree; module references resolve through the side's import path."""
        path_part, colon, class_name = ref.partition(":")
        if not path_part.endswith(".py"):
            return ref
        try:
            relative = Path(path_part).resolve().relative_to(candidate_root.resolve())
        except ValueError:
            return ref
        return str(self.root / relative) + colon + class_name


class WorkerProcess:
    """One gate worker: requests in, JSON answers out, a timeout on every answer."""

    def __init__(self, side: Side, threads: int, stderr_path: Path):
        env = dict(os.environ)
        env["PYTHONPATH"] = side.python_path()
        env["OMP_NUM_THREADS"] = str(threads)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # one process: a lone rank picks its own port
        self.side = side
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = procs.start([sys.executable, "-m", "harness.gate_worker"], input_pipe=True,
                                stdout=subprocess.PIPE, stderr=self._stderr, cwd=side.root, env=env, text=True)

    def send(self, request: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerFailed(self._death()) from None

    def receive(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise WorkerFailed(f"{self.side.label} worker gave no answer within {timeout_s:g} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise WorkerFailed(self._death())
                answer = json.loads(line)
                if not answer.get("ok"):
                    raise WorkerFailed(f"{self.side.label}: {answer.get('error', 'failed').splitlines()[0]}")
                return answer

    def request(self, request: dict, timeout_s: float = MEASURE_TIMEOUT_S) -> dict:
        self.send(request)
        return self.receive(timeout_s)

    def _death(self) -> str:
        self.proc.wait(timeout=10)
        self._stderr.flush()
        lines = [line for line in self.stderr_path.read_text(errors="replace").splitlines() if line.strip()]
        return f"{self.side.label} worker exited {self.proc.returncode}: {lines[-1] if lines else 'no output'}"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                procs.kill_tree(self.proc)
        self._stderr.close()


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UsageError(f"git {' '.join(args)}: {message}")
    return proc.stdout.strip()


def repository_root(path: Path) -> Path:
    """The git working tree holding `path` (the candidate side of a paired gate)."""
    directory = path if path.is_dir() else path.parent
    try:
        return Path(git(directory, "rev-parse", "--show-toplevel")).resolve()
    except UsageError:
        raise UsageError(f"--baseline-ref needs a git repository, and {directory} is not in one") from None


@contextlib.contextmanager
def scratch_worktree(repo: Path, revision: str):
    """`revision` checked out (detached) into a temporary worktree of `repo`; removed afterwards."""
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                           capture_output=True, text=True)
    commit = found.stdout.strip() if found.returncode == 0 and revision else ""
    if not commit:
        raise UsageError(f"--baseline-ref {revision!r} is not a commit of {repo}")
    scratch = Path(tempfile.mkdtemp(prefix="moebench-baseline-"))
    target = scratch / "tree"
    git(repo, "worktree", "add", "--detach", "--quiet", str(target), commit)
    try:
        if (target / "harness").is_dir() and not (target / "harness" / "gate_worker.py").is_file():
            raise UsageError(f"--baseline-ref {revision} ({commit[:12]}) has a harness/ without gate_worker.py: it "
                             "predates `moebench gate`; gate against a later revision or a stored baseline")
        yield target, commit
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(target)], capture_output=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()
