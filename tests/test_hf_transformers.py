"""transformers' Mixtral / Qwen3-MoE sparse blocks (systems/hf_transformers.py) against the reference.

The blocks keep no process-group state, so they are checked in this process, on the fine-grained
and classic debug shapes, under each expert implementation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core.values import CanonicalWeights, MoEKnobs, ParallelSpec
from harness.equivalence import check_against_reference
from systems import get_system
from systems.hf_transformers import resolve_block
from systems.shared_expert import SharedExpertLayer, build_moe_layer
from workloads.resolve import resolve_workload

T = 64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(shape, dtype: str = "float32", **options):
    knobs = MoEKnobs(capacity_factor=None, dtype=dtype, options=options)
    torch_dtype = knobs.torch_dtype
    weights = CanonicalWeights.random(shape, seed=3, dtype=torch_dtype)
    layer = build_moe_layer(get_system("hf_transformers"), shape, knobs, ParallelSpec())
    layer.load_canonical(weights)
    x = torch.randn(T, shape.model_dim, dtype=torch_dtype, generator=torch.Generator().manual_seed(5))
    return layer, check_against_reference(layer, shape, knobs, ParallelSpec(), weights, x)


def _support(shape, dtype="float32", ep=1, **options):
    knobs = MoEKnobs(capacity_factor=None, dtype=dtype, options=options)
    return get_system("hf_transformers").check_support(shape, knobs, ParallelSpec(world_size=ep, ep=ep))


@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_qwen3_block_matches_the_reference(experts):
    shape = resolve_workload("qwen3-30b-a3b", "debug").layer  # declared router: softmax, renormalised
    layer, check = _check(shape, experts=experts)
    assert layer.block_kind == "qwen3_moe" and type(layer.block).__name__ == "Qwen3MoeSparseMoeBlock"
    assert check.passed, check.note
    assert check.max_rel_err_grad < 1e-5 and {"grad_gate_EM", "grad_w1_EHM", "grad_w2_EHM", "grad_w3_EHM"} <= set(
        check.rel_err)
    stats = layer.routing_stats()
    assert sum(stats.tokens_per_expert) == T * shape.top_k == stats.expert_rows_computed and stats.dropped == 0
    assert "no capacity" in check.note


def test_olmoe_without_renormalisation_in_fp64_eager():
    """Qwen3-MoE's block with norm_topk_prob off computes OLMoE's router; its fp32 softmax is declared."""
    shape = resolve_workload("olmoe-1b-7b", "debug").layer
    assert not shape.renormalize
    layer, check = _check(shape, dtype="float64", experts="eager")
    assert check.passed, check.note
    assert check.tolerance == 1e-5 and check.declared_precision.startswith("declared float32")
    assert layer.block.gate.norm_topk_prob is False


def test_mixtral_block_on_the_classic_shape_and_both_implementations_agree():
    shape = resolve_workload("mixtral-8x7b", "debug").layer
    assert resolve_block(shape, "auto") == "mixtral"
    outputs = []
    for experts in ("grouped_mm", "eager"):
        layer, check = _check(shape, experts=experts)
        assert type(layer.block).__name__ == "MixtralSparseMoeBlock" and check.passed, check.note
        x = torch.randn(T, shape.model_dim, generator=torch.Generator().manual_seed(9))
        outputs.append(layer(x).y_TM.detach())
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_aux_loss_is_transformers_switch_loss_over_all_choices():
    shape = resolve_workload("qwen3-30b-a3b", "debug").layer
    layer, _ = _check(shape)
    x = torch.randn(T, shape.model_dim, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    logits_TE = x @ layer.block.gate.weight.detach().T
    probs_TE = torch.softmax(logits_TE, dim=1)
    counts_E = torch.bincount(probs_TE.topk(shape.top_k, dim=1).indices.reshape(-1), minlength=shape.num_experts)
    want = shape.num_experts * (probs_TE.mean(0) * counts_E / T).sum()
    assert out.l_aux.requires_grad and abs(float(out.l_aux.detach()) - float(want)) < 1e-5
    assert abs(layer.routing_stats().l_aux - float(want)) < 1e-5
    assert "all k choices" in layer.aux_loss_mismatch()


def test_deepseek_router_is_refused_and_its_softmax_variant_runs_with_the_harness_shared_expert():
    declared = resolve_workload("deepseek-v3", "debug").layer
    why = _support(declared)
    assert not why.ok and "softmax top-k only" in why.reason and "router=softmax" in why.reason
    shape = resolve_workload("deepseek-v3", "debug", {"router": "softmax", "num_experts": 16, "n_groups": 1}).layer
    assert "16-byte aligned" in _support(shape).reason  # H 9
    layer, check = _check(shape, experts="eager")
    assert isinstance(layer, SharedExpertLayer) and check.passed, check.note
    assert "grad_shared_w1_SM" in check.rel_err


def test_unsupported_trials_give_their_reason():
    mixtral = resolve_workload("mixtral-8x7b", "debug").layer
    gpt2 = resolve_workload("gpt2-xl-moe", "debug").layer
    assert "SwiGLU without biases" in _support(gpt2).reason
    assert "no float64 kernel" in _support(mixtral, dtype="float64").reason
    assert _support(mixtral, dtype="float64", experts="eager").ok
    top1 = dataclasses.replace(mixtral, top_k=1)
    assert resolve_block(top1, "auto") == "qwen3_moe" and _support(top1).ok
    assert "for top-1 too" in _support(top1, block="mixtral").reason
    assert "ep must be 1" in _support(mixtral, ep=2).reason
    assert "must be one of" in _support(mixtral, experts="batched").reason
    capped = get_system("hf_transformers").check_support(mixtral, MoEKnobs(capacity_factor=1.2), ParallelSpec())
    assert "--capacity-factor dropless" in capped.reason and "1.2" in capped.reason


@pytest.mark.parametrize("name,overrides", [("qwen3-30b-a3b", {}), ("deepseek-v3", {"router": "softmax"})])
def test_bf16_router_precision_decides_the_choices(name, overrides):
    """In bf16, 128 or 256 experts' scores tie at bf16's resolution; transformers takes its softmax in fp32
    of F.linear's bf16 logits, so the reference must too (router_precision "float32_scores", logits by
    F.linear: at width 896, x @ w.T rounded some logits differently) or near-ties route differently."""
    import dataclasses

    from workloads.routing import make_layer_inputs

    shape = resolve_workload(name, "proxy", overrides).layer
    knobs = MoEKnobs(capacity_factor=None, dtype="bfloat16")
    x, weights = make_layer_inputs(shape, 1024, "learned", 0, dtype=torch.bfloat16)  # the proxy's trial inputs
    layer = build_moe_layer(get_system("hf_transformers"), shape, knobs, ParallelSpec())
    layer.load_canonical(weights)
    check = check_against_reference(layer, shape, knobs, ParallelSpec(), weights, x)
    assert check.passed and check.counts_equal, check.note
    own = layer.reference_policy
    layer.reference_policy = lambda: dataclasses.replace(own(), router_precision="input")
    mirrored_badly = check_against_reference(layer, shape, knobs, ParallelSpec(), weights, x)
    assert not mirrored_badly.counts_equal and not mirrored_badly.passed
