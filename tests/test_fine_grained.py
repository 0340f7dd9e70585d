"""Fine-grained workloads: presets, the routers a workload declares, the shared expert, and
which systems run them (issue 11, section 1)."""
from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from core.values import COMMON_ROUTER, CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from harness.equivalence import check_against_reference
from systems import get_system
from systems.shared_expert import SharedExpertLayer, build_moe_layer, shared_expert_source
from systems.torch_reference import ReferenceMoELayer, route_scores
from workloads.flavors import get_workload
from workloads.presets import FINE_GRAINED
from workloads.resolve import resolve_workload


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_presets_carry_the_published_configs():
    qwen, olmoe, ds = (get_workload(n, "full") for n in ("qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v3"))
    assert (qwen.layer.model_dim, qwen.layer.ffn_dim, qwen.layer.num_experts, qwen.layer.top_k) == (2048, 768, 128, 8)
    q_model = qwen.model
    assert (q_model.n_layers, q_model.n_heads, q_model.n_kv_heads, q_model.vocab_size) == (48, 32, 4, 151936)
    assert qwen.layer.has_common_router  # softmax, renormalised top-8: Tutel's rule
    assert (olmoe.layer.num_experts, olmoe.layer.ffn_dim, olmoe.model.n_layers) == (64, 1024, 16)
    assert olmoe.layer.renormalize is False and olmoe.layer.router_label() == "softmax/no-renorm"
    d = ds.layer
    assert (d.model_dim, d.ffn_dim, d.num_experts, d.shared_ffn_dim) == (7168, 2048, 256, 2048)
    assert ds.layer.router_label() == "sigmoid+bias/g8:4/x2.5"
    assert (ds.model.n_layers, ds.model.first_dense, ds.model.vocab_size) == (61, 3, 129280)
    assert ds.model.n_moe_blocks == 58
    for name in FINE_GRAINED:
        assert get_workload(name, "full").sources and get_workload(name, "full").capacity_factor is None


@pytest.mark.parametrize("name", FINE_GRAINED)
def test_proxy_keeps_experts_router_ratio_and_shared_expert(name):
    full, proxy = get_workload(name, "full"), get_workload(name, "proxy")
    assert (proxy.layer.num_experts, proxy.layer.top_k, proxy.layer.router) == \
        (full.layer.num_experts, full.layer.top_k, full.layer.router)
    assert proxy.layer.ffn_dim / proxy.layer.model_dim == pytest.approx(full.layer.ffn_dim / full.layer.model_dim,
                                                                        rel=0.02)
    assert bool(proxy.layer.shared_ffn_dim) == bool(full.layer.shared_ffn_dim)
    assert proxy.tokens_per_step == 1024 and proxy.layer.ffn_dim % 8 == 0  # grouped-GEMM strides stay aligned
    if full.model.first_dense:
        assert proxy.model.moe_block_indices() == [1, 2]


def test_old_workloads_keep_their_identity():
    """Fields added for fine-grained routers are left out at their defaults: old hashes hold."""
    spec = get_workload("mixtral-8x7b", "proxy").to_dict()
    assert "score" not in spec["layer"] and "first_dense" not in spec["model"]
    assert get_workload("deepseek-v3", "proxy").to_dict()["layer"]["score"] == "sigmoid"


