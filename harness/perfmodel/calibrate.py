"""Measure this machine into a testbed file (`moebench calibrate`).

Why: the performance model is only as good as its constants, and on this
machine we can measure them rather than assume them. What is measured:

* GEMM throughput at the shapes the workloads' expert layers run (each
  preset's proxy flavour: rows per expert at its capacity or its mean
  dropless fill, times model and expert width, both projections) and at one
  large square shape, per dtype and per thread count (1 thread is what each
  rank gets in the multi-rank trials here; all cores is a one-process trial);
* memory bandwidth: a large tensor copy, read plus write bytes over time;
* memory capacity: MemTotal;
* collectives at each world size asked for (gloo on loopback), through the
  same micro-benchmark as `moebench comm`, fitted to latency + bytes x beta.

Each figure is the median of several timed repeats after a warm-up.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from harness.perfmodel.testbed import COLLECTIVE_OPS, DTYPE_BYTES

GEMM_REPEATS = 7
GEMM_SWEEPS = 3
ROTATION_BYTES = 64 << 20
MAX_ROTATION = 128
LARGE_SQUARE = 1024
COPY_BYTES = 256 << 20
COMM_SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20)


@dataclass(frozen=True)
class GemmPoint:
    dtype: str
    threads: int
    shape: tuple[int, int, int] | None  # (m, n, k); None: the large square, the dtype's shape-free figure
    flops_per_s: float


@dataclass(frozen=True)
class CollectivePoint:
    op: str
    ranks: int
    latency_s: float
    bus_bandwidth_bytes_per_s: float
    sizes: tuple[int, ...]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and kernel choice
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def workload_gemm_shapes(workload_names: list[str]) -> list[tuple[int, int, int]]:
    """(m, n, k) of every expert GEMM the workloads' proxy layers run forward: m rows per expert (the
    capacity, or the mean fill when dropless), the first projection M -> H and the second H -> M."""
    from workloads.resolve import resolve_workload

    shapes = set()
    for name in workload_names:
        w = resolve_workload(name, "proxy")
        s = w.layer
        fill = w.tokens_per_step * s.top_k / s.num_experts
        rows = math.ceil(fill * (w.capacity_factor or 1.0))
        shapes.add((rows, s.ffn_dim, s.model_dim))
        shapes.add((rows, s.model_dim, s.ffn_dim))
    return sorted(shapes)


def measure_gemms(shapes: list[tuple[int, int, int]], dtypes: list[str], thread_counts: list[int],
                  sweeps: int = GEMM_SWEEPS) -> list[GemmPoint]:
    """Each GEMM's rate: the median over `sweeps` passes through all of them, each pass a median of
    repeats. Passes, not more repeats, because this machine drifts over seconds (two calibrations a
    minute apart differed by up to 20% at one shape): a drift then moves one pass, not one point."""
    import torch

    keys = [(threads, dtype, shape) for threads in thread_counts for dtype in dtypes for shape in [None, *shapes]]
    seconds: dict[tuple, list[float]] = {key: [] for key in keys}
    saved_threads = torch.get_num_threads()
    try:
        for _ in range(sweeps):
            for threads, dtype, shape in keys:
                torch.set_num_threads(threads)
                seconds[(threads, dtype, shape)].append(_gemm_seconds(shape, getattr(torch, dtype)))
    finally:
        torch.set_num_threads(saved_threads)
    return [GemmPoint(dtype, threads, shape, 2 * math.prod(shape or (LARGE_SQUARE,) * 3) / statistics.median(times))
            for (threads, dtype, shape), times in seconds.items()]


def operand_sets(shape: tuple[int, int, int] | None, element_bytes: int) -> int:
    """How many distinct (x, w) pairs a shaped GEMM rotates through: enough to overflow the caches
    (ROTATION_BYTES), at most MAX_ROTATION. An MoE layer's experts each bring their own weight, so
    one operand pair reused from cache measured small expert GEMMs 25-35% too fast."""
    if shape is None:
        return 1
    m, n, k = shape
    return max(1, min(MAX_ROTATION, math.ceil(ROTATION_BYTES / ((m * k + k * n) * element_bytes))))


def _gemm_seconds(shape: tuple[int, int, int] | None, torch_dtype) -> float:
    """Median seconds of one GEMM of `shape` (None: the large square), rotating over operand sets."""
    import torch

    m, n, k = shape or (LARGE_SQUARE,) * 3
    sets = operand_sets(shape, torch.tensor([], dtype=torch_dtype).element_size())
    xs = [torch.randn(m, k, dtype=torch_dtype) for _ in range(sets)]
    ws = [torch.randn(k, n, dtype=torch_dtype) for _ in range(sets)]
    outs = [torch.empty(m, n, dtype=torch_dtype) for _ in range(sets)]

    def rotation():
        for x, w, out in zip(xs, ws, outs):
            torch.mm(x, w, out=out)

    repeats = GEMM_REPEATS if m * n * k * sets > 1 << 24 else GEMM_REPEATS * 4
    return _median_seconds(rotation, repeats) / sets


def measure_copy_bandwidth(nbytes: int = COPY_BYTES) -> float:
    """Bytes read plus bytes written per second by one large copy (all threads)."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), 5)
    return 2 * nbytes / seconds


def measure_call_overhead() -> float:
    """Seconds per op call when the op itself is nearly free: forward and backward of a tiny matmul
    under autograd (three kernels: the product and its two gradients), divided by three."""
    import torch

    a = torch.randn(4, 4, requires_grad=True)
    b = torch.randn(4, 4, requires_grad=True)

    def step():
        torch.mm(a, b).backward(torch.ones(4, 4))

    return _median_seconds(step, 200) / 3


