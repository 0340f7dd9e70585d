"""The real peer systems (DeepSpeed-MoE, Megatron-Core, Tutel) against torch_reference.

Peers run in fresh processes (harness.check), as they keep global
process-group state; each test checks output, input gradient and tokens per
expert on identical weights, plus the peers' own capacity rules.
"""
from __future__ import annotations

import os

import pytest
import torch

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from harness.check import CheckCase, run_system_in_subprocess
from harness.equivalence import ReferencePolicy, check_against_reference, keep_by_score, policy_reference
from systems.deepspeed_moe import DeepSpeedMoE, deepspeed_capacity
from systems.megatron_core import MegatronCore, megatron_capacity
from systems.tutel import NOT_INSTALLED, Tutel

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache",
                                                           "torch_extensions"))
torch.set_num_threads(1)

TOP1_CF = CheckCase("top1-gelu-cf1-fp32", 1, "gelu", 1.0, "float32")
TOP2_CF_FP64 = CheckCase("top2-swiglu-cf1-fp64", 2, "swiglu", 1.0, "float64")
TOP2_DROPLESS_BIAS = CheckCase("top2-gelu-bias-dropless-fp32", 2, "gelu", None, "float32", expert_bias=True)
TOP2_CF_HALF = CheckCase("top2-swiglu-cf0.5-fp32", 2, "swiglu", 0.5, "float32")
# the harness's shared expert around a peer that keeps process-group state (checked in its own process)
SHARED = CheckCase("top2-swiglu-shared-dropless-fp32", 2, "swiglu", None, "float32", shared_ffn_dim=24)


def _assert_all_pass(results):
    for r in results:
        assert r.status == "pass", (r.case, r.status, r.note, r.max_rel_err_y, r.max_rel_err_dx)


@pytest.mark.slow
def test_deepspeed_matches_reference_with_its_capacity_rule():
    results = run_system_in_subprocess("deepspeed_moe", [TOP1_CF, TOP2_CF_FP64, TOP2_DROPLESS_BIAS, TOP2_CF_HALF,
                                                         SHARED])
    _assert_all_pass(results)
    by_case = {r.case: r for r in results}
    assert {"grad_shared_w1_SM", "grad_shared_w2_SM", "grad_shared_w3_SM"} <= set(by_case[SHARED.name].rel_err)
    # 64 tokens, 4 experts: DeepSpeed's C = max(ceil(T/E*cf*k), 4)
    assert by_case[TOP1_CF.name].routing["capacity"] == deepspeed_capacity(64, 4, 1, 1.0) == 16
    assert by_case[TOP2_CF_HALF.name].routing["capacity"] == deepspeed_capacity(64, 4, 2, 0.5) == 16
    assert by_case[TOP2_CF_HALF.name].routing["dropped"] > 0
    # dropless pads to the largest expert load
    stats = by_case[TOP2_DROPLESS_BIAS.name].routing
    assert stats["dropped"] == 0 and stats["capacity"] == max(stats["tokens_per_expert"])
    assert sum(stats["tokens_per_expert"]) == 2 * 64
    fp64 = by_case[TOP2_CF_FP64.name]
    assert fp64.declared_precision.startswith("declared float32 for float64 input") and fp64.tolerance == 1e-5
    assert "declared float32" in fp64.note


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_megatron_matches_reference(dispatcher):
    cases = [TOP1_CF, TOP2_CF_HALF] if dispatcher == "allgather" else [TOP1_CF, TOP2_CF_FP64, TOP2_CF_HALF,
                                                                        CheckCase("top2-dropless", 2, "swiglu",
                                                                                  None, "float32"), SHARED]
    results = run_system_in_subprocess("megatron_core", cases, options={"dispatcher": dispatcher})
    _assert_all_pass(results)
    if dispatcher == "alltoall":
        (shared,) = [r for r in results if r.case == SHARED.name]
        assert {"grad_shared_w1_SM", "grad_shared_w2_SM", "grad_shared_w3_SM"} <= set(shared.rel_err)
    by_case = {r.case: r.routing for r in results}
    assert by_case[TOP2_CF_HALF.name]["capacity"] == megatron_capacity(64, 4, 2, 0.5) == 16
    assert by_case[TOP2_CF_HALF.name]["dropped"] > 0
    assert by_case[TOP2_CF_HALF.name]["expert_rows_computed"] == 4 * 16  # padded to capacity
    assert by_case[TOP2_CF_HALF.name]["l_aux"] > 0  # read from Megatron's tracker


def test_capacity_formulas_differ_from_tutels():
    assert deepspeed_capacity(40, 4, 1, 0.1) == 4  # min_capacity
    assert deepspeed_capacity(40, 4, 2, 1.25) == 25
    assert megatron_capacity(40, 4, 2, 1.25) == 25
    assert megatron_capacity(40, 4, 1, 0.1) == 1  # no minimum


def test_unsupported_variants_say_why():
    shape = LayerShape(32, 48, 4, 2, "swiglu")
    mg = MegatronCore()
    reason = mg.check_support(shape, MoEKnobs(options={"grouped_gemm": True}), ParallelSpec()).reason
    assert "grouped" in reason.lower()
    assert not mg.check_support(shape, MoEKnobs(options={"dispatcher": "flex"}), ParallelSpec()).ok
    assert not mg.check_support(shape, MoEKnobs(options={"bogus": 1}), ParallelSpec()).ok
    assert mg.check_support(shape, MoEKnobs(options={"dispatcher": "allgather"}), ParallelSpec()).ok
    assert not DeepSpeedMoE().check_support(shape, MoEKnobs(), ParallelSpec(world_size=2, tp=2)).ok
    assert DeepSpeedMoE.availability().ok and MegatronCore.availability().ok


def test_tutel_unavailable_with_reason():
    try:
        import tutel  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tutel is installed here")
    avail = Tutel.availability()
    assert not avail.ok and avail.reason == NOT_INSTALLED
    assert not Tutel().check_support(LayerShape(8, 8, 2, 1), MoEKnobs(), ParallelSpec()).ok


def test_keep_by_score_keeps_highest_per_expert():
    idx_TK = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    score_TK = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.7, 0.3], [0.6, 0.4]])
    keep = keep_by_score(idx_TK, score_TK, 3, capacity=2)
    # expert 0 candidates: 0.1, 0.5, 0.7, 0.4 -> keeps 0.7, 0.5; expert 1: 0.9, 0.2, 0.6 -> 0.9, 0.6
    assert keep.tolist() == [[False, True], [True, False], [True, True], [True, False]]


def test_policy_mismatch_fails_the_check():
    """The check can fail: a Tutel-position layer checked as if it dropped by probability."""
    shape, parallel = LayerShape(16, 24, 4, 2, "gelu"), ParallelSpec()
    knobs = MoEKnobs(capacity_factor=0.5)
    weights = CanonicalWeights.random(shape, seed=3)
    x_TM = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))
    layer = policy_reference(shape, knobs, parallel, ReferencePolicy())
    layer.load_canonical(weights)
    assert check_against_reference(layer, shape, knobs, parallel, weights, x_TM).passed
    layer.reference_policy = lambda: ReferencePolicy(capacity=layer.routing_stats().capacity, drop_order="prob")
    result = check_against_reference(layer, shape, knobs, parallel, weights, x_TM)
    assert not result.passed and result.max_rel_err_y > 1e-3
