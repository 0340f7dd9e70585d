"""What machine and code produced a result, recorded next to every number.

Why: timings are only comparable on the same machine, thread count and code;
a results file that does not say which is not evidence.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

from core.machine import cpu_model  # noqa: F401 (part of this module's record API)

# Distribution names whose versions go into every results file.
TRACKED_PACKAGES = ("torch", "numpy", "pandas", "deepspeed", "megatron-core", "tutel", "matplotlib")
GIT_TIMEOUT_S = 10
# CPU features that decide which GEMM kernels torch, MKL and oneDNN can use (bf16 and AMX above all).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# Environment variables that change threading or allocation inside a trial child.
THREAD_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "DNNL_", "ONEDNN_", "OPENBLAS_")
THREAD_ENV_NAMES = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_ARENA_MAX", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, bool] | None:
    """Which of CPU_FLAGS the first CPU's "flags" line has; None where /proc/cpuinfo has none."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    have = set(value.split())
                    return {flag: flag in have for flag in CPU_FLAGS}
    except OSError:  # not Linux, or no /proc: the record says unknown
        pass
    return None


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1).strip() if match else None


def torch_build(torch) -> dict:
    """The math libraries torch was built with and the kernels it picks on this CPU.

    Parsed from torch.__config__.show() / parallel_info(), whose wording is not an
    API: anything not found is None rather than a guess.
    """
    try:
        shown = torch.__config__.show()
        parallel = torch.__config__.parallel_info()
    except RuntimeError:  # a build without the config strings: record what the backends say
        shown = parallel = ""
    get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return {
        "cpu_capability": get_capability() if get_capability else None,
        "blas": _search(r"BLAS_INFO=([^,\s]+)", shown),
        "mkl_available": torch.backends.mkl.is_available(),
        "mkl_version": _search(r"Math Kernel Library Version ([\d.]+)", shown),
        "onednn_available": torch.backends.mkldnn.is_available(),
        "onednn_version": _search(r"(?:MKL-DNN|oneDNN) v(\S+)", shown),
        "openmp_available": torch.backends.openmp.is_available(),
        "openmp_version": _search(r"OpenMP (\d+)", shown),
        "parallel_backend": _search(r"ATen parallel backend: (.+)", parallel),
    }


def thread_env(env) -> dict[str, str]:
    """The threading/allocator variables of `env` (THREAD_ENV_PREFIXES, THREAD_ENV_NAMES), sorted."""
    return {k: env[k] for k in sorted(env) if k.startswith(THREAD_ENV_PREFIXES) or k in THREAD_ENV_NAMES}


def trial_child_env() -> dict:
    """What a trial child's environment holds beyond ours (harness/launch.py child_env).

    "set": the variables child_env sets for every trial (OMP_NUM_THREADS is the
    trial's threads per rank, recorded per trial); "passed": the threading and
    allocator variables of this process that children inherit unchanged.
    """
    from harness.launch import LaunchConfig, child_env

    set_keys = sorted(child_env(LaunchConfig(threads_per_rank=1), base={}))
    passed = {k: v for k, v in thread_env(os.environ).items() if k not in set_keys}
    return {"set": set_keys, "passed": passed}


def thread_record() -> dict:
    """Threads as measured inside a trial child, after it has set them (not what was asked for)."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


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
        "cpu_flags": cpu_flags(),
        "torch_build": torch_build(torch),
        "trial_child_env": trial_child_env(),
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
