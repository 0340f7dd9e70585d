"""torch.distributed primitives the systems (and the harness) use: process groups and collectives.

Ranks are started by torchrun (or anything honouring its environment
contract: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Backend:
gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
import socket
from functools import cache

import torch
import torch.distributed as dist

from core.values import ParallelSpec


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it for a bind to port 0).

    The one helper for a rendezvous port: the launcher's torchrun endpoint, a
    lone peer process's MASTER_PORT, and the tests' spawned worlds.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_default_process_group(parallel: ParallelSpec, device: str = "cpu") -> None:
    """Join the process group described by torchrun's environment (no-op at world size 1)."""
    if parallel.world_size == 1 or dist.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != parallel.world_size:
        raise RuntimeError(f"WORLD_SIZE is {world} but the trial asks for {parallel.world_size} ranks")
    dist.init_process_group(backend=backend_for(device))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@cache
def _groups_of(size: int):
    """Consecutive blocks of `size` ranks; every rank must create every group."""
    world = dist.get_world_size()
    return [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]


def expert_parallel_group(ep: int):
    """(group, rank in group) for consecutive blocks of `ep` ranks."""
    r = dist.get_rank()
    return _groups_of(ep)[r // ep], r % ep


class _AllToAllUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all_uneven(x: torch.Tensor, send_counts: torch.Tensor, group=None):
    """Row-wise all-to-all with per-destination row counts; differentiable.

    Returns (received rows, received counts per source rank).
    """
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    return _AllToAllUneven.apply(x, send, recv, group), recv_counts


def data_parallel_group(ep: int):
    """The ranks holding the same experts as this one: r, r+ep, r+2ep, ... (every rank creates every group)."""
    world, r = dist.get_world_size(), dist.get_rank()
    groups = _dp_groups(ep, world)
    return groups[r % ep]


@cache
def _dp_groups(ep: int, world: int):
    return [dist.new_group(list(range(first, world, ep))) for first in range(ep)]


def all_reduce_flat_(tensors: list[torch.Tensor], group=None, divide_by: int = 1) -> None:
    """Sum `tensors` in place over `group` (then divide), one flat buffer and one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for bucket in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        if divide_by != 1:
            flat /= divide_by
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
