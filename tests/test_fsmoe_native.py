"""fsmoe_native: the degree choice (schedule.py) on hand-computed cases, and the layer against
tutel_native on 2 and 4 gloo ranks for every (forward degree, backward degree) pair, fp64."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from systems.fsmoe_native.grad_sync import plan_partitions
from systems.fsmoe_native.layer import FSMoELayer
from systems.fsmoe_native.schedule import DEGREES, AlphaBeta, LayerWork, Profile, choose_degree, fit, pipelined_ms
from systems.tutel_native.layer import MoELayer
from tests.test_tutel_native_distributed import spawn

M, H, E_PER_RANK = 8, 16, 2
PAIRS = list(itertools.product(DEGREES, DEGREES))


# ---- the schedule -----------------------------------------------------------------------------

def _profile(a2a=(0.5, 1e-3), gemm=(0.1, 1e-6), intra=(0.0, 0.0)) -> Profile:
    costs = {"a2a": AlphaBeta(*a2a), "gemm": AlphaBeta(*gemm), "allgather": AlphaBeta(*intra),
             "reducescatter": AlphaBeta(*intra), "allreduce": AlphaBeta(0.0, 0.0)}
    return Profile(costs)


WORK = LayerWork(f=2, b=1, s=1000, m=10, h=100, n_gemm=2)  # a2a 20000 elements; GEMM 4e6 multiply-adds


def test_fit_recovers_alpha_and_beta():
    ab = fit([(w, 0.3 + 2e-4 * w) for w in (100, 400, 1600)])
    assert ab.alpha == pytest.approx(0.3) and ab.beta == pytest.approx(2e-4)
    assert fit([(100, 1.0), (200, 0.5)]).beta == 0.0  # a falling time is not a negative cost


def test_pipelined_cost_by_hand():
    """d = 2, forward: a dispatch chunk 0.5 + 1e-3 * 10000 = 10.5 ms (combine the same), a GEMM chunk
    0.1 + 1e-6 * 2e6 = 2.1 ms; the all-to-all stream dominates: 2 * 21 + 2.1 = 44.1 ms."""
    ms, bound = pipelined_ms(_profile(), WORK, 2)
    assert (ms, bound) == (pytest.approx(44.1), "a2a")
    # backward doubles the GEMMs: 0.1 + 1e-6 * 4e6 = 4.1 ms per chunk
    assert pipelined_ms(_profile(), WORK, 2, backward=True)[0] == pytest.approx(42 + 4.1)


def test_degree_choice_follows_the_formulas():
    """All-to-all bound with a large alpha: chunking only adds latency, so d = 1. GEMM-heavy with a
    small alpha: pipelining hides the all-to-all, so the largest degree wins."""
    heavy_alpha = choose_degree(_profile(a2a=(5.0, 1e-4)), WORK, backward=False)
    # d = 1: 2 * (5 + 2) + 4.1 = 18.1; d = 2: 2 * 2 * (5 + 1) + 2.1 = 26.1; more chunks only cost more
    assert heavy_alpha.predicted_ms[1] == pytest.approx(18.1) and heavy_alpha.predicted_ms[2] == pytest.approx(26.1)
    assert heavy_alpha.chosen == 1 and heavy_alpha.relaxed == 1.0 and heavy_alpha.bound[2] == "a2a"
    gemm_heavy = LayerWork(f=2, b=1, s=1000, m=10, h=10000, n_gemm=2)  # GEMM 4e8: 400 ms at d = 1
    choice = choose_degree(_profile(a2a=(0.01, 1e-3), gemm=(0.01, 1e-6)), gemm_heavy, backward=True)
    assert all(choice.bound[d] == "gemm" for d in DEGREES)
    # gemm-bound: d * (0.01 + 800/d) + 2 * (0.01 + 20/d): 840.03, 820.04, 810.06, 805.1
    assert [round(choice.predicted_ms[d], 2) for d in DEGREES] == [840.03, 820.04, 810.06, 805.10]
    assert choice.chosen == 8 and choice.relaxed == pytest.approx(8.0)
    assert choose_degree(_profile(a2a=(0.01, 1e-3), gemm=(0.01, 1e-6)), gemm_heavy, True).to_dict() == \
        choice.to_dict()  # deterministic


def test_small_all_to_all_forces_forward_degree_one():
    tiny = LayerWork(f=1, b=1, s=10, m=10, h=10000, n_gemm=2)  # a2a: 0.01 + 1e-5 * 100 = 0.011 ms
    fwd = choose_degree(_profile(a2a=(0.01, 1e-5), gemm=(0.0, 1e-6)), tiny, backward=False)
    bwd = choose_degree(_profile(a2a=(0.01, 1e-5), gemm=(0.0, 1e-6)), tiny, backward=True)
    assert fwd.chosen == 1 and "< 1 ms" in fwd.reason
    assert bwd.chosen > 1  # backward is not forced


# ---- the layer against tutel_native ------------------------------------------------------------

def _layers(k: int, experts: dict, cf: float):
    gate = {"type": "top", "k": k, "capacity_factor": cf}
    spec = {**experts, "num_experts_per_device": E_PER_RANK, "hidden_size_per_expert": H}
    tutel = MoELayer(gate, M, spec, seeds=(1, 2, 3)).double()
    fsmoe = FSMoELayer(gate, M, spec, seeds=(1, 2, 3)).double()
    fsmoe.load_state_dict(tutel.state_dict())
    return tutel, fsmoe


def _step(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _every_pair(rank, world):
    for experts, k, cf in (({"type": "llama_ffn", "activation_fn": F.silu}, 2, 0.0),
                           ({"type": "ffn", "activation_fn": F.gelu}, 1, 2.0)):  # GELU with biases, capacity
        tutel, fsmoe = _layers(k, experts, cf)
        gen = torch.Generator().manual_seed(20 + rank)
        # 32 tokens: with cf 2, C = int(2 * 32 / E) is 16 (2 ranks) or 8 (4 ranks), a multiple of every
        # degree, so both layers keep the same choices whatever capacity multiple their degrees ask for
        x = torch.randn(32, M, generator=gen, dtype=torch.float64)
        dy = torch.randn(32, M, generator=gen, dtype=torch.float64)
        tutel.a2a_ffn_overlap_degree = 8  # the same capacity multiple as the largest degree
        want_y, want_dx, want_grads = _step(tutel, x, dy)
        for d_f, d_b in PAIRS:
            fsmoe.set_degrees(d_f, d_b)
            fsmoe.zero_grad(set_to_none=True)
            y, dx, grads = _step(fsmoe, x, dy)
            where = f"rank {rank}, {experts['type']}, forward d {d_f}, backward d {d_b}"
            torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12, msg=where)
            torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12, msg=where)
            for name, grad in want_grads.items():
                torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-12, msg=f"{where}: {name}")
        assert fsmoe.last_stats.rows_computed == E_PER_RANK * world * fsmoe.last_stats.capacity
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_every_degree_pair_equals_tutel_native(world):
    spawn(_every_pair, world)


# ---- the gradient all-reduce inside backward ---------------------------------------------------

def test_partitions_fill_each_gap_and_carry_the_overflow():
    # gaps of 100 and 50 bytes: [60, 30] fit the first; 80 overflows the second by 30 (one tensor at
    # least per gap), so the third gap starts 30 in debt and takes [10]; the rest goes after backward
    assert plan_partitions([60, 30, 80, 10, 40, 5], [100, 50, 45]) == [[0, 1], [2], [3], [4, 5]]
    assert plan_partitions([10, 10], []) == [[0, 1]]  # no gaps: one all-reduce after backward


def _grad_sync_same_numbers(rank, world):
    from core.values import MoEKnobs, ParallelSpec
    from harness.distributed import sync_gradients
    from harness.model import build_model, make_batch
    from systems import get_system
    from systems.fsmoe_native.grad_sync import PartitionedGradientSync
    from workloads.flavors import get_workload

    workload = get_workload("mixtral-8x7b", "debug")
    system, parallel = get_system("fsmoe_native"), ParallelSpec(world_size=world, ep=world)
    knobs = MoEKnobs(capacity_factor=None, dtype="float64", options={"forward_degree": 2, "backward_degree": 4})
    tokens, targets = make_batch(workload, seed=0, rank=rank)
    grads = []
    for partitioned in (True, False):
        model = build_model(workload, system, knobs, parallel, seed=0)
        experts = [p for layer in model.moe_layers for p in layer.expert_parameters()]
        sync = PartitionedGradientSync(world, world, gaps_bytes=[2048.0, 4096.0]) if partitioned else None
        if sync is not None:
            sync.attach(model, experts)
            assert len(sync.partitions) == 3  # one per gap, and the rest after backward
        model.loss(tokens, targets)[0].backward()
        if sync is not None:
            sync.finish()
            assert sync.last_issued_in_backward == 3  # every partition went out from its hooks
        else:
            sync_gradients(model, experts, parallel)
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    dist.barrier()


@pytest.mark.slow
def test_partitioned_gradient_all_reduce_gives_the_same_gradients():
    spawn(_grad_sync_same_numbers, 2)


@pytest.mark.slow
def test_through_the_runner_at_ep2_with_the_profiled_schedule():
    """Layer and model level at EP 2: checked against the reference, degrees chosen by the profiled model
    and logged (what was measured, every candidate's prediction, the choice), exposed communication kept."""
    import io

    from core.values import MoEKnobs, ParallelSpec
    from harness import runner
    from harness.trial_spec import TrialSpec
    from workloads.flavors import get_workload

    workload = get_workload("mixtral-8x7b", "debug")
    specs = [TrialSpec("fsmoe_native", workload, level, "train" if level == "model" else "forward_backward",
                       "learned", MoEKnobs(capacity_factor=workload.capacity_factor),
                       ParallelSpec(world_size=2, ep=2, threads_per_rank=1), warmup=1, steps=2, timeout_s=180)
             for level in ("layer", "model")]
    trials = runner.run_trials(specs, runner.RunOptions(repeats=1, progress=io.StringIO()))
    for t in trials:
        assert t["status"] == "ok" and t["check"]["passed"], (t["status"], t["message"][-400:], t["check"])
        schedule = t["tuning"][0]["fsmoe_schedule"]
        assert set(schedule["profile"]["points"]) == {"a2a", "gemm", "allreduce"}
        assert all(len(points) == 4 for points in schedule["profile"]["points"].values())
        for choice in schedule["choices"]:
            assert set(map(int, choice["predicted_ms"])) == set(DEGREES) and choice["chosen"] in DEGREES
        assert schedule["chosen"]["forward_degree"] == schedule["choices"][0]["chosen"]
        assert len(t["exposed_comm_s"]) == len(t["samples_s"])


def _every_pair_sharded(rank, world):
    """Sharded experts (ep = 2 x E): two ranks hold hidden slices of each expert; FSMoE's all-gather and
    reduce-scatter among them against tutel_native's own sharded path."""
    for experts, k, cf in (({"type": "ffn", "activation_fn": F.gelu}, 1, 2.0),  # with biases, capacity
                           ({"type": "llama_ffn", "activation_fn": F.silu}, 2, 0.0)):
        gate = {"type": "top", "k": k, "capacity_factor": cf}
        spec = {**experts, "num_experts_per_device": -2, "hidden_size_per_expert": H}
        tutel = MoELayer(gate, M, spec, seeds=(1, 2, 3)).double()
        fsmoe = FSMoELayer(gate, M, spec, seeds=(1, 2, 3)).double()
        fsmoe.load_state_dict(tutel.state_dict())
        assert fsmoe.sharded_count == 2 and fsmoe.num_global_experts == world // 2
        gen = torch.Generator().manual_seed(40 + rank)
        x = torch.randn(32, M, generator=gen, dtype=torch.float64)  # C = int(2 * 32 / E): a multiple of 16
        dy = torch.randn(32, M, generator=gen, dtype=torch.float64)
        tutel.a2a_ffn_overlap_degree = 8
        want_y, want_dx, want_grads = _step(tutel, x, dy)
        for d_f, d_b in PAIRS:
            fsmoe.set_degrees(d_f, d_b)
            fsmoe.zero_grad(set_to_none=True)
            y, dx, grads = _step(fsmoe, x, dy)
            where = f"rank {rank}, sharded {experts['type']}, forward d {d_f}, backward d {d_b}"
            torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12, msg=where)
            torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12, msg=where)
            for name, grad in want_grads.items():
                torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-12, msg=f"{where}: {name}")
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_every_degree_pair_with_sharded_experts_equals_tutel_native(world):
    spawn(_every_pair_sharded, world)
