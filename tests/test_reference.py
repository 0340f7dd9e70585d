"""torch_reference against the dense GShard formulation in tests/dense_moe.py (fp64, 1e-12)."""
from __future__ import annotations

import pytest
import torch

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.torch_reference import ReferenceMoELayer, slot_locations
from tests.dense_moe import capacity_rule, dense_moe
from workloads.routing import make_layer_inputs

torch.set_num_threads(1)

WEIGHT_NAMES = ("w1_EHM", "w2_EHM", "w3_EHM", "b1_EH", "b2_EM")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def run_reference(shape, capacity_factor, weights, x_TM, dy_TM, dtype="float64"):
    layer = ReferenceMoELayer(shape, MoEKnobs(capacity_factor=capacity_factor, dtype=dtype), ParallelSpec())
    layer.load_canonical(weights)
    x = x_TM.clone().requires_grad_(True)
    out = layer(x)
    (out.y_TM * dy_TM).sum().backward()
    grads = {"x": x.grad, "gate_EM": layer.gate_EM.grad}
    for name in WEIGHT_NAMES:
        param = getattr(layer.experts, name)
        if param is not None:
            grads[name] = param.grad
    return out, layer.routing_stats(), grads


def run_dense(shape, capacity_factor, weights, x_TM, dy_TM):
    leaves = {"x": x_TM.clone().requires_grad_(True), "gate_EM": weights.gate_EM.clone().requires_grad_(True)}
    for name in WEIGHT_NAMES:
        value = getattr(weights, name)
        leaves[name] = None if value is None else value.clone().requires_grad_(True)
    result = dense_moe(leaves["x"], leaves["gate_EM"], *(leaves[n] for n in WEIGHT_NAMES),
                       top_k=shape.top_k, activation=shape.activation, capacity_factor=capacity_factor)
    (result.y_TM * dy_TM).sum().backward()
    return result, {name: leaf.grad for name, leaf in leaves.items() if leaf is not None}


CASES = [
    # (activation, expert_bias, top_k, capacity_factor)
    ("gelu", False, 1, None),
    ("gelu", True, 2, None),
    ("relu", True, 3, None),
    ("swiglu", False, 2, None),
    ("swiglu", False, 3, None),
    ("gelu", True, 1, 0.5),
    ("gelu", False, 2, 0.5),
    ("swiglu", False, 2, 0.5),
    ("swiglu", False, 3, 0.34),
    ("relu", False, 3, 0.5),
]


@pytest.mark.parametrize("activation,bias,top_k,cf", CASES)
def test_reference_matches_dense_gshard(activation, bias, top_k, cf):
    shape = LayerShape(model_dim=12, ffn_dim=10, num_experts=5, top_k=top_k, activation=activation, expert_bias=bias)
    T = 40
    x_TM, weights = make_layer_inputs(shape, T, "learned", seed=11 + top_k, dtype=torch.float64)
    # A sharper gate makes the routing unbalanced, so capacity-limited cases really drop.
    weights.gate_EM = weights.gate_EM * 3.0
    dy_TM = torch.randn(T, shape.model_dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    out, stats, grads = run_reference(shape, cf, weights, x_TM, dy_TM)
    dense, dense_grads = run_dense(shape, cf, weights, x_TM, dy_TM)

    assert stats.tokens_per_expert == dense.tokens_per_expert
    assert sum(stats.tokens_per_expert) == T * top_k
    assert stats.dropped == dense.dropped
    if cf is None:
        assert stats.dropped == 0 and stats.capacity is None
    else:
        assert stats.capacity == dense.capacity == capacity_rule(T, 5, top_k, cf)
        assert stats.dropped > 0, "capacity case must really drop choices"
    assert stats.expert_rows_computed == T * top_k - stats.dropped
    assert rel_err(out.y_TM, dense.y_TM) < 1e-12
    assert abs(out.l_aux.item() - dense.l_aux.item()) <= 1e-12 * abs(dense.l_aux.item())
    assert stats.l_aux == pytest.approx(dense.l_aux.item(), rel=1e-12)
    assert set(grads) == set(dense_grads)
    for name, grad in grads.items():
        assert rel_err(grad, dense_grads[name]) < 1e-12, name


def test_aux_loss_gradient_matches_dense():
    """The gate also learns through l_aux; its gradient must match too."""
    shape = LayerShape(model_dim=8, ffn_dim=6, num_experts=4, top_k=2)
    x_TM, weights = make_layer_inputs(shape, 16, "learned", seed=3, dtype=torch.float64)
    layer = ReferenceMoELayer(shape, MoEKnobs(capacity_factor=None, dtype="float64"), ParallelSpec())
    layer.load_canonical(weights)
    layer(x_TM).l_aux.backward()
    gate = weights.gate_EM.clone().requires_grad_(True)
    dense_moe(x_TM, gate, weights.w1_EHM, weights.w2_EHM, None, None, None, 2, "gelu", None).l_aux.backward()
    assert layer.gate_EM.grad.abs().max() > 0
    assert rel_err(layer.gate_EM.grad, gate.grad) < 1e-12


def test_slot_locations_first_choices_before_second_choices():
    idx_TK = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]])
    # expert 0: first choices of tokens 0, 2, 3 -> slots 0, 1, 2; then token 1's second choice -> 3.
    # expert 1: token 1's first choice -> 0; second choices of tokens 0, 3 -> 1, 2.
    # expert 2: token 2's second choice -> 0.
    expected = torch.tensor([[0, 1], [0, 3], [1, 0], [2, 2]])
    assert torch.equal(slot_locations(idx_TK, 3), expected)


