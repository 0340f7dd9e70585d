"""torchtitan 0.3.0's MoE (systems/torchtitan_moe.py) against the reference, in bf16.

torchtitan's experts compute in bf16 whatever the input, so these checks run bf16 trials (tolerance
3e-2) on debug shapes widened to multiples of 8 (grouped_mm's alignment)."""
from __future__ import annotations

import pytest
import torch

from core.values import BIAS_UPDATE_RATE, CanonicalWeights, MoEKnobs, ParallelSpec
from harness.equivalence import check_against_reference
from systems import get_system
from systems.shared_expert import SharedExpertLayer, build_moe_layer
from systems.torch_reference import ReferenceMoELayer
from workloads.resolve import resolve_workload

T = 64
ALIGNED = {"model_dim": 32, "ffn_dim": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _knobs(dtype="bfloat16"):
    return MoEKnobs(capacity_factor=None, dtype=dtype)


def _layer_and_check(shape):
    weights = CanonicalWeights.random(shape, seed=3, dtype=torch.bfloat16)
    layer = build_moe_layer(get_system("torchtitan"), shape, _knobs(), ParallelSpec())
    layer.load_canonical(weights)
    x = torch.randn(T, shape.model_dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    return layer, weights, x, check_against_reference(layer, shape, _knobs(), ParallelSpec(), weights, x)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b"])
def test_softmax_routers_match_the_reference_in_bf16(name):
    shape = resolve_workload(name, "debug", ALIGNED).layer
    layer, _, _, check = _layer_and_check(shape)
    assert check.passed, check.note
    assert check.counts_equal and {"grad_gate_EM", "grad_w1_EHM", "grad_w2_EHM", "grad_w3_EHM"} <= set(check.rel_err)
    assert "without an aux loss" in check.note
    stats = layer.routing_stats()
    assert sum(stats.tokens_per_expert) == T * shape.top_k == stats.expert_rows_computed and stats.dropped == 0


def test_deepseek_router_and_native_shared_expert_match_the_reference():
    """Sigmoid + bias, 8 groups with the best 4 allowed, scale 2.5, torchtitan's own shared FFN."""
    shape = resolve_workload("deepseek-v3", "debug", {**ALIGNED, "shared_ffn_dim": 16}).layer
    assert shape.score == "sigmoid" and shape.score_bias and shape.n_groups == 8 and shape.route_scale == 2.5
    layer, _, _, check = _layer_and_check(shape)
    assert not isinstance(layer, SharedExpertLayer) and layer.moe.shared_experts is not None
    assert check.passed, check.note
    assert {"grad_shared_w1_SM", "grad_shared_w2_SM", "grad_shared_w3_SM"} <= set(check.rel_err)


def test_bias_update_is_torchtitans_hook_and_equals_the_references():
    shape = resolve_workload("deepseek-v3", "debug", ALIGNED).layer
    layer, weights, x, _ = _layer_and_check(shape)
    reference = ReferenceMoELayer(shape, _knobs(), ParallelSpec())
    reference.load_canonical(weights)
    layer.moe.tokens_per_expert_E.zero_()
    reference.load_E.zero_()
    for adapter in (layer, reference):
        adapter.train()
        adapter(x).y_TM.float().sum().backward()
        adapter.before_optimizer_step()
    moved_E = layer.moe.expert_bias_E - weights.score_bias_E.float()
    assert torch.count_nonzero(moved_E) > shape.num_experts // 2  # the hook ran and moved the biases
    assert float(moved_E.abs().max()) <= 2 * BIAS_UPDATE_RATE
    assert torch.equal(layer.moe.expert_bias_E, reference.score_bias_E)
    assert float(layer.moe.tokens_per_expert_E.sum()) == 0.0  # consumed by the update


def test_unsupported_trials_give_their_reason():
    system = get_system("torchtitan")
    mixtral = resolve_workload("mixtral-8x7b", "debug", ALIGNED).layer
    assert "bf16" in system.check_support(mixtral, _knobs("float32"), ParallelSpec()).reason
    assert "multiples of 8" in system.check_support(resolve_workload("qwen3-30b-a3b", "debug").layer, _knobs(),
                                                    ParallelSpec()).reason
    gpt2 = resolve_workload("gpt2-xl-moe", "debug").layer
    assert "SwiGLU without biases" in system.check_support(gpt2, _knobs(), ParallelSpec()).reason
    assert "ep must be 1" in system.check_support(mixtral, _knobs(), ParallelSpec(world_size=2, ep=2)).reason
    one_per_group = resolve_workload("deepseek-v3", "debug", {**ALIGNED, "num_experts": 8, "n_groups": 8,
                                                              "topk_groups": 8}).layer
    assert "2 experts per group" in system.check_support(one_per_group, _knobs(), ParallelSpec()).reason
    capped = MoEKnobs(capacity_factor=1.25, dtype="bfloat16")
    assert "--capacity-factor dropless" in system.check_support(mixtral, capped, ParallelSpec()).reason


@pytest.mark.parametrize("system", ["torchtitan", "torch_reference"])
def test_model_level_train_step_runs_the_bias_update(system):
    """At model level the harness calls before_optimizer_step in every train step: torchtitan's hook
    and the reference's rule move each MoE block's bias away from the loaded one."""
    from harness import trial
    from harness.model import moe_block_weights
    from harness.trial_spec import TrialSpec

    workload = resolve_workload("deepseek-v3", "debug", ALIGNED)
    spec = TrialSpec(system, workload, "model", "train", "learned", _knobs(), ParallelSpec(threads_per_rank=1),
                     warmup=0, steps=1, check=False)
    bench, _ = trial.build_model_bench(spec, get_system(system), "cpu")
    bench.step(0)
    for layer, block in zip(bench.layers, workload.model.moe_block_indices(), strict=True):
        loaded_E = moe_block_weights(workload.layer, 0, block, torch.bfloat16).score_bias_E.float()
        bias_E = layer.moe.expert_bias_E if system == "torchtitan" else layer.routed.score_bias_E
        moved_E = bias_E.float() - loaded_E
        assert 0 < float(moved_E.abs().max()) <= 2 * BIAS_UPDATE_RATE
