"""Keep freed host memory mapped for the length of a trial (glibc malloc), so steps stop page-faulting.

Why: glibc serves every allocation above 32 MiB with a fresh ``mmap`` and hands heap tops above
its trim threshold back to the kernel, so each training step page-faults its large activations,
gradients and optimizer temporaries in again. That cost follows tensor *sizes*, not MoE design:
measured on the mixtral-8x22b proxy model (2 cores, fused AdamW), a system whose flat expert
parameters are 50 MB (tutel_native, Tutel's checkpoint layout) took 95k minor faults and about
260 ms more per step (1326 vs 1066 ms), one with 6 MB per-expert tensors (DeepSpeed) 29k faults
and no measurable time (1143 vs 1196 ms). jemalloc and tcmalloc, which PyTorch's CPU tuning
guides recommend, avoid the churn; two ``mallopt`` calls do the same for glibc without a preload:
no mmap for large blocks, and no trimming below 2 GiB of free heap. Applied in every trial process
alike (``--malloc reuse``, the default); ``--malloc system`` keeps glibc's defaults.

Also here, because the trial child and the gate's work channel both need it: resetting the
resident-set high-water mark (:func:`reset_peak_rss`), so a peak covers one phase of a process
(a step, or the system's steps after the reference check) instead of its whole life.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

MALLOC_MODES = ("reuse", "system")
# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


def keep_freed_memory() -> bool:
    """Apply the "reuse" policy; False where this is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1


def release_free_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (a no-op elsewhere), so a peak measured
    from here counts what the next phase needs, not what earlier frees happened to leave resident."""
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM); OSError when there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Release free heap, then reset VmHWM (and ru_maxrss with it) to the current resident set
    (Linux >= 4.0); returns that resident set in bytes. OSError where /proc/self/clear_refs cannot
    be written (not Linux, or a locked-down /proc)."""
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the last reset_peak_rss (or since exec)."""
    return status_kib("VmHWM") * 1024