def memory_total_bytes(meminfo_path: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo_path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fit_collectives(raw: dict) -> list[CollectivePoint]:
    """Latency and bus bandwidth per op from `moebench comm`'s measurements at one world size: the
    least-squares line through (bytes per rank, median seconds); bus bandwidth = bus factor / slope."""
    from harness.comm import bus_factor, fit_alpha_beta

    by_op: dict[str, list[tuple[int, float]]] = {}
    ranks = 0
    for m in raw["results"]:
        by_op.setdefault(m["op"], []).append((m["bytes"], statistics.median(m["samples_s"])))
        ranks = m["world_size"]
    points = []
    for op, measured in by_op.items():
        alpha, beta = fit_alpha_beta(sorted(measured))
        smallest = min(t for _, t in measured)
        # A negative intercept or slope is a noisy fit, not physics: fall back to the smallest message's
        # time as the latency and the largest message's throughput as the bandwidth.
        if alpha <= 0:
            alpha = smallest
        if beta <= 0:
            size, seconds = max(measured)
            beta = max(seconds - alpha, seconds / 2) / size
        points.append(CollectivePoint(op, ranks, alpha, bus_factor(op, ranks) / beta,
                                      tuple(sorted(s for s, _ in measured))))
    return points


def collective_ops() -> list[str]:
    return list(COLLECTIVE_OPS)


# ------------------------------------------------------------------ writing

def machine_fingerprint() -> dict:
    """What the calibrated figures depend on: a testbed measured on another machine or build is another
    testbed."""
    import os

    import torch

    from harness.environment import cpu_flags, cpu_model, torch_build

    build = torch_build(torch)
    flags = cpu_flags() or {}
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": sorted(name for name, present in flags.items() if present),
        "cpu_capability": str(build["cpu_capability"]),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "blas": str(build.get("blas")),
        "onednn": str(build.get("onednn_version")),
    }


def local_testbed_path(fingerprint: dict | None = None):
    """testbeds/local-<hash of this machine's fingerprint>.toml: one file per machine and build."""
    from harness.identity import stable_hash
    from harness.perfmodel.testbed import TESTBED_DIR

    return TESTBED_DIR / f"local-{stable_hash(fingerprint or machine_fingerprint(), 8)}.toml"


def _toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else '"nan"'
    return str(value)


def _quantity(value: float, source: str) -> str:
    return f'{{ value = {_toml_value(float(value))}, kind = "measured", source = {_toml_value(source)} }}'


def render_testbed(name: str, when: str, command: str, fingerprint: dict, devices: int, memory_bytes: int | None,
                 copy_bytes_per_s: float, gemms: list[GemmPoint], collectives: list[CollectivePoint],
                 per_call_s: float) -> str:
    """The testbed file for this machine; every figure `measured`, its source saying how."""
    cpu, cores = fingerprint["cpu_model"], fingerprint["cores"]
    description = f"{cpu}, {cores} cores, CPU (gloo on loopback between ranks)"
    lines = [f"# This machine, measured by `{command}` on {when}.",
             "# Regenerate it rather than edit it: the figures are only true of the machine in [testbed.fingerprint].",
             "", "[testbed]", f"name = {_toml_value(name)}", f"description = {_toml_value(description)}",
             f"device = {_toml_value(cpu)}",
             f"devices_per_node = {devices}", "nodes = 1", f"shared_cores = {cores}", "", "[testbed.fingerprint]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in fingerprint.items()]
    lines += ["", "[overhead]", f"per_call_s = "
              f"{_quantity(per_call_s, 'forward + backward of a 4 x 4 matmul under autograd, divided by its 3 kernels, median of 200')}"]
    lines += ["", "[memory]"]
    memory_source = "MemTotal in /proc/meminfo (the whole machine; ranks share it)"
    lines.append(f"capacity_bytes = {_quantity(memory_bytes or 1, memory_source)}")
    lines.append(f"bandwidth_bytes_per_s = "
                 f"{_quantity(copy_bytes_per_s, f'one {COPY_BYTES >> 20} MiB tensor copy, read + write bytes, median of 5')}")
    for g in gemms:
        lines += ["", "[[gemm]]", f"dtype = {_toml_value(g.dtype)}", f"threads = {g.threads}"]
        if g.shape:
            lines.append(f"shape = {_toml_value(list(g.shape))}")
        what = (f"a workload's expert GEMM, rotating over {operand_sets(g.shape, DTYPE_BYTES[g.dtype])} operand sets"
                if g.shape else f"a {LARGE_SQUARE}^3 GEMM")
        lines.append(f"flops = {_quantity(g.flops_per_s, f'torch.mm, {what}, {g.threads} thread(s), median over {GEMM_SWEEPS} passes')}")
    for c in collectives:
        sizes = ", ".join(f"{s >> 10} KiB" for s in c.sizes)
        how = f"gloo on loopback, {c.ranks} ranks, least-squares fit over {sizes} per rank"
        lines += ["", "[[collective]]", f"op = {_toml_value(c.op)}", 'scope = "intra_node"', f"ranks = {c.ranks}",
                  f"latency_s = {_quantity(c.latency_s, how + ': the intercept')}",
                  f"bus_bandwidth_bytes_per_s = {_quantity(c.bus_bandwidth_bytes_per_s, how + ': bus factor / slope')}"]
    return "\n".join(lines) + "\n"
