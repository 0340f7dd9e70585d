"""tutel_native across ranks (gloo, spawned processes): expert parallel, sharded
experts with every adaptive r, overlap degrees, 2D hierarchical all-to-all,
inequivalent token counts, the gate-gradient all-reduce.

Reference: on every rank, a world-size-1 layer holding all E experts (the
gathered checkpoint) run on that rank's tokens. Outputs, input and gate
gradients must match per rank; expert gradients must equal the sum over ranks
of the reference's, cut to this rank's shard.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from systems.distributed import free_port
from systems.tutel_native import checkpoint
from systems.tutel_native.comm import Exchange, all_to_all, subgroup
from systems.tutel_native.layer import MoELayer
from systems.tutel_native.parallel import ShardPlan, allreduce_gate_gradients, run_experts

M, H = 8, 16
ATOL, RTOL = 2e-5, 1e-4


# ---- spawning ----------------------------------------------------------------------------------


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; a failing rank fails the test.

    Ranks fork from one forkserver that imported torch once (a fresh spawn
    pays the torch import per rank, seconds each on a loaded 2-core machine);
    the server never ran torch ops, so forking it is safe.
    """
    mp.set_forkserver_preload(["torch", "torch.distributed", __name__, fn.__module__])
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="forkserver")


# ---- reference comparison ------------------------------------------------------------------------


def make_layer(experts: dict, k: int, group=None, **kw) -> MoELayer:
    gate = {"type": "top", "k": k}
    return MoELayer(gate, M, dict(experts), group=group, seeds=(1, 2, 3), **kw)


def single_reference(layer: MoELayer, experts: dict, k: int) -> MoELayer:
    """A world-size-1 layer with all of `layer`'s experts (via the checkpoint gather)."""
    states = [None] * dist.get_world_size()
    local = {key: t.detach().clone() for key, t in layer.state_dict().items()}
    dist.all_gather_object(states, local)
    full = checkpoint.gather(states, hidden_size=H)
    solo = subgroup((dist.get_rank(),))
    ref = make_layer({**experts, "num_experts_per_device": layer.num_global_experts}, k, group=solo)
    ref.load_state_dict(full)
    return ref


def run_step(layer, x, dy, **forward_kw):
    x = x.clone().requires_grad_(True)
    y = layer(x, **forward_kw)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def compare_with_reference(rank, world, experts, k, settings, cf=0.0, tokens=32, inequivalent=False, **layer_kw):
    """For each (r, d) in settings: distributed step == single-process step on this rank's tokens."""
    layer = make_layer(experts, k, **layer_kw)
    layer.expert_layout = "live"  # the experts skip the padding (the cost model may otherwise choose a bmm over it)
    ref = single_reference(layer, experts, k)
    S = tokens + (8 * rank if inequivalent else 0)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(S, M, generator=gen)
    dy = torch.randn(S, layer.experts.output_dim if hasattr(layer.experts, "output_dim") else M, generator=gen)
    y_ref, dx_ref, g_ref = run_step(ref, x, dy, capacity_factor=cf)
    E = layer.num_global_experts
    for name, grad in g_ref.items():  # expert grads: sum over ranks, cut to this rank's part
        if name.startswith("experts."):
            dist.all_reduce(grad)
            g_ref[name] = checkpoint.shard_expert_tensor(name.split(".", 1)[1], grad, E, world, rank)
    for r, d in settings:
        layer.zero_grad()
        y, dx, grads = run_step(
            layer, x, dy, capacity_factor=cf, adaptive_r=r, a2a_ffn_overlap_degree=d, inequivalent_tokens=inequivalent
        )
        where = f"rank {rank} r={r} d={d}"
        torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL, msg=lambda m, w=where: f"{w} output: {m}")
        torch.testing.assert_close(dx, dx_ref, atol=ATOL, rtol=RTOL, msg=lambda m, w=where: f"{w} dx: {m}")
        assert set(grads) == set(g_ref)
        # padding slots cost no GEMM rows: every live choice is computed once per wide shard (r of
        # them when experts are sharded, else once), summed over the group
        totals = torch.tensor([layer.last_stats.rows_computed, layer.last_stats.live_rows])
        dist.all_reduce(totals)
        copies = r if r >= 1 and layer.sharded_count > 1 else 1
        assert totals[0] == copies * totals[1], f"{where}: experts ran on {totals.tolist()} (rows, live) rows"
        for name, g in grads.items():
            label = f"{where} {name}"
            torch.testing.assert_close(g, g_ref[name], atol=ATOL, rtol=RTOL, msg=lambda m, w=label: f"{w}: {m}")


