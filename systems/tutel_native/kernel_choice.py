"""Which expert kernel and buffer layout a world-size-1 step runs: a measured cost model.

Why: no fixed rule is right at every shape. Measured on one machine, oneDNN expert
by expert won on 8 wide experts and lost 2x on 256 narrow ones, where one call per
expert and GEMM costs more than the GEMM; a padded batched GEMM wins when the experts'
fills are even and loses when one expert is far fuller than the rest; a grouped GEMM
(one call, no padding) sits between. And machines differ: the kernel that wins on one
CPU loses on another.

The model, per candidate (kernel, layout) of CANDIDATES:

    seconds(forward + backward of the experts) = fixed + per_row * rows

with ``rows`` the rows the GEMMs run on: the live rows for a compact layout, E x the
largest fill for ``max_fill``. ``fixed`` holds what does not grow with rows: calls,
Python per expert, and the weight gradients' memory traffic. Both constants are measured
on this layer's own experts (all E of them, its model and hidden widths, activation,
dtype, device and threads) by timing the candidate on synthetic rows at n and 2n rows per
expert, n near the expected rows per expert. (Measuring fewer experts and extrapolating
was tried first: caches make 8 experts a different regime from 128.) Each step then
predicts every candidate from its real fills and runs the cheapest: arithmetic on the
fills, no extra synchronisation.

Reproducibility: a choice that depends on timings would let two runs of the same
command pick different kernels (results equal only to rounding, and different expert
rows for the gate's work channel). So the constants are measured once per machine and
shape signature and kept in a cache file, first writer wins (core/files.py
``create_once``): every later process on this machine, either side of a paired gate
included, reads the same constants and makes the same choices.

Legend: E experts, M model dim, H expert hidden, n rows per expert.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.files import create_once
from core.machine import cpu_model
from systems.tutel_native import grouped, per_expert

CANDIDATES = (("grouped", "live"), ("onednn", "live"), ("mm", "live"), ("mm", "max_fill"))
CACHE_DIR = Path.home() / ".cache" / "moebench" / "tutel_native_kernel_costs"
CACHE_VERSION = 2
TIMED_RUNS = 2  # after one warm-up run; the faster of them (the least disturbed)
_MODELS: dict[str, KernelCostModel] = {}  # this process's models by cache key


@dataclass(frozen=True)
class Cost:
    """Seconds of one forward + backward of the experts: fixed + per_row * rows."""

    fixed: float
    per_row: float

    def predict(self, rows: int) -> float:
        return self.fixed + self.per_row * rows


@dataclass
class KernelCostModel:
    costs: dict[str, Cost]  # "kernel/layout" -> its cost
    points: dict[str, list]  # what was measured: "kernel/layout" -> [[rows, seconds], ...]
    key: dict  # the shape signature and machine the constants belong to
    source: str  # "measured" (by this process) or "cache" (read from CACHE_DIR)
    cache_file: str

    def predict(self, name: str, fills: list[int]) -> float:
        return self.costs[name].predict(rows(name, fills))

    def choose(self, fills: list[int], padded_rows: int | None = None) -> tuple[str, str]:
        """The cheapest candidate for these fills (ties: the first in CANDIDATES). ``padded_rows``:
        above one rank, the rows of the padded buffer the all-to-all delivered, which the padded
        candidate (mm/max_fill's costs: one bmm over every row) would compute."""

        def predicted(name: str) -> float:
            if padded_rows is not None and name.endswith("/max_fill"):
                return self.costs[name].predict(padded_rows)
            return self.predict(name, fills)

        name = min(self.costs, key=lambda n: (predicted(n), list(self.costs).index(n)))
        kernel, layout = name.split("/")
        return kernel, layout

    def report(self) -> dict:
        return {"costs_s": {n: asdict(c) for n, c in self.costs.items()}, "measured_points": self.points,
                "key": self.key, "source": self.source, "cache_file": self.cache_file}


def rows(name: str, fills: list[int]) -> int:
    """Rows the GEMMs of candidate ``name`` run on for these fills."""
    if name.endswith("/max_fill"):
        return len(fills) * max(fills, default=0)
    return sum(fills)


def available(experts, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The candidates that run here for these experts ("kernel/layout")."""
    names = []
    for kernel, layout in CANDIDATES:
        if kernel == "grouped" and not (grouped.kernel_available(device.type, dtype)
                                        and grouped.aligned(*experts.row_widths(), dtype=dtype)):
            continue
        if kernel == "onednn" and not per_expert.kernel_available(device.type, dtype):
            continue
        names.append(f"{kernel}/{layout}")
    return names


def model_for(experts, device: torch.device, dtype: torch.dtype, rows_per_expert: float) -> KernelCostModel:
    """The cost model for these experts here: from this process, the machine's cache, or measured now."""
    key = _signature(experts, device, dtype, rows_per_expert)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if digest in _MODELS:
        return _MODELS[digest]
    path = CACHE_DIR / f"{digest}.json"
    try:
        stored, source = json.loads(path.read_text(encoding="utf-8")), "cache"
    except FileNotFoundError:  # the first process here: measure, and keep whichever writer came first
        measured = {"version": CACHE_VERSION, **measure(experts, device, dtype, key)}
        try:
            stored = json.loads(create_once(json.dumps(measured, indent=1) + "\n", path))
            source = "measured" if stored == measured else "cache"
        except (OSError, ValueError) as exc:  # a read-only home, or a broken file: uncached constants
            stored, source = measured, f"measured, not cached ({exc})"
    except (OSError, ValueError) as exc:
        stored = {"version": CACHE_VERSION, **measure(experts, device, dtype, key)}
        source = f"measured, cache file unusable ({exc}); delete {path} to measure again"
    model = KernelCostModel({n: Cost(**c) for n, c in stored["costs"].items()}, stored["points"], stored["key"],
                            source, str(path))
    _MODELS[digest] = model
    return model


def _signature(experts, device, dtype, rows_per_expert: float) -> dict:
    n = calibration_rows(rows_per_expert)
    return {"experts": type(experts).__name__, "num_experts": experts.num_local, "widths": list(experts.row_widths()),
            "act": experts.act_kind, "bias": experts.has_bias(), "dtype": str(dtype), "device": device.type,
            "threads": torch.get_num_threads(), "rows_per_expert": [n, 2 * n],
            "candidates": available(experts, device, dtype), "cpu": cpu_model(), "torch": torch.__version__}


def calibration_rows(rows_per_expert: float) -> int:
    """n: the expected rows per expert rounded to a power of two (a stable cache key), at least 4."""
    n = max(4.0, float(rows_per_expert))
    return int(2 ** round(math.log2(n)))


def measure(experts, device: torch.device, dtype: torch.dtype, key: dict) -> dict:
    """Time every candidate at n and 2n rows per expert and fit its two constants."""
    costs, points = {}, {}
    for name in key["candidates"]:
        kernel, layout = name.split("/")
        seen = []
        for n in key["rows_per_expert"]:
            fills = [n + (e % 2 if layout == "live" else 0) for e in range(key["num_experts"])]  # live: uneven
            seen.append([sum(fills), _time_experts(experts, fills, kernel, device, dtype)])
        (r1, t1), (r2, t2) = seen
        per_row = max(0.0, (t2 - t1) / (r2 - r1))
        costs[name] = asdict(Cost(max(0.0, t1 - per_row * r1), per_row))
        points[name] = seen
    return {"key": key, "costs": costs, "points": points}


def _time_experts(experts, fills: list[int], kernel: str, device, dtype) -> float:
    """Seconds of one forward + backward of ``experts``' kernel on synthetic rows split by ``fills``."""
    from systems.tutel_native.experts import expert_rows

    gen = torch.Generator().manual_seed(0)
    weights = [None if w is None else w.to(device).requires_grad_(True)
               for w in experts.synthetic_weights(len(fills), dtype, gen)]
    x_NM = torch.randn(sum(fills), experts.row_widths()[0], generator=gen, dtype=dtype).to(device)
    x_NM.requires_grad_(True)
    spec = experts.row_spec(fills, kernel)
    w_in, w_gate, w_out, b_in, b_out = weights
    inputs = [t for t in (x_NM, w_in, w_gate, w_out, b_in, b_out) if t is not None]

    def run():
        with torch.enable_grad():
            y_NO = expert_rows(x_NM, spec, w_in, w_gate, w_out, b_in, b_out)
            torch.autograd.grad(y_NO, inputs, torch.ones_like(y_NO))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
