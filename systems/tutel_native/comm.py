"""Collectives for tutel_native: differentiable, optionally asynchronous, 2D-hierarchical.

Everything here is a pure function of tensors and a process group. The
equal-split all-to-all sends row block i of the input to rank i and puts the
block received from rank i at row block i of the output; it is its own inverse,
so its backward is the same exchange applied to the gradient.

Asynchronous use (pipelined overlap) goes through a pair of autograd
functions: :func:`a2a_start` issues the exchange and returns the (not yet
filled) receive buffer plus a ticket; :func:`a2a_wait` waits on the ticket.
Backward mirrors it: the wait's backward issues the gradient exchange, the
start's backward waits for it, so compute scheduled between the two by the
autograd engine overlaps the transfer in both directions.

2D hierarchical all-to-all (Tutel's ``use_2dh``): ranks form nodes of
``local_size`` consecutive ranks (of ``group``); first an all-to-all among the
ranks with the same local rank across nodes, then one inside each node, then a
local axis swap. It moves exactly the same blocks as the flat exchange.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_ranks(group) -> tuple[int, ...]:
    """Global ranks of `group` in group-rank order (None: the default group)."""
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


@cache
def _cached_subgroup(ranks: tuple[int, ...]):
    return dist.new_group(list(ranks), use_local_synchronization=True)


def subgroup(ranks: tuple[int, ...]):
    """A process group over these global ranks, created once and only by its members.

    `use_local_synchronization` lets a rank create just the groups it belongs
    to, so the layer's `group` may itself be a subgroup of the world.
    """
    ranks = tuple(ranks)
    if ranks == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    return _cached_subgroup(ranks)


def all_reduce_max(value: int, group=None) -> int:
    """Max of an int over the ranks of `group` (capacity agreement)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def resolve_local_size(local_size: int | None) -> int:
    """The node size for 2DH: the argument, else the LOCAL_SIZE environment variable (Tutel's)."""
    if local_size is None:
        env = os.environ.get("LOCAL_SIZE")
        if env is None:
            raise ValueError("use_2dh needs local_size (argument, or LOCAL_SIZE in the environment)")
        local_size = int(env)
    if local_size <= 0:
        raise ValueError(f"local_size must be positive, got {local_size}")
    return int(local_size)


@dataclass(frozen=True)
class Exchange:
    """An equal-split all-to-all over `group`, flat or 2D-hierarchical.

    `local_size` is None or world for the flat exchange; otherwise the world
    size must be a multiple of it.
    """

    group: object
    ranks: tuple[int, ...]
    local_size: int | None = None

    @classmethod
    def build(cls, group=None, use_2dh: bool = False, local_size: int | None = None) -> Exchange:
        ranks = group_ranks(group)
        if not use_2dh:
            return cls(group, ranks, None)
        local = resolve_local_size(local_size)
        world = len(ranks)
        if world % local:
            raise ValueError(f"world size {world} is not a multiple of local_size {local}")
        if local in (1, world):  # one level only: the hierarchical exchange is the flat one
            return cls(group, ranks, None)
        return cls(group, ranks, local)

    @property
    def world(self) -> int:
        return len(self.ranks)

    def _hier_groups(self):
        me = self.ranks.index(dist.get_rank())
        L = self.local_size
        node, local = divmod(me, L)
        cross = tuple(self.ranks[n * L + local] for n in range(self.world // L))
        inner = tuple(self.ranks[node * L + i] for i in range(L))
        return subgroup(cross), subgroup(inner)

    def start(self, x: torch.Tensor):
        """Issue the exchange of x (dim 0 = world * rows); returns (buffer, finish()).

        finish() waits and returns the received tensor (the buffer itself for
        the flat exchange; a new tensor after the intra-node stage for 2DH).
        """
        x = x.contiguous()
        out = torch.empty_like(x)
        if self.world == 1:
            out.copy_(x)
            return out, lambda: out
        if self.local_size is None:
            work = dist.all_to_all_single(out, x, group=self.group, async_op=True)

            def finish_flat():
                work.wait()
                return out

            return out, finish_flat
        cross, inner = self._hier_groups()
        L, N = self.local_size, self.world // self.local_size
        # Stage 1: block for node n (its L destinations) goes to the rank of n with my local rank.
        work = dist.all_to_all_single(out, x, group=cross, async_op=True)

        def finish_2dh():
            work.wait()
            by_local = out.view(N, L, -1).transpose(0, 1).contiguous()  # [L dest, N src, rest]
            got = torch.empty_like(by_local)
            dist.all_to_all_single(got, by_local, group=inner)  # [L src, N src, rest]
            return got.transpose(0, 1).reshape(x.shape)  # source rank = node * L + local

        return out, finish_2dh

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Synchronous, non-differentiable exchange."""
        return self.start(x)[1]()


class _Ticket:
    """Carries the pending work between a start and its wait, forward and backward."""

    __slots__ = ("finish", "grad_finish")

    def __init__(self):
        self.finish = None
        self.grad_finish = None


class _A2AStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange, ticket):
        buf, ticket.finish = exchange.start(x)
        ctx.ticket = ticket
        return buf

    @staticmethod
    def backward(ctx, _placeholder):
        grad = ctx.ticket.grad_finish()
        ctx.ticket.grad_finish = None
        return grad, None, None


class _A2AWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, exchange, ticket):
        out = ticket.finish()
        ticket.finish = None
        ctx.exchange, ctx.ticket = exchange, ticket
        return out.view_as(out) if out is buf else out

    @staticmethod
    def backward(ctx, grad):
        buf, ctx.ticket.grad_finish = ctx.exchange.start(grad)
        return buf, None, None


def a2a_start(x: torch.Tensor, exchange: Exchange):
    """Begin a differentiable all-to-all; pass the result to :func:`a2a_wait` before reading it."""
    ticket = _Ticket()
    return _A2AStart.apply(x, exchange, ticket), ticket


def a2a_wait(pending: tuple[torch.Tensor, _Ticket], exchange: Exchange) -> torch.Tensor:
    buf, ticket = pending
    return _A2AWait.apply(buf, exchange, ticket)


def all_to_all(x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Differentiable, synchronous equal-split all-to-all."""
    return a2a_wait(a2a_start(x, exchange), exchange)


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, group, size):
        ctx.group, ctx.shape = group, shard.shape
        out = shard.new_empty(size * shard.numel())
        _all_gather(out, shard.reshape(-1).contiguous(), group=group)
        return out.view((size,) + tuple(shard.shape))

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(ctx.shape.numel())
        _reduce_scatter(out, grad.reshape(-1).contiguous(), group=ctx.group)
        return out.view(ctx.shape), None, None


def gather_shards(shard: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
    """Stack the shards held by `ranks` (global ranks, in order) along a new dim 0.

    Backward reduce-scatters: each shard receives the sum of the gradients
    every member computed for it.
    """
    if len(ranks) == 1:
        return shard.unsqueeze(0)
    return _GatherShards.apply(shard, subgroup(ranks), len(ranks))
