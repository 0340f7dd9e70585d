"""What machine and code produced a result, recorded next to every number.

Why: timings are only comparable on the same machine, thread count and code;
a results file that does not say which is not evidence.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

# Distribution names whose versions go into every results file.
TRACKED_PACKAGES = ("torch", "numpy", "pandas", "deepspeed", "megatron-core", "tutel", "matplotlib")
GIT_TIMEOUT_S = 10


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The "model name" line of /proc/cpuinfo; platform.processor() elsewhere."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpu_info(torch) -> dict | None:
    if not torch.cuda.is_available():
        return None
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def collect_environment() -> dict:
    """Versions, CPU/GPU and thread settings of this process."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "packages": {name: package_version(name) for name in TRACKED_PACKAGES},
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "gpu": _gpu_info(torch),
    }


def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_info(repo_dir) -> dict:
    """{"commit": HEAD sha, "dirty": uncommitted changes?}; both None outside a git work tree."""
    head = _git(Path(repo_dir), "rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    # Tracked files only: new result files must not mark the code that produced them as dirty.
    status = _git(Path(repo_dir), "status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}
