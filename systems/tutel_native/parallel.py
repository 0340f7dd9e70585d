"""Expert parallelism for tutel_native: all-to-all, sharded experts, adaptive r, overlap.

Legend: E global experts, n local experts (1 when sharded), C capacity slots,
M model dim, Mo output dim, H expert hidden, W ranks in the layer's group,
sc sharded_count, r adaptive degree, g = sc / r ranks per weight gather,
d overlap degree, N rows an expert sees on this rank.

Layout (contract sections 1 and 4). Group rank w holds local experts
[w*n, (w+1)*n) when sc = 1; when sc > 1 it holds shard j = w % sc of expert
w // sc (hidden rows [j*H/sc, (j+1)*H/sc) for ffn, a flat ceil(numel/sc)
slice for llama_ffn). The layout never depends on r, so r switches per call.

Degree r (0 or a divisor of sc):
* r >= 1: the sc shard holders of an expert split into r "wide shards" of
  g = sc / r consecutive holders that all-gather their shards (hidden slice
  q = j // g, width H / r). Every source rank sends each of the r wide shards
  the full capacity of that expert, split into g row chunks, one per member.
  Back home, the r partial outputs are summed. r = 1: every holder has the
  whole expert and sees 1/sc of the tokens (data parallel inside the expert);
  r = sc: no gather, every holder sees all tokens (model parallel).
* r = 0: no all-to-all; every rank gathers all experts and runs its own D.

Overlap d: the capacity axis is cut into d chunks; all dispatch exchanges
are issued asynchronously up front, then each chunk's experts run as soon
as its tokens arrive while later chunks are still in flight, and each
chunk's combine exchange is issued as soon as it is computed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from systems.tutel_native.comm import Exchange, a2a_start, a2a_wait, gather_shards, group_ranks
from systems.tutel_native.experts import RowSpec, activation_kind, expert_rows


def divisors(value: int) -> list[int]:
    return [k for k in range(1, value + 1) if value % k == 0]


@dataclass(frozen=True)
class ShardPlan:
    """Who holds which expert (shard) in the layer's group."""

    ranks: tuple[int, ...]  # global ranks of the group, in group order
    rank: int  # this rank's index in the group
    num_global_experts: int
    num_local_experts: int
    sharded_count: int

    @classmethod
    def build(cls, num_experts_per_device: int, group=None) -> ShardPlan:
        ranks = group_ranks(group) if dist.is_initialized() else (0,)
        world = len(ranks)
        rank = ranks.index(dist.get_rank()) if dist.is_initialized() else 0
        return cls.for_world(num_experts_per_device, world, rank, ranks)

    @classmethod
    def for_world(cls, num_experts_per_device: int, world: int, rank: int = 0, ranks=None) -> ShardPlan:
        n = int(num_experts_per_device)
        if n == 0:
            raise ValueError("num_experts_per_device must be non-zero")
        if n > 0:
            E, local, sc = n * world, n, 1
        else:
            if world % -n:
                raise ValueError(f"world size {world} is not divisible by -num_experts_per_device ({-n})")
            E = world // -n
            local, sc = 1, world // E
        return cls(tuple(ranks) if ranks is not None else tuple(range(world)), rank, E, local, sc)

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def expert_index(self) -> int:
        """Global index of this rank's (first) expert."""
        return self.rank // self.sharded_count if self.sharded_count > 1 else self.rank * self.num_local_experts

    @property
    def shard_index(self) -> int:
        return self.rank % self.sharded_count

    def valid_degrees(self) -> list[int]:
        return [0, *divisors(self.sharded_count)]

    def check_degree(self, r: int) -> int:
        if r not in self.valid_degrees():
            raise ValueError(
                f"adaptive_r={r!r} is not valid for sharded_count {self.sharded_count}; "
                f"choose one of {self.valid_degrees()}"
            )
        return int(r)

    def gather_width(self, r: int) -> int:
        return self.world if r == 0 else self.sharded_count // r

    def wide_shard(self, r: int) -> int:
        """q: which 1/r hidden slice of its expert this rank computes under degree r >= 1."""
        return self.shard_index // (self.sharded_count // r)

    def gather_ranks(self, r: int) -> tuple[int, ...]:
        """Global ranks whose shards this rank all-gathers under degree r."""
        if r == 0:
            return self.ranks
        g = self.sharded_count // r
        first = (self.rank // g) * g
        return self.ranks[first : first + g]

    def expert_ranks(self) -> tuple[int, ...]:
        """The sc holders of this rank's expert."""
        first = (self.rank // self.sharded_count) * self.sharded_count
        return self.ranks[first : first + self.sharded_count]

    def capacity_multiple(self, overlap_degree: int) -> int:
        """C must be a multiple of this for every r (contract: sc * d)."""
        return self.sharded_count * overlap_degree


# ----------------------------------------------------------------------------------------------
# Expert weights as seen under degree r, and the functional expert math.


@dataclass
class ExpertWeights:
    """The weights one rank computes with under some r (differentiable views of its params).

    kind 'ffn':       w1 [n, Hr, M], w2 [n, Hr, Mo], b1 [n, Hr] | None, b2 [n, Mo] | None
    kind 'llama_ffn': w1 [n, M, Hr], w2 [n, M, Hr], w3 [n, Hr, M]
    b2_scale is 1 on exactly one of the r partial sums of each expert, else 0,
    so the fc2 bias is added once and still sits in every rank's graph.
    """

    kind: str
    activation: Callable[[torch.Tensor], torch.Tensor]
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    b2_scale: float = 1.0
    kernel: str = "auto"  # expert_ops.KERNELS

    def __call__(self, x_nNM: torch.Tensor) -> torch.Tensor:
        """[n, N, M] -> [n, N, Mo] (every row computed)."""
        n, N, M = x_nNM.shape
        return self.compute_rows(x_nNM.reshape(n * N, M), (N,) * n).view(n, N, -1)

    def compute_rows(self, x_RM: torch.Tensor, splits) -> torch.Tensor:
        """Expert e on the next splits[e] rows of x: [R, M] -> [R, Mo] (experts.py's kernels)."""
        dt = x_RM.dtype

        def cast(t):
            return None if t is None else t.to(dt)

        gated = self.kind == "llama_ffn"
        spec = RowSpec(tuple(splits), activation_kind(self.activation), self.activation, gated,
                       in_transposed=not gated, kernel=self.kernel)
        b2 = None if self.b2 is None else self.b2 * self.b2_scale
        w_gate, w_out = (self.w2, self.w3) if gated else (None, self.w2)
        return expert_rows(x_RM, spec, cast(self.w1), cast(w_gate), cast(w_out), cast(self.b1), cast(b2))


def _gather_rows(shard: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
    """Concatenate the ranks' [n, rows, ...] shards along dim 1 (sc > 1, so n = 1)."""
    stacked = gather_shards(shard, ranks)  # [g, n, rows, ...]
    g, n = stacked.shape[:2]
    return stacked.transpose(0, 1).reshape(n, g * shard.shape[1], *shard.shape[2:])


def _gather_all_experts(shard: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    """r = 0: [n, rows, ...] shards of every rank -> [E, sc*rows, ...] (expert-major, shard order)."""
    stacked = gather_shards(shard, plan.ranks)  # [W, n, rows, ...]
    E = plan.num_global_experts
    return stacked.reshape(E, plan.sharded_count * shard.shape[1], *shard.shape[2:])


def ffn_weights(params: dict, activation, plan: ShardPlan, r: int, output_dim: int) -> ExpertWeights:
    """params: batched_fc1_w [n, H/sc, M], batched_fc2_w [n, H/sc, Mo], optional
    batched_fc1_bias [n, H/sc], batched_fc2_bias [n, ceil(Mo/sc)]."""
    w1, w2 = params["batched_fc1_w"], params["batched_fc2_w"]
    b1, b2 = params.get("batched_fc1_bias"), params.get("batched_fc2_bias")
    sc = plan.sharded_count
    if r == 0:
        w1, w2 = _gather_all_experts(w1, plan), _gather_all_experts(w2, plan)
        b1 = None if b1 is None else _gather_all_experts(b1, plan)
        b2 = None if b2 is None else _gather_all_experts(b2, plan)[:, :output_dim]
        return ExpertWeights("ffn", activation, w1, w2, b1=b1, b2=b2)
    if sc == 1:
        return ExpertWeights("ffn", activation, w1, w2, b1=b1, b2=None if b2 is None else b2[:, :output_dim])
    ranks = plan.gather_ranks(r)
    w1, w2 = _gather_rows(w1, ranks), _gather_rows(w2, ranks)
    b1 = None if b1 is None else _gather_rows(b1, ranks)
    if b2 is not None:
        b2 = _gather_rows(b2, plan.expert_ranks())[:, :output_dim]
    return ExpertWeights("ffn", activation, w1, w2, b1=b1, b2=b2, b2_scale=1.0 if plan.wide_shard(r) == 0 else 0.0)


def llama_weights(params: dict, activation, plan: ShardPlan, r: int, model_dim: int, hidden: int) -> ExpertWeights:
    """params: flat W_fc1, W_fc2 (full [n, M, H]) and W_fc3 (full [n, H, M]), each rank a
    ceil(numel/sc) slice. Shards are gathered whole, then cut to this rank's hidden slice."""
    sc, n = plan.sharded_count, plan.num_local_experts
    numel = n * model_dim * hidden

    def full(flat: torch.Tensor, ranks) -> torch.Tensor:
        stacked = gather_shards(flat, ranks)  # [len(ranks), ceil(numel/sc)]
        per_expert = stacked.reshape(len(ranks) // sc, -1)[:, :numel]
        return per_expert.reshape(-1, model_dim * hidden)

    if sc == 1 and r != 0:
        w1 = params["W_fc1"].view(n, model_dim, hidden)
        w2 = params["W_fc2"].view(n, model_dim, hidden)
        w3 = params["W_fc3"].view(n, hidden, model_dim)
        return ExpertWeights("llama_ffn", activation, w1, w2, w3)
    ranks = plan.ranks if r == 0 else plan.expert_ranks()
    w1 = full(params["W_fc1"], ranks).view(-1, model_dim, hidden)
    w2 = full(params["W_fc2"], ranks).view(-1, model_dim, hidden)
    w3 = full(params["W_fc3"], ranks).view(-1, hidden, model_dim)
    if r > 1:
        if hidden % r:
            raise ValueError(f"llama_ffn hidden size {hidden} is not divisible by adaptive_r {r}")
        width, q = hidden // r, plan.wide_shard(r)
        w1, w2 = w1[:, :, q * width : (q + 1) * width], w2[:, :, q * width : (q + 1) * width]
        w3 = w3[:, q * width : (q + 1) * width, :]
    return ExpertWeights("llama_ffn", activation, w1, w2, w3)


# ----------------------------------------------------------------------------------------------
# Dispatch -> experts -> combine.


def _to_send(D_EcM: torch.Tensor, plan: ShardPlan, r: int) -> torch.Tensor:
    """[E, c, M] -> [W * n * rows, M]: for each destination rank, what it must receive."""
    E, c, M = D_EcM.shape
    if plan.sharded_count == 1:
        return D_EcM.reshape(plan.world * plan.num_local_experts * c, M)
    g = plan.sharded_count // r
    # destination e*sc + q*g + m gets rows chunk m of expert e, for every wide shard q
    return D_EcM.reshape(E, 1, g, c // g, M).expand(E, r, g, c // g, M).reshape(-1, M)


def _from_received(recv: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    """[W * n * rows, M] received -> [n, W * rows, M] (source ranks along the rows)."""
    n = plan.num_local_experts
    return recv.reshape(plan.world, n, -1, recv.shape[-1]).transpose(0, 1).reshape(n, -1, recv.shape[-1])


def _to_return(y_nNM: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    n, N, Mo = y_nNM.shape
    return y_nNM.reshape(n, plan.world, N // plan.world, Mo).transpose(0, 1).reshape(-1, Mo)


def _from_returned(back: torch.Tensor, plan: ShardPlan, r: int, c: int) -> torch.Tensor:
    """[W * n * rows, Mo] back home -> [E, c, Mo], summing the r partial outputs."""
    E, Mo = plan.num_global_experts, back.shape[-1]
    if plan.sharded_count == 1:
        return back.reshape(E, c, Mo)
    g = plan.sharded_count // r
    return back.reshape(E, r, g, c // g, Mo).sum(1).reshape(E, c, Mo)


@dataclass
class LiveRows:
    """Which received rows hold tokens, so the experts skip the padding slots.

    Slots fill from 0, so in every block of consecutive slots one source rank sends one
    expert, the first ``fill - block start`` rows are live and the rest are zero padding
    whose outputs are never combined. ``fill_WE[w, e]`` = min(count, C) of source rank w
    for global expert e (all-gathered once per step: E integers per rank)."""

    fill_WE: torch.Tensor  # [W, E] int64, on the CPU
    rows_computed: int = 0  # rows the experts actually ran on this step

    def run(self, expert_fn, x_nNM: torch.Tensor, experts: list[int], sources: list[int], start: int) -> torch.Tensor:
        """expert_fn on the live rows of x [n, S * rows, M] (n experts, S source blocks each
        starting at slot ``start``); padding rows of the result are zero."""
        n, N, M = x_nNM.shape
        rows = N // len(sources)
        live_nS = (self.fill_WE[sources][:, experts].t() - start).clamp(0, rows)
        splits_n = live_nS.sum(1)
        live = int(splits_n.sum())
        self.rows_computed += live
        if live == n * N:
            return expert_fn(x_nNM)
        keep_R = (torch.arange(rows) < live_nS.unsqueeze(-1)).reshape(-1)
        idx_L = keep_R.nonzero().squeeze(1).to(x_nNM.device)
        y_LO = expert_fn.compute_rows(x_nNM.reshape(n * N, M).index_select(0, idx_L), splits_n.tolist())
        return y_LO.new_zeros(n * N, y_LO.shape[1]).index_copy(0, idx_L, y_LO).view(n, N, -1)


def _received_block(plan: ShardPlan, r: int, chunk_start: int, c: int) -> tuple[list[int], int]:
    """(global experts, first slot) of the rows this rank receives for a capacity chunk
    [chunk_start, chunk_start + c) (see _to_send: member m of a gather group gets row chunk m)."""
    if plan.sharded_count == 1:
        first = plan.expert_index
        return list(range(first, first + plan.num_local_experts)), chunk_start
    g = plan.sharded_count // r
    m = plan.shard_index % g
    return [plan.expert_index], chunk_start + m * (c // g)


def check_capacity(capacity: int, plan: ShardPlan, r: int, overlap_degree: int) -> None:
    need = overlap_degree * (1 if r == 0 else plan.sharded_count // r)
    if capacity % need:
        raise ValueError(
            f"capacity {capacity} is not a multiple of {need} (overlap degree {overlap_degree} x "
            f"sharded_count/r); round it up to a multiple of sc*d = {plan.capacity_multiple(overlap_degree)}"
        )


def run_experts(
    D_ECM: torch.Tensor,
    expert_fn: Callable[[torch.Tensor], torch.Tensor],
    plan: ShardPlan,
    r: int,
    overlap_degree: int = 1,
    exchange: Exchange | None = None,
    live: LiveRows | None = None,
) -> torch.Tensor:
    """Encoded tokens D[E, C, M] of this rank -> expert outputs Y[E, C, Mo] for them.

    expert_fn maps [n, N, M] -> [n, N, Mo] with the weights of degree r (see
    ffn_weights / llama_weights); it sees all E experts when r = 0. With ``live`` (built-in
    experts only: expert_fn.compute_rows) the experts run on the live rows only.
    """
    E, C, M = D_ECM.shape
    if E != plan.num_global_experts:
        raise ValueError(f"dispatch buffer has {E} experts, the layer has {plan.num_global_experts}")
    d = int(overlap_degree)
    if d < 1:
        raise ValueError(f"a2a_ffn_overlap_degree must be >= 1, got {overlap_degree}")
    check_capacity(C, plan, r, d)
    if r == 0 or plan.world == 1:
        return expert_fn(D_ECM) if live is None else live.run(expert_fn, D_ECM, list(range(E)), [plan.rank], 0)
    exchange = exchange or Exchange.build()
    chunks = D_ECM.chunk(d, dim=1) if d > 1 else (D_ECM,)
    sent = [a2a_start(_to_send(chunk, plan, r), exchange) for chunk in chunks]
    returning, chunk_start = [], 0
    for pending, chunk in zip(sent, chunks, strict=True):
        x_nNM = _from_received(a2a_wait(pending, exchange), plan)
        if live is None:
            y_nNO = expert_fn(x_nNM)
        else:
            experts, start = _received_block(plan, r, chunk_start, chunk.shape[1])
            y_nNO = live.run(expert_fn, x_nNM, experts, list(range(plan.world)), start)
        chunk_start += chunk.shape[1]
        returning.append(a2a_start(_to_return(y_nNO, plan), exchange))
    outs = [
        _from_returned(a2a_wait(pending, exchange), plan, r, chunk.shape[1])
        for pending, chunk in zip(returning, chunks, strict=True)
    ]
    return outs[0] if d == 1 else torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------
# Replicated (gate) gradients.


def is_expert_param(param: torch.Tensor) -> bool:
    return bool(getattr(param, "skip_allreduce", False))


def allreduce_gate_gradients(module: torch.nn.Module, group=None, average: bool = True) -> int:
    """All-reduce the gradients of the replicated (non-expert) parameters over `group`.

    Tutel leaves this to the user; we ship it and do it here, explicitly:
    every parameter NOT marked ``skip_allreduce`` (the gates) gets its
    gradient summed over the data-parallel group and, by default, divided by
    its size (the mean, as DDP does). Expert parameters are left alone: their
    gradients already are the sum over ranks of every rank's tokens, because
    the all-to-all backward carried them home. Returns how many tensors were
    reduced. One flat buffer, one collective per dtype.
    """
    if not dist.is_initialized():
        return 0
    world = dist.get_world_size(group)
    grads = [p.grad for p in module.parameters() if p.grad is not None and not is_expert_param(p)]
    if world == 1 or not grads:
        return len(grads)
    from systems.distributed import all_reduce_flat_

    all_reduce_flat_(grads, group, divide_by=world if average else 1)
    return len(grads)


# ----------------------------------------------------------------------------------------------
# The layer's seam (layer.MoELayer._expert_step calls this at world size > 1).


def layer_shard_plan(layer) -> ShardPlan:
    plan = getattr(layer, "_shard_plan", None)
    if plan is None:
        ranks = group_ranks(layer.group)
        plan = ShardPlan(ranks, layer.rank, layer.num_global_experts, layer.num_local_experts, layer.sharded_count)
        layer._shard_plan = plan
    return plan


def layer_exchange(layer) -> Exchange:
    key = (layer.use_2dh, layer.local_size)
    cached = getattr(layer, "_exchange", None)
    if cached is None or cached[0] != key:
        cached = (key, Exchange.build(layer.group, layer.use_2dh, layer.local_size))
        layer._exchange = cached
    return cached[1]


def layer_expert_fn(layer, plan: ShardPlan, r: int, kernel: str | None = None):
    """The [n, N, M] -> [n, N, O] function of this rank's experts under degree r (kernel: the layer's
    expert_kernel unless given)."""
    kernel = kernel or layer.expert_kernel
    experts = layer.experts
    params = dict(zip(experts.present_weight_names(), layer.expert_weights(), strict=True)) if hasattr(
        experts, "present_weight_names"
    ) else None
    if params is not None and "batched_fc1_w" in params:
        return replace(ffn_weights(params, experts.act, plan, r, experts.output_dim), kernel=kernel)
    if params is not None and "W_fc1" in params:
        weights = llama_weights(params, experts.act, plan, r, experts.model_dim, experts.hidden)
        return replace(weights, kernel=kernel)
    if r == 0 and plan.world > 1:
        raise ValueError("adaptive_r=0 needs built-in experts (ffn or llama_ffn): custom experts cannot be gathered")
    return lambda x_nNM: experts(x_nNM, ctx=layer)


def expert_step(layer, dispatched_RM: torch.Tensor, route) -> torch.Tensor:
    """Padded dispatch rows [E*C, M] of this rank -> expert outputs [E*C, O] (all-to-all, r, d, 2DH)."""
    if not route.padded:
        raise ValueError("the distributed expert step needs the padded [E*C, M] dispatch buffer")
    plan = layer_shard_plan(layer)
    r = plan.check_degree(route.adaptive_r if route.adaptive_r is not None else layer.adaptive_r)
    d = route.overlap_degree
    E, C = plan.num_global_experts, route.capacity
    D_ECM = dispatched_RM.view(E, C, -1)
    live, kernel = None, None
    if layer.expert_layout != "capacity" and hasattr(layer.experts, "compute_rows"):
        live = LiveRows(gather_fills(route.fill_E, layer.group, D_ECM.device))
        if layer._uses_cost_model():  # live rows with the cheapest kernel, or every padded row in one bmm
            if layer.kernel_cost_model is None:  # every rank gets here at its first step (prepare not called)
                layer.prepare_kernel_choice(route.num_tokens, D_ECM.device, D_ECM.dtype, route.top_k)
            first = plan.expert_index
            fills = live.fill_WE[:, first : first + plan.num_local_experts].sum(0).tolist()
            kernel, layout = layer.choose_kernel(fills, padded_rows=plan.num_local_experts * plan.world * C)
            if layout != "live":
                live = None
    expert_fn = layer_expert_fn(layer, plan, r, kernel)
    layer.phase_clock.tick("a2a")
    Y_ECO = run_experts(D_ECM, expert_fn, plan, r, d, layer_exchange(layer), live)
    layer.phase_clock.tick("experts")  # with overlap, exchange and compute interleave: one figure
    if live is not None:
        layer._rows_computed = live.rows_computed
    elif r == 0 or plan.world == 1:
        layer._rows_computed = E * C
    else:
        layer._rows_computed = plan.num_local_experts * plan.world * C // (plan.sharded_count // r)
    return Y_ECO.reshape(E * C, -1)


def gather_fills(fill_E: list[int], group, device) -> torch.Tensor:
    """[W, E] live slots of every rank of the group per global expert (one small all-gather)."""
    mine_E = torch.tensor(fill_E, dtype=torch.int64, device=device)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine_E.unsqueeze(0).cpu()
    everyone = [torch.empty_like(mine_E) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine_E, group=group)
    return torch.stack(everyone).cpu()
