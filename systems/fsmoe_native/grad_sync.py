"""The data-parallel gradient all-reduce, partitioned and issued inside backward (FSMoE's schedule).

A trainer usually all-reduces the replicated (non-expert) gradients once, after backward, when
the links are idle for the first time in a while: that all-reduce is exposed communication.
FSMoE instead cuts it into partitions and issues each in an idle gap of the backward pass: the
time inside an MoE layer's backward pipeline when the all-to-all link is idle. A partition
that does not fit its gap carries over to the next one.

Here: the replicated parameters are ordered as backward produces their gradients (reverse of
registration, which follows the forward); they are cut into partitions whose predicted
all-reduce time (alpha + beta * bytes, the profiled all-reduce cost) fits each MoE layer's
backward gap in turn, the gaps taken from schedule.py's prediction at the chosen backward
degree (predicted backward time minus the all-to-all stream's busy time); what is left over
forms one last partition, issued after backward like the usual all-reduce. A hook on each
parameter (``register_post_accumulate_grad_hook``) counts the partition's gradients in; when the
last one arrives, the partition's flat buffer is all-reduced asynchronously on its own process
group (so it does not queue behind the all-to-all). ``finish()``, after backward, waits for every
partition, averages, and copies the results back into the gradients; expert gradients are then
averaged over their data-parallel ranks, as the harness's one-shot sync does.

Same numbers as one all-reduce after backward: each element is the same sum over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from systems.distributed import all_reduce_flat_, data_parallel_group


@dataclass
class _Partition:
    params: list[torch.nn.Parameter]
    pending: int = 0
    flat: torch.Tensor | None = None
    work: object = None

    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def plan_partitions(sizes: list[int], gaps_bytes: list[float]) -> list[list[int]]:
    """Indices of `sizes` (gradients in backward order, bytes) cut into one partition per gap: each
    takes gradients while they fit the gap's byte budget (at least one gradient, so every gap is
    used), the budget of a gap it overflows carrying over as a debt to the next; the rest forms a
    last partition (issued after backward)."""
    partitions, i, debt = [], 0, 0.0
    for gap in gaps_bytes:
        budget, part = gap - debt, []
        while i < len(sizes) and (not part or sum(sizes[j] for j in part) + sizes[i] <= budget):
            part.append(i)
            i += 1
        if part:
            partitions.append(part)
        debt = max(0.0, sum(sizes[j] for j in part) - budget) if part else max(0.0, -budget)
    if i < len(sizes):
        partitions.append(list(range(i, len(sizes))))
    return partitions


@dataclass
class PartitionedGradientSync:
    """The harness's GradientSync contract (systems/base.py): attach() before the step, finish() after
    backward. ``gaps_bytes``: how many bytes of all-reduce fit each MoE layer's backward gap."""

    world_size: int
    ep: int
    gaps_bytes: list[float]
    partitions: list[_Partition] = field(default_factory=list)
    expert_params: list[torch.nn.Parameter] = field(default_factory=list)
    group: object = None
    plan: list[dict] = field(default_factory=list)  # what was planned, for the tuning report
    issued_in_backward: int = 0  # partitions this backward has issued from its hooks so far
    last_issued_in_backward: int = 0  # ... and in the last completed step (the rest went out in finish)

    def attach(self, module: torch.nn.Module, expert_params: list[torch.nn.Parameter]) -> None:
        expert_ids = {id(p) for p in expert_params}
        dense = [p for p in module.parameters() if p.requires_grad and id(p) not in expert_ids][::-1]
        self.expert_params = list(expert_params)
        sizes = [p.numel() * p.element_size() for p in dense]
        self.partitions = [_Partition([dense[i] for i in idx]) for idx in plan_partitions(sizes, self.gaps_bytes)]
        self.plan = [{"tensors": len(part.params), "bytes": part.bytes()} for part in self.partitions]
        self.group = dist.new_group(list(range(self.world_size)))  # every rank creates it, in the same order
        for part in self.partitions:
            for p in part.params:
                p.register_post_accumulate_grad_hook(self._arrived(part))
        self._reset()

    def _reset(self) -> None:
        self.issued_in_backward = 0
        for part in self.partitions:
            part.pending, part.flat, part.work = len(part.params), None, None

    def _arrived(self, part: _Partition):
        def hook(_param):
            part.pending -= 1
            if part.pending == 0:
                self._issue(part)
                self.issued_in_backward += 1

        return hook

    def _issue(self, part: _Partition) -> None:
        if len({p.grad.dtype for p in part.params}) > 1:
            raise ValueError("a gradient partition mixes dtypes; the model's replicated parameters must share one")
        part.flat = torch.cat([p.grad.reshape(-1) for p in part.params])
        part.work = dist.all_reduce(part.flat, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every partition (issuing any whose gradients backward did not all produce), average,
        write back; then the expert gradients over their data-parallel ranks."""
        for part in self.partitions:
            if part.work is None:  # some gradient never arrived: reduce the ones there are, now
                all_reduce_flat_([p.grad for p in part.params if p.grad is not None], self.group,
                                 divide_by=self.world_size)
                continue
            part.work.wait()
            part.flat /= self.world_size
            offset = 0
            for p in part.params:
                p.grad.copy_(part.flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        issued = self.issued_in_backward
        self._reset()
        self.last_issued_in_backward = issued
        dp = self.world_size // self.ep
        if dp > 1:
            grads = [p.grad for p in self.expert_params if p.grad is not None]
            all_reduce_flat_(grads, data_parallel_group(self.ep), divide_by=dp)
