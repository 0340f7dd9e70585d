"""Data-parallel gradient synchronisation, as a trainer does after backward."""
from __future__ import annotations

import torch
import torch.distributed as dist

from core.values import ParallelSpec
from systems.distributed import all_reduce_flat_, data_parallel_group


def sync_gradients(module: torch.nn.Module, expert_params: list[torch.Tensor], parallel: ParallelSpec) -> None:
    """Data-parallel gradient averaging, as a trainer does after backward.

    Replicated parameters (attention, embeddings, gates) are averaged over the
    whole world; expert parameters only over the dp ranks that hold the same
    experts (their expert-parallel gradients already arrived through the
    all-to-all's backward). No-op at world size 1.
    """
    if parallel.world_size == 1 or not dist.is_initialized():
        return
    expert_ids = {id(p) for p in expert_params}
    dense = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in expert_ids]
    all_reduce_flat_(dense, None, divide_by=parallel.world_size)
    if parallel.dp > 1:
        experts = [p.grad for p in expert_params if p.grad is not None]
        all_reduce_flat_(experts, data_parallel_group(parallel.ep), divide_by=parallel.dp)