def _logits(values):
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_group_limited_router_by_hand():
    """8 experts in 4 groups of 2, best 2 groups, top-2, bias steering the choice, scale 2."""
    shape = LayerShape(8, 8, 8, 2, "swiglu", score="sigmoid", score_bias=True, n_groups=4, topk_groups=2,
                       route_scale=2.0)
    logits = _logits([[3.0, -3.0, 1.0, 0.5, 2.9, 2.8, -1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -0.4, 0.0, 0.0], dtype=torch.float64)
    s = torch.sigmoid(logits[0])
    # group merits (sum of both biased scores): g0 s0+s1, g1 s2+s3, g2 s4+s5-0.4, g3 s6+s7
    merits = [s[0] + s[1], s[2] + s[3], s[4] + s[5] - 0.4, s[6] + s[7]]
    assert sorted(range(4), key=lambda g: -merits[g])[:2] == [2, 1]  # expert 0 is best but its group loses
    scores, idx, gates = route_scores(logits, shape, bias)
    assert s[5] > s[2] and idx.tolist() == [[4, 2]]  # the bias, not the score, puts expert 2 before 5
    chosen = s[idx[0]]
    assert torch.allclose(gates[0], 2.0 * chosen / chosen.sum())
    assert torch.allclose(scores[0], s)


def test_softmax_without_renormalisation_keeps_raw_probabilities():
    shape = LayerShape(8, 8, 4, 2, "swiglu", renormalize=False)
    logits = _logits([[2.0, 1.0, 0.0, -1.0]])
    _, idx, gates = route_scores(logits, shape)
    p = torch.softmax(logits[0], 0)
    assert idx.tolist() == [[0, 1]] and torch.allclose(gates[0], p[:2])


def test_common_router_matches_tutels_rule():
    shape = LayerShape(8, 8, 4, 2, "swiglu")
    logits = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, idx, gates = route_scores(logits, shape)
    top, want_idx = torch.softmax(logits, 1).topk(2, 1)
    assert torch.equal(idx, want_idx) and torch.allclose(gates, top / top.sum(1, keepdim=True))


def test_bad_router_fields_are_input_errors():
    with pytest.raises(InputError, match="n_groups"):
        LayerShape(8, 8, 6, 2, n_groups=4).validate()
    with pytest.raises(InputError, match="do not fit"):
        LayerShape(8, 8, 8, 4, n_groups=4, topk_groups=1).validate()
    with pytest.raises(InputError, match="score"):
        LayerShape(8, 8, 8, 2, score="sparsemax").validate()
    with pytest.raises(InputError, match="router"):
        resolve_workload("deepseek-v3", "debug", {"router": "sigmoid"})


def test_router_softmax_override_gives_the_common_router():
    w = resolve_workload("deepseek-v3", "debug", {"router": "softmax"})
    assert w.layer.router == COMMON_ROUTER and w.layer.shared_ffn_dim  # the shared expert stays
    assert resolve_workload("olmoe-1b-7b", "debug", {"route_scale": "1.5"}).layer.route_scale == 1.5


@pytest.mark.parametrize("system", ["tutel_native", "deepspeed_moe", "megatron_core"])
def test_systems_without_the_router_are_skipped_with_the_reason(system):
    sys_ = get_system(system)
    ds = get_workload("deepseek-v3", "debug")
    why = sys_.check_support(ds.layer, MoEKnobs(capacity_factor=None), ParallelSpec())
    assert not why.ok and "sigmoid+bias/g8:4/x2.5" in why.reason and "router=softmax" in why.reason
    common = resolve_workload("deepseek-v3", "debug", {"router": "softmax"})
    assert sys_.check_support(common.layer, MoEKnobs(capacity_factor=None), ParallelSpec()).ok
    assert get_system("torch_reference").check_support(ds.layer, MoEKnobs(capacity_factor=None), ParallelSpec()).ok


def _check(system: str, shape: LayerShape, dtype=torch.float64, tokens: int = 64):
    knobs = MoEKnobs(capacity_factor=None, dtype="float64" if dtype == torch.float64 else "float32")
    weights = CanonicalWeights.random(shape, seed=3, dtype=dtype)
    layer = build_moe_layer(get_system(system), shape, knobs, ParallelSpec())
    layer.load_canonical(weights)
    x = torch.randn(tokens, shape.model_dim, dtype=dtype, generator=torch.Generator().manual_seed(5))
    return layer, check_against_reference(layer, shape, knobs, ParallelSpec(), weights, x)


def test_reference_declared_router_with_shared_expert_changes_the_output():
    """The router's every part and the shared expert reach the output (not silently ignored)."""
    ds = get_workload("deepseek-v3", "debug").layer
    knobs = MoEKnobs(capacity_factor=None, dtype="float64")
    weights = CanonicalWeights.random(ds, seed=3, dtype=torch.float64)
    x = torch.randn(64, ds.model_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def output(shape, w):
        layer = build_moe_layer(get_system("torch_reference"), shape, knobs, ParallelSpec())
        layer.load_canonical(w)
        return layer(x).y_TM

    base = output(ds, weights)
    import dataclasses
    no_bias = dataclasses.replace(weights, score_bias_E=torch.zeros_like(weights.score_bias_E))
    assert not torch.allclose(base, output(ds, no_bias))
    for change in ({"route_scale": 1.0}, {"n_groups": 1, "topk_groups": 1}, {"shared_ffn_dim": 0}):
        assert not torch.allclose(base, output(dataclasses.replace(ds, **change), weights)), change


def test_common_router_with_shared_expert_matches_the_reference():
    """The wrapper is the same code around every system; checked here around tutel_native in fp64."""
    system = "tutel_native"
    shape = resolve_workload("deepseek-v3", "debug", {"router": "softmax", "num_experts": 16, "n_groups": 1}).layer
    layer, check = _check(system, shape)
    assert isinstance(layer, SharedExpertLayer) and shared_expert_source(get_system(system), shape) == "harness"
    assert check.passed, check.note
    assert {"grad_shared_w1_SM", "grad_shared_w2_SM", "grad_shared_w3_SM"} <= set(check.rel_err)


def test_reference_against_itself_covers_the_declared_router():
    layer, check = _check("torch_reference", get_workload("deepseek-v3", "debug").layer)
    assert check.passed and check.rel_err["grad_shared_w2_SM"] < 1e-12


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b"])
def test_tutel_native_on_the_softmax_fine_grained_debug_shapes(name):
    shape = resolve_workload(name, "debug", {"router": "softmax"}).layer
    _, check = _check("tutel_native", shape)
    assert check.passed, check.note


def test_tutel_native_runs_olmoes_declared_router_without_renormalisation():
    """Tutel's normalize_gate=False is OLMoE's router: top-8 softmax values used as they are."""
    shape = get_workload("olmoe-1b-7b", "debug").layer
    assert not shape.renormalize and not shape.has_common_router
    layer, check = _check("tutel_native", shape)
    assert check.passed, check.note
    assert layer.layer.normalize_gate is False and check.rel_err["y"] < 1e-10


def test_reference_tensors_are_the_reference_layer():
    layer = build_moe_layer(get_system("torch_reference"), get_workload("qwen3-30b-a3b", "debug").layer,
                            MoEKnobs(capacity_factor=None), ParallelSpec())
    assert isinstance(layer, ReferenceMoELayer)  # no shared expert: no wrapper
