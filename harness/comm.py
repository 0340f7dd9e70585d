"""Collective micro-benchmarks on the current torch.distributed world.

Run on every rank (started by torchrun via ``python -m harness comm``). For
each collective and message size we time ``iters`` calls between barriers
with ``time.perf_counter`` (CUDA events on GPU would add nothing here: we
synchronise before reading the clock), take the slowest rank's time per
call, and report latency plus bandwidth in nccl-tests' conventions:

* algbw = bytes / time, where bytes is the size of one rank's buffer;
* busbw = algbw * factor, with factor 2(n-1)/n for all-reduce and (n-1)/n
  for all-gather, reduce-scatter and all-to-all, so that busbw is comparable
  across world sizes (it approximates the per-link traffic).

A least-squares fit ``t(n) = alpha + n * beta`` per collective gives the
latency and inverse bandwidth used by the performance model (the alpha-beta
model of FSMoE, ``docs/workloads-and-papers.md``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harness.results_model import COLLECTIVES  # the collectives are the results schema's "comm" modes


def bus_factor(op: str, world: int) -> float:
    if world == 1:
        return 0.0
    return 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world


@dataclass
class CommSample:
    op: str
    bytes: int
    world_size: int
    samples_s: list[float]  # per call, slowest rank


def _run_once(op: str, buf: torch.Tensor, out: torch.Tensor, world: int) -> None:
    if op == "all_to_all":
        dist.all_to_all_single(out, buf)
    elif op == "all_reduce":
        dist.all_reduce(buf)
    elif op == "all_gather":
        dist.all_gather_into_tensor(out, buf)
    elif op == "reduce_scatter":
        dist.reduce_scatter_tensor(out, buf)
    else:
        raise ValueError(f"unknown collective {op!r}; choose from {', '.join(COLLECTIVES)}")


def _buffers(op: str, nbytes: int, world: int, device: str):
    """One rank's buffer of `nbytes` (fp32), rounded to a multiple of the world size."""
    numel = max(world, (nbytes // 4) // world * world)
    buf = torch.ones(numel, dtype=torch.float32, device=device)
    if op == "all_gather":
        out = torch.empty(numel * world, dtype=torch.float32, device=device)
    elif op == "reduce_scatter":
        out = torch.empty(numel // world, dtype=torch.float32, device=device)
    else:
        out = torch.empty_like(buf)
    return buf, out, numel * 4


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_collective(op: str, nbytes: int, iters: int, warmup: int, device: str = "cpu") -> CommSample:
    world = dist.get_world_size()
    buf, out, actual = _buffers(op, nbytes, world, device)
    for _ in range(warmup):
        _run_once(op, buf, out, world)
    local = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        _run_once(op, buf, out, world)
        _sync(device)
        local.append(time.perf_counter() - start)
    times = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return CommSample(op, actual, world, times.tolist())


def fit_alpha_beta(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (alpha seconds, beta seconds/byte) of t = alpha + bytes * beta."""
    n = len(points)
    if n < 2:
        raise ValueError("need at least two message sizes to fit alpha and beta")
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    beta = sxy / sxx if sxx else 0.0
    return mean_y - beta * mean_x, beta


# ------------------------------------------------------------ per-rank entry

def run_sweep(ops: list[str], sizes: list[int], iters: int, warmup: int, device: str) -> list[dict]:
    """Every (collective, size) on the current world; a dict per measurement (slowest-rank samples)."""
    results = []
    for op in ops:
        for nbytes in sizes:
            sample = time_collective(op, nbytes, iters, warmup, device)
            results.append({"op": op, "bytes": sample.bytes, "world_size": sample.world_size,
                             "samples_s": sample.samples_s})
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.comm CONFIG.json OUT.json`` on every rank (torchrun); rank 0 writes OUT."""
    import json
    import os
    import sys

    config_path, out_path = argv if argv is not None else sys.argv[1:]
    config = json.loads(open(config_path).read())
    device = config.get("device", "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        results = run_sweep(config["ops"], config["sizes"], config["iters"], config["warmup"], device)
        if dist.get_rank() == 0:
            from harness.files import write_json_atomic

            write_json_atomic({"backend": dist.get_backend(), "results": results}, out_path, indent=None)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
