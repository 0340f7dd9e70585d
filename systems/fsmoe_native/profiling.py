"""Online profiling of the ops FSMoE's schedule models, on the live process group.

Each op is timed at a few sizes around the layer's own work (schedule.LayerWork), and
alpha + beta * work is fitted by least squares (schedule.fit). Every rank runs the same
sequence; each point's time is the slowest rank's (an all-reduce of the maximum), so every
rank fits the same constants and chooses the same degrees. Units: milliseconds, and the
work terms of schedule.py (elements for the collectives, multiply-adds for the GEMMs).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from systems.fsmoe_native.schedule import LayerWork, Profile, fit

FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # of the layer's work, the sizes each op is timed at
REPEATS = 3  # timed runs per size after one warm-up; the fastest counts


def _slowest_ms(run, group) -> float:
    """The fastest of REPEATS runs on this rank, then the maximum over the group's ranks."""
    run()
    times = []
    for _ in range(REPEATS):
        dist.barrier(group=group)
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor([min(times)], dtype=torch.float64)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
    return float(ms)


def _a2a_ms(tokens: int, width: int, dtype, gen, group) -> float:
    x = torch.randn(tokens, width, generator=gen, dtype=dtype)
    out = torch.empty_like(x)
    return _slowest_ms(lambda: dist.all_to_all_single(out, x, group=group), group)


def _gemm_ms(num_local: int, rows: int, width: tuple[int, int], n_gemm: int, dtype, gen, group) -> float:
    """The experts' forward GEMMs: n_gemm - 1 into the hidden width, one back."""
    M, H = width
    xs = torch.randn(num_local, rows, M, generator=gen, dtype=dtype)
    w = torch.randn(num_local, M, H, generator=gen, dtype=dtype)
    w_out = torch.randn(num_local, H, M, generator=gen, dtype=dtype)

    def gemms():
        h = torch.bmm(xs, w)
        for _ in range(n_gemm - 2):
            h = h * torch.bmm(xs, w)
        torch.bmm(h, w_out)

    return _slowest_ms(gemms, group)


def _allreduce_ms(numel: int, dtype, gen, group) -> float:
    grad = torch.randn(numel, generator=gen, dtype=dtype)
    return _slowest_ms(lambda: dist.all_reduce(grad, group=group), group)


def _intra_ms(kind: str, rows: int, width: int, size: int, dtype, gen, group, intra) -> float:
    """All-gather (rows per holder in, size x rows out) or reduce-scatter (the reverse) on `intra`."""
    small = torch.randn(rows, width, generator=gen, dtype=dtype)
    big = torch.randn(size * rows, width, generator=gen, dtype=dtype)
    if kind == "allgather":
        return _slowest_ms(lambda: dist.all_gather_into_tensor(big, small, group=intra), group)
    return _slowest_ms(lambda: dist.reduce_scatter_tensor(small, big, group=intra), group)


def profile_layer(work: LayerWork, world: int, num_local: int, dtype: torch.dtype, group=None,
                  gemm_width: tuple[int, int] | None = None, intra_group=None) -> Profile:
    """Time the all-to-all, the expert GEMMs and the all-reduce at FRACTIONS of the layer's work, and with
    sharded experts (work.es > 1) the all-gather and reduce-scatter among an expert's holders.

    gemm_width: (M, H) of one expert's slice on this rank (default: the work's m and h / es)."""
    width = gemm_width or (work.m, work.h // work.es)
    points: dict[str, list] = {"a2a": [], "gemm": [], "allreduce": []}
    if work.es > 1:
        points.update(allgather=[], reducescatter=[])
    gen = torch.Generator().manual_seed(0)
    element = torch.empty((), dtype=dtype).element_size()
    for frac in FRACTIONS:
        tokens = max(world, int(work.tokens * frac) // world * world)  # rows: a multiple of the ranks
        rows = max(1, work.es * tokens // num_local)  # sharded: a holder computes its partners' rows too
        points["a2a"].append([tokens * width[0], _a2a_ms(tokens, width[0], dtype, gen, group)])
        points["gemm"].append([num_local * rows * width[0] * width[1] * work.n_gemm,
                               _gemm_ms(num_local, rows, width, work.n_gemm, dtype, gen, group)])
        points["allreduce"].append([tokens * width[0] * element, _allreduce_ms(tokens * width[0], dtype, gen, group)])
        if work.es > 1:  # a holder all-gathers the rows its es partners received: es x tokens rows
            for kind in ("allgather", "reducescatter"):
                points[kind].append([work.es * tokens * width[0],
                                     _intra_ms(kind, tokens, width[0], work.es, dtype, gen, group, intra_group)])
    costs = {op: fit([tuple(p) for p in pts]) for op, pts in points.items()}
    if work.es == 1:  # the intra-node collectives do not run (schedule.py gives them no work)
        costs["allgather"] = costs["reducescatter"] = costs["a2a"]
    return Profile(costs, points)