FFN = {"type": "ffn", "hidden_size_per_expert": H, "has_fc1_bias": True, "has_fc2_bias": True}
LLAMA = {"type": "llama_ffn", "hidden_size_per_expert": H}


def _expert_parallel_2(rank, world):
    # sc = 1, two experts per rank, dropless and capacity-limited, overlap 1/2/4, and r = 0
    settings = [(1, 1), (1, 2), (1, 4), (0, 1)]
    compare_with_reference(rank, world, {**FFN, "num_experts_per_device": 2}, 2, settings)
    compare_with_reference(rank, world, {**FFN, "num_experts_per_device": 2}, 2, settings, cf=1.0)
    compare_with_reference(rank, world, {**LLAMA, "num_experts_per_device": 1}, 1, [(1, 1), (1, 2), (0, 1)])


class ScaleExperts(torch.nn.Module):
    """A custom expert type: y = tanh(x @ w[e]) per local expert."""

    def __init__(self, model_dim, num_experts_per_device, sharded_count):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(num_experts_per_device, model_dim, model_dim) / model_dim**0.5)

    def forward(self, x_ENM, ctx=None):
        return torch.tanh(torch.bmm(x_ENM, self.w))


def _custom_experts_2(rank, world):
    custom = {"type": "custom", "module": ScaleExperts, "num_experts_per_device": 2}
    layer = make_layer(custom, 2)
    ref = make_layer({**custom, "num_experts_per_device": 4}, 2, group=subgroup((rank,)))
    everyone = [None] * world
    dist.all_gather_object(everyone, layer.state_dict())
    with torch.no_grad():
        ref.experts.w.copy_(torch.cat([s["experts.w"] for s in everyone]))
    x = torch.randn(16, M, generator=torch.Generator().manual_seed(rank))
    dy = torch.randn(16, M, generator=torch.Generator().manual_seed(50 + rank))
    y_ref, dx_ref, g_ref = run_step(ref, x, dy, capacity_factor=0.0)
    y, dx, g = run_step(layer, x, dy, capacity_factor=0.0, a2a_ffn_overlap_degree=2)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dx, dx_ref, atol=ATOL, rtol=RTOL)
    dist.all_reduce(g_ref["experts.w"])
    torch.testing.assert_close(g["experts.w"], g_ref["experts.w"][2 * rank : 2 * rank + 2], atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="custom experts cannot be gathered"):
        layer(x, adaptive_r=0)


def _two_rank_cases(rank, world):
    _expert_parallel_2(rank, world)
    _custom_experts_2(rank, world)


def test_expert_parallel_two_ranks_equals_single_process():
    spawn(_two_rank_cases, 2)


def _sharded_4(rank, world):
    # E = 2 (sc = 2) and E = 1 (sc = 4): every valid r, with overlap; capacity-limited C = 16
    compare_with_reference(rank, world, {**FFN, "num_experts_per_device": -2}, 2, [(0, 1), (1, 1), (2, 1), (2, 2)])
    compare_with_reference(
        rank, world, {**FFN, "num_experts_per_device": -4}, 1, [(0, 1), (1, 1), (2, 1), (4, 1), (4, 4), (1, 4)], cf=0.5
    )
    compare_with_reference(rank, world, {**LLAMA, "num_experts_per_device": -2}, 2, [(0, 1), (1, 1), (2, 2)])
    compare_with_reference(rank, world, {**LLAMA, "num_experts_per_device": -4}, 1, [(0, 1), (1, 1), (2, 1), (4, 1)])
    compare_with_reference(rank, world, {**FFN, "num_experts_per_device": 1}, 2, [(1, 1), (1, 2)], inequivalent=True)


@pytest.mark.slow
def test_sharded_experts_every_r_and_overlap_four_ranks():
    spawn(_sharded_4, 4)