def test_capacity_keeps_the_lowest_slots_on_a_hand_made_example():
    shape = LayerShape(model_dim=3, ffn_dim=4, num_experts=3, top_k=2)
    weights = CanonicalWeights.random(shape, seed=0, dtype=torch.float64)
    weights.gate_EM = 4.0 * torch.eye(3, dtype=torch.float64)  # logits = 4x: routing by x's largest entries
    x_TM = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    knobs = MoEKnobs(capacity_factor=1.0, dtype="float64")
    layer = ReferenceMoELayer(shape, knobs, ParallelSpec(), capacity=2)
    layer.load_canonical(weights)
    _, idx_TK, gates_TK, keep_TK, capacity = layer.route(x_TM)
    assert idx_TK.tolist() == [[0, 1], [1, 0], [0, 2], [0, 1]]
    assert capacity == 2
    # slots [[0,1],[0,3],[1,0],[2,2]] < 2:
    assert keep_TK.tolist() == [[True, True], [True, False], [True, True], [False, False]]
    y_TM = layer(x_TM).y_TM
    assert layer.routing_stats().dropped == 3
    assert torch.equal(y_TM[3], torch.zeros(3, dtype=torch.float64))  # both choices dropped
    only_first = gates_TK[1, 0] * layer.experts.expert(layer.experts.split()[1], x_TM[1:2])[0]
    assert torch.allclose(y_TM[1], only_first, rtol=1e-14, atol=0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bfloat16_within_tolerance_of_float64(activation):
    # Synthetic balanced routing has wide logit margins, so bf16 routes exactly as fp64.
    shape = LayerShape(model_dim=32, ffn_dim=48, num_experts=8, top_k=2, activation=activation)
    x64, w64 = make_layer_inputs(shape, 64, "balanced", seed=2, dtype=torch.float64)
    x16, w16 = make_layer_inputs(shape, 64, "balanced", seed=2, dtype=torch.bfloat16)
    dy = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out64, stats64, grads64 = run_reference(shape, None, w64, x64, dy, "float64")
    out16, stats16, grads16 = run_reference(shape, None, w16, x16, dy.to(torch.bfloat16), "bfloat16")
    assert stats16.tokens_per_expert == stats64.tokens_per_expert
    assert out16.y_TM.dtype == torch.bfloat16
    assert rel_err(out16.y_TM, out64.y_TM) < 3e-2
    assert rel_err(grads16["x"], grads64["x"]) < 3e-2
    assert rel_err(grads16["w1_EHM"], grads64["w1_EHM"]) < 3e-2
