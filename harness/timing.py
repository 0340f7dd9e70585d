"""Step timing and the calibration matmul.

The machines are shared and noisy (3-13x swings for minutes), so every trial
round times a fixed fp32 matmul before and after its steps: a slow round shows
up as a slow calibration, and reports can compare rounds on equal footing.
CPU steps are timed with time.perf_counter (CPU work is synchronous); GPU
steps with CUDA events after a device synchronise.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

CALIBRATION_SIZE = 1024  # N of the N x N @ N x N fp32 matmul (2.1 GFLOP)
CALIBRATION_REPS = 3
CALIBRATION_DESCRIPTION = (
    f"median of {CALIBRATION_REPS} fp32 {CALIBRATION_SIZE}x{CALIBRATION_SIZE} matmuls, "
    "timed before and after each trial round"
)

T = TypeVar("T")


class StepTimer:
    """Times one call: perf_counter on CPU, CUDA events on GPU."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")

    @property
    def name(self) -> str:
        return "cuda_events" if self.cuda else "perf_counter"

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        """(fn's result, seconds it took)."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - begin


def calibration_seconds(device: str = "cpu") -> float:
    """Median seconds of a fixed fp32 matmul on `device` (one warm-up call first)."""
    gen = torch.Generator().manual_seed(1234)
    a = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=gen).to(device)
    b = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=gen).to(device)
    timer = StepTimer(device)
    timer.time(lambda: a @ b)
    return statistics.median(timer.time(lambda: a @ b)[1] for _ in range(CALIBRATION_REPS))