def _two_dh_4(rank, world):
    # the exchange itself: bit-identical to the flat one, forward and backward
    flat, hier = Exchange.build(), Exchange.build(use_2dh=True, local_size=2)
    assert hier.local_size == 2
    x = torch.randn(world * 3, 5, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
    a, b = all_to_all(x, flat), all_to_all(x, hier)
    assert torch.equal(a, b)
    expected = torch.cat([torch.randn(world * 3, 5, generator=torch.Generator().manual_seed(s))[3 * rank : 3 * rank + 3]
                          for s in range(world)])
    assert torch.equal(a, expected)
    (ga,) = torch.autograd.grad(a, x, a.detach() * 2)
    (gb,) = torch.autograd.grad(b, x, a.detach() * 2)
    assert torch.equal(ga, gb) and torch.equal(ga, 2 * x.detach())
    # the layer with 2DH == the single-process reference, expert-parallel and sharded
    compare_with_reference(rank, world, {**FFN, "num_experts_per_device": 1}, 2, [(1, 1), (1, 2)],
                           use_2dh=True, local_size=2)
    compare_with_reference(rank, world, {**FFN, "num_experts_per_device": -2}, 2, [(2, 1), (1, 2)],
                           use_2dh=True, local_size=2)


@pytest.mark.slow
def test_two_dimensional_hierarchical_all_to_all_four_ranks():
    spawn(_two_dh_4, 4)


def _overlap_and_grads_2(rank, world):
    # overlap degrees give the same numbers as d = 1 on the bare pipeline (to fp32 rounding: a GEMM
    # over a chunk of the rows may take another MKL kernel than over all of them)
    plan = ShardPlan.for_world(2, world, rank)
    gen = torch.Generator().manual_seed(7 + rank)
    D = torch.randn(plan.num_global_experts, 8, M, generator=gen)
    w = torch.randn(plan.num_local_experts, M, M, generator=torch.Generator().manual_seed(rank))

    def expert_fn(x_nNM):
        return torch.tanh(torch.bmm(x_nNM, w))

    outs = [run_experts(D, expert_fn, plan, 1, d) for d in (1, 2, 4)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        run_experts(D[:, :6], expert_fn, plan, 1, 4)
    # the pipeline really is one: every dispatch is in flight before the first expert runs,
    # and chunk 0's combine is issued before chunk 1's experts run
    events = []

    class RecordingExchange(Exchange):
        def start(self, x):
            events.append("send")
            return super().start(x)

    def recording_fn(x_nNM):
        events.append("experts")
        return expert_fn(x_nNM)

    run_experts(D, recording_fn, plan, 1, 2, RecordingExchange.build())
    assert events == ["send", "send", "experts", "send", "experts", "send"]
    # gate gradients: averaged over ranks; expert gradients untouched
    layer = make_layer({**FFN, "num_experts_per_device": 1}, 2)
    x = torch.randn(16, M, generator=gen)
    layer(x).sum().backward()
    gate_before = layer.gates[0].wg.weight.grad.clone()
    expert_before = layer.experts.batched_fc1_w.grad.clone()
    assert allreduce_gate_gradients(layer) == 1
    total = gate_before.clone()
    dist.all_reduce(total)
    torch.testing.assert_close(layer.gates[0].wg.weight.grad, total / world)
    assert torch.equal(layer.experts.batched_fc1_w.grad, expert_before)


def test_overlap_degrees_and_gate_gradient_allreduce():
    spawn(_overlap_and_grads_2, 2)


def test_shard_plan_layout():
    plan = ShardPlan.for_world(-4, 8, rank=5)  # E = 2, sc = 4
    assert (plan.num_global_experts, plan.sharded_count, plan.expert_index, plan.shard_index) == (2, 4, 1, 1)
    assert plan.valid_degrees() == [0, 1, 2, 4]
    assert plan.gather_ranks(1) == (4, 5, 6, 7) and plan.gather_ranks(2) == (4, 5) and plan.gather_ranks(4) == (5,)
    assert plan.wide_shard(2) == 0 and plan.wide_shard(4) == 1 and plan.gather_ranks(0) == tuple(range(8))
    with pytest.raises(ValueError, match="adaptive_r=3"):
        plan.check_degree(3)
    with pytest.raises(ValueError, match="not divisible"):
        ShardPlan.for_world(-3, 8)
