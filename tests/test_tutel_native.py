"""tutel_native against torch_reference (harness.equivalence and directly), plus its API contract.

Legend: T tokens, M model dim, H hidden, E experts, K top-k.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from harness.equivalence import check_against_reference
from systems import get_system
from systems.torch_reference import ReferenceMoELayer, gshard_aux_loss
from systems.tutel_native import moe_layer
from systems.tutel_native.routing import capacity_for

torch.set_num_threads(1)
M, H, E, T = 16, 24, 4, 48


def shape_for(activation="swiglu", k=2, bias=False):
    return LayerShape(model_dim=M, ffn_dim=H, num_experts=E, top_k=k, activation=activation, expert_bias=bias)


def built(shape, knobs, seed=0):
    layer = get_system("tutel_native").build_layer(shape, knobs, ParallelSpec())
    weights = CanonicalWeights.random(shape, seed=seed, dtype=knobs.torch_dtype)
    layer.load_canonical(weights)
    return layer, weights


def tokens(n=T, dtype=torch.float32, seed=0):
    return torch.randn(n, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) * 2


# ---- through the harness -----------------------------------------------------------------------

@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True), ("relu", False)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("cf", [0.5, None])
def test_harness_equivalence(activation, bias, k, cf):
    shape, knobs = shape_for(activation, k, bias), MoEKnobs(capacity_factor=cf)
    layer, weights = built(shape, knobs)
    result = check_against_reference(layer, shape, knobs, ParallelSpec(), weights, tokens())
    assert result.passed, result
    stats = layer.routing_stats()
    if cf is None:
        assert stats.dropped == 0
    else:
        assert stats.dropped > 0, "cf 0.5 must drop choices for the check to mean something"
    # the rows of the layout the cost model chose: the live rows, or every expert padded to the largest fill
    (choice,) = layer.layer.kernel_choices
    fills = [min(n, stats.capacity) for n in stats.tokens_per_expert]
    assert stats.expert_rows_computed == (T * k - stats.dropped if choice.endswith("/live") else E * max(fills))


def test_harness_equivalence_bf16():
    shape, knobs = shape_for(), MoEKnobs(capacity_factor=1.0, dtype="bfloat16")
    layer, weights = built(shape, knobs)
    result = check_against_reference(layer, shape, knobs, ParallelSpec(), weights, tokens(dtype=torch.bfloat16))
    assert result.passed, result
    assert layer(tokens(dtype=torch.bfloat16)).y_TM.dtype == torch.bfloat16


# ---- directly against the reference: all gradients, fp64 ---------------------------------------

def reference_for(shape, knobs, weights):
    ref = ReferenceMoELayer(shape, knobs, ParallelSpec())
    ref.load_canonical(weights)
    return ref


def assert_close(a, b, rtol, what):
    err = (a.double() - b.double()).abs().max().item() / (b.double().abs().max().item() or 1.0)
    assert err <= rtol, f"{what}: rel err {err:.3g}"


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_all_gradients_match_reference_fp64(activation, k, seed=None):
    seed = random.randrange(1 << 30) if seed is None else seed
    print(f"seed {seed}")
    bias = activation == "gelu"
    shape, knobs = shape_for(activation, k, bias), MoEKnobs(capacity_factor=0.75, dtype="float64")
    layer, weights = built(shape, knobs, seed)
    ref = reference_for(shape, knobs, weights)
    x = tokens(dtype=torch.float64, seed=seed)
    dy = torch.randn(T, M, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = layer(xa), ref(xb)
    assert out.y_TM.dtype == torch.float64
    (out.y_TM * dy).sum().add(out.l_aux).backward()
    (out_ref.y_TM * dy).sum().add(out_ref.l_aux).backward()
    rtol = 1e-12
    assert_close(out.y_TM, out_ref.y_TM, rtol, f"y (seed {seed})")
    assert_close(out.l_aux, out_ref.l_aux, rtol, f"l_aux (seed {seed})")
    assert_close(xa.grad, xb.grad, rtol, f"dx (seed {seed})")
    assert_close(layer.layer.gates[0].wg.weight.grad, ref.gate_EM.grad, rtol, f"d gate (seed {seed})")
    ex, rex = layer.layer.experts, ref.experts
    if activation == "swiglu":
        assert_close(ex.W_fc1.grad.view(E, M, H).transpose(1, 2), rex.w1_EHM.grad, rtol, "dW_fc1")
        assert_close(ex.W_fc2.grad.view(E, M, H).transpose(1, 2), rex.w3_EHM.grad, rtol, "dW_fc2")
        assert_close(ex.W_fc3.grad.view(E, H, M), rex.w2_EHM.grad, rtol, "dW_fc3")
    else:
        assert_close(ex.batched_fc1_w.grad, rex.w1_EHM.grad, rtol, "d fc1")
        assert_close(ex.batched_fc2_w.grad, rex.w2_EHM.grad, rtol, "d fc2")
        assert_close(ex.batched_fc1_bias.grad, rex.b1_EH.grad, rtol, "d b1")
        assert_close(ex.batched_fc2_bias.grad, rex.b2_EM.grad, rtol, "d b2")
    assert layer.routing_stats().tokens_per_expert == ref.routing_stats().tokens_per_expert


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_compact_and_padded_buffers_agree(activation, bias):
    """Live rows (per-expert mm loop) and the padded buffer (one bmm per GEMM) give the same numbers."""
    shape, knobs = shape_for(activation, 2, bias), MoEKnobs(capacity_factor=1.25, dtype="float64")
    a, _ = built(shape, knobs)
    a.layer.expert_layout = "live"
    b, _ = built(shape, knobs)
    b.layer.compact_dispatch = False
    x = tokens(dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa).y_TM, b(xb).y_TM
    ya.sum().backward()
    yb.sum().backward()
    assert_close(ya, yb, 1e-13, "y")
    assert_close(xa.grad, xb.grad, 1e-13, "dx")
    for (name, pa), pb in zip(a.layer.named_parameters(), b.layer.parameters(), strict=True):
        assert_close(pa.grad, pb.grad, 1e-13, name)
    assert b.routing_stats().expert_rows_computed == E * b.routing_stats().capacity
    assert a.routing_stats().expert_rows_computed < b.routing_stats().expert_rows_computed
    c, _ = built(shape, knobs)
    c.layer.expert_layout = "max_fill"
    xc = x.clone().requires_grad_()
    yc = c(xc).y_TM
    yc.sum().backward()
    assert_close(yc, ya, 1e-13, "y max_fill")
    assert_close(xc.grad, xa.grad, 1e-13, "dx max_fill")
    for (name, pa), pc in zip(a.layer.named_parameters(), c.layer.parameters(), strict=True):
        assert_close(pc.grad, pa.grad, 1e-13, name)
    assert c.routing_stats().expert_rows_computed == E * max(min(n, b.routing_stats().capacity)
                                                             for n in b.routing_stats().tokens_per_expert)


@pytest.mark.parametrize("kind", ["ffn", "llama_ffn"])
def test_expert_rows_with_an_empty_expert(kind):
    """An expert no row reaches gets zero weight gradients; the others match plain autograd."""
    layer = moe_layer({"type": "top", "k": 1}, M, {"type": kind, "num_experts_per_device": E,
                                                   "hidden_size_per_expert": H}).double()
    ex, splits = layer.experts, (3, 0, 5, 2)
    x = torch.randn(10, M, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(10, M, dtype=torch.float64)
    ex.compute_rows(x, splits).backward(dy)
    grads = {n: p.grad.clone() for n, p in ex.named_parameters()}
    dx = x.grad.clone()
    ex.zero_grad(set_to_none=True)
    x.grad = None
    outs, start = [], 0
    for e, n in enumerate(splits):
        xe = x[start : start + n]
        start += n
        if kind == "ffn":
            h = F.gelu(xe @ ex.batched_fc1_w[e].T + ex.batched_fc1_bias[e])
            outs.append(h @ ex.batched_fc2_w[e] + ex.batched_fc2_bias[e])
        else:
            w1, w2, w3 = ex.W_fc1.view(E, M, H)[e], ex.W_fc2.view(E, M, H)[e], ex.W_fc3.view(E, H, M)[e]
            outs.append((F.silu(xe @ w1) * (xe @ w2)) @ w3)
    torch.cat(outs).backward(dy)
    assert_close(dx, x.grad, 1e-13, "dx")
    for n, p in ex.named_parameters():
        assert_close(grads[n], p.grad, 1e-13, n)
        assert grads[n].view(E, -1)[1].abs().max() == 0, f"{n}: empty expert must get zero gradient"


# ---- run-time switching ------------------------------------------------------------------------

def test_runtime_top_k_and_capacity_switching_without_rebuild():
    shape, knobs = shape_for(k=2), MoEKnobs(capacity_factor=1.0, dtype="float64")
    layer, weights = built(shape, knobs)
    ptrs = [p.data_ptr() for p in layer.parameters()]
    x = tokens(dtype=torch.float64)
    for k, cf in [(1, 0.5), (3, 0.5), (2, None), (1, None), (2, 1.0)]:
        y = layer(x, top_k=k, capacity_factor=0.0 if cf is None else cf).y_TM
        ref_shape, ref_knobs = shape_for(k=k), MoEKnobs(capacity_factor=cf, dtype="float64")
        y_ref = reference_for(ref_shape, ref_knobs, weights)(x).y_TM
        assert_close(y, y_ref, 1e-12, f"k={k} cf={cf}")
        stats = layer.routing_stats()
        if cf is None:
            assert stats.dropped == 0 and stats.capacity == max(stats.tokens_per_expert)
    assert [p.data_ptr() for p in layer.parameters()] == ptrs


def test_dynamic_capacity_is_capped_by_dropless():
    layer = moe_layer({"type": "top", "k": 2, "capacity_factor": -8.0}, M,
                      {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H})
    layer(tokens())
    assert layer.last_stats.capacity == max(layer.last_stats.dispatch_count)
    layer(tokens(), capacity_factor=-0.25)
    assert layer.last_stats.capacity == 2 * int(0.25 * (T // E)) and layer.last_stats.dropped > 0


def test_capacity_rules():
    assert capacity_for(1.25, 2, 128, 999, 1) == 320
    assert capacity_for(0.0, 2, 128, 301, 1) == 301
    assert capacity_for(-1.0, 2, 128, 301, 1) == 256
    assert capacity_for(-4.0, 2, 128, 301, 1) == 301
    assert capacity_for(1.0, 2, 128, 0, 3) == 258  # rounded up to sc * d
    assert capacity_for(0.01, 1, 1, 0, 1) == 1  # never 0
    assert capacity_for(0.0, 1, 1, 0, 4) == 4


def test_tiny_input_has_capacity_at_least_one():
    layer = moe_layer({"type": "top", "k": 1, "capacity_factor": 0.01}, M,
                      {"type": "llama_ffn", "num_experts_per_device": 8, "hidden_size_per_expert": H})
    y = layer(torch.randn(1, M))
    assert y.shape == (1, M) and layer.last_stats.capacity == 1 and layer.last_stats.dropped == 0
    assert layer(torch.randn(1, M), capacity_factor=0).shape == (1, M)


def test_overlap_degree_rounds_capacity_up():
    shape, knobs = shape_for(k=2), MoEKnobs(capacity_factor=1.0, dtype="float64", options={"overlap_degree": 5})
    layer, weights = built(shape, knobs)
    result = check_against_reference(layer, shape, knobs, ParallelSpec(), weights, tokens(dtype=torch.float64))
    assert layer.routing_stats().capacity == 25  # 2 * int(1.0 * 12) = 24, rounded up to a multiple of 5
    assert result.passed, result
    y5 = layer(tokens(dtype=torch.float64), capacity_factor=0).y_TM
    y1 = layer(tokens(dtype=torch.float64), capacity_factor=0, a2a_ffn_overlap_degree=1).y_TM
    assert_close(y5, y1, 1e-13, "overlap degree changes nothing at world size 1")


# ---- gates, noise, aux losses, BPR --------------------------------------------------------------

def test_gate_noise_training_differs_per_seed_eval_is_deterministic():
    layer = moe_layer({"type": "top", "k": 2, "gate_noise": 1.0}, M,
                      {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H}, seeds=(1, 2, 3))
    x = tokens()
    torch.manual_seed(10)
    a = layer(x)
    torch.manual_seed(11)
    b = layer(x)
    assert not torch.equal(a, b)
    layer.eval()
    c, d = layer(x), layer(x)
    assert torch.equal(c, d)
    clean = moe_layer({"type": "top", "k": 2}, M,
                      {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H}, seeds=(1, 2, 3))
    assert torch.equal(c, clean(x))


def test_gshard_loss_value():
    layer = moe_layer({"type": "top", "k": 2}, M, {"type": "ffn", "num_experts_per_device": E,
                                                     "hidden_size_per_expert": H}).double()
    x = tokens(dtype=torch.float64)
    y = layer(x)
    probs = torch.softmax(x @ layer.gates[0].wg.weight.T, 1)
    assert_close(y.l_aux, gshard_aux_loss(probs, probs.argmax(1)), 1e-13, "l_aux")
    assert y.l_aux is layer.l_aux


def test_importance_loss_needs_noise():
    with pytest.raises(ValueError, match="gate_noise"):
        moe_layer({"type": "top", "k": 2}, M, {"type": "ffn", "hidden_size_per_expert": H}, is_gshard_loss=False)


def test_bpr_dispatch_count_counts_every_choice():
    layer = moe_layer({"type": "top", "k": 2, "capacity_factor": 0.25}, M,
                      {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H},
                      batch_prioritized_routing=True)
    x = tokens()
    layer(x)
    idx = torch.topk(x @ layer.gates[0].wg.weight.T, 2, 1).indices
    assert layer.dispatch_count.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    assert sum(layer.last_stats.dispatch_count) == 2 * T and layer.last_stats.dropped > 0


def test_several_gates_chosen_by_index():
    layer = moe_layer([{"type": "top", "k": 1}, {"type": "cosine_top", "k": 2, "proj_dim": 8}], M,
                      {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H})
    x = tokens()
    layer(x, gate_index=1)
    assert layer.last_stats.top_k == 2
    layer(x, gate_index=0)
    assert layer.last_stats.top_k == 1
    with pytest.raises(ValueError, match="gate_index"):
        layer(x, gate_index=2)


# ---- shapes, dtypes, hooks ----------------------------------------------------------------------

def test_reserve_dims_result_func_and_output_dim():
    layer = moe_layer({"type": "top", "k": 2}, 8,
                      {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H, "output_dim": 6},
                      result_func=lambda y: y * 2)
    x = torch.randn(3, 5, 2, 4)
    y = layer(x, reserve_dims=2)
    assert y.shape == (3, 5, 6)
    base = moe_layer({"type": "top", "k": 2}, 8,
                     {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H, "output_dim": 6})
    base.load_state_dict(layer.state_dict())
    assert torch.allclose(y, 2 * base(x.reshape(15, 8)).view(3, 5, 6))


def test_fp64_stays_fp64():
    layer = moe_layer({"type": "top", "k": 2, "fp32_gate": True}, M,
                      {"type": "llama_ffn", "num_experts_per_device": E, "hidden_size_per_expert": H}).double()
    x = tokens(dtype=torch.float64).requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == y.l_aux.dtype == torch.float64


def test_custom_experts_match_ffn():
    class Custom(torch.nn.Module):
        def __init__(self, model_dim, num_experts_per_device, sharded_count):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(num_experts_per_device, model_dim, H) * 0.3)
            self.w2 = torch.nn.Parameter(torch.randn(num_experts_per_device, H, model_dim) * 0.3)

        def forward(self, x, ctx):
            assert ctx.num_global_experts == E
            return torch.bmm(F.gelu(torch.bmm(x, self.w1)), self.w2)

    names = []
    custom = moe_layer({"type": "top", "k": 2, "capacity_factor": 0.5}, M,
                       {"type": "custom", "module": Custom, "num_experts_per_device": E},
                       scan_expert_func=lambda n, p: names.append(n)).double()
    ffn = moe_layer({"type": "top", "k": 2, "capacity_factor": 0.5}, M,
                    {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H,
                     "has_fc1_bias": False, "has_fc2_bias": False}).double()
    with torch.no_grad():
        ffn.gates[0].wg.weight.copy_(custom.gates[0].wg.weight)
        ffn.experts.batched_fc1_w.copy_(custom.experts.w1.transpose(1, 2))
        ffn.experts.batched_fc2_w.copy_(custom.experts.w2)
    x = tokens(dtype=torch.float64)
    assert_close(custom(x), ffn(x), 1e-12, "custom vs ffn")
    assert names == ["w1", "w2"] and custom.experts.w1.skip_allreduce


# ---- construction and checkpoints ---------------------------------------------------------------

def test_unknown_keyword_is_named():
    with pytest.raises(TypeError, match="bogus_arg"):
        moe_layer({"type": "top", "k": 1}, M, {"type": "ffn", "hidden_size_per_expert": H}, bogus_arg=1)
    with pytest.raises(TypeError, match="hidden_size"):
        moe_layer({"type": "top", "k": 1}, M, {"type": "ffn", "hidden_size": H})


def test_state_dict_keys_and_shapes_follow_the_contract():
    scanned = []
    ffn = moe_layer({"type": "top", "k": 2}, M,
                    {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H, "output_dim": 10},
                    scan_expert_func=lambda n, p: scanned.append(n))
    assert {k: tuple(v.shape) for k, v in ffn.state_dict().items()} == {
        "_num_global_experts": (),
        "gates.0.wg.weight": (E, M),
        "experts.batched_fc1_w": (E, H, M),
        "experts.batched_fc2_w": (E, H, 10),
        "experts.batched_fc1_bias": (E, H),
        "experts.batched_fc2_bias": (E, 10),
    }
    assert ffn.state_dict()["_num_global_experts"].dtype == torch.int64
    assert scanned == ["batched_fc1_w", "batched_fc2_w", "batched_fc1_bias", "batched_fc2_bias"]
    assert all(p.skip_allreduce for p in ffn.experts.parameters())
    llama = moe_layer({"type": "cosine_top", "k": 2, "proj_dim": 8}, M,
                      {"type": "llama_ffn", "num_experts_per_device": E, "hidden_size_per_expert": H})
    assert {k: tuple(v.shape) for k, v in llama.state_dict().items()} == {
        "_num_global_experts": (),
        "gates.0.temperature": (1,),
        "gates.0.cosine_projector.weight": (8, M),
        "gates.0.cosine_projector.bias": (8,),
        "gates.0.sim_matrix": (8, E),
        "experts.W_fc1": (E * M * H,),
        "experts.W_fc2": (E * M * H,),
        "experts.W_fc3": (E * H * M,),
    }
    assert abs(llama.gates[0].temperature.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6


def test_state_dict_round_trip_and_expert_count_check(tmp_path):
    def make(seed, n=E):
        return moe_layer({"type": "top", "k": 2, "capacity_factor": 0.75}, M,
                         {"type": "llama_ffn", "num_experts_per_device": n, "hidden_size_per_expert": H},
                         seeds=(seed, seed + 1, seed + 2))
    a, b = make(1), make(2)
    x = tokens()
    assert not torch.equal(a(x), b(x))
    torch.save(a.state_dict(), tmp_path / "moe.pt")
    b.load_state_dict(torch.load(tmp_path / "moe.pt"))
    assert torch.equal(a(x), b(x))
    assert torch.equal(make(1)(x), a(x))  # a seed tuple fixes the initial parameters
    with pytest.raises(RuntimeError, match="_num_global_experts mismatch"):
        make(3, n=2).load_state_dict(a.state_dict())


# ---- adapter ------------------------------------------------------------------------------------

def test_adapter_options_stats_phases_and_canonical_round_trip():
    system = get_system("tutel_native")
    shape = shape_for()
    assert system.availability().ok
    assert system.check_support(shape, MoEKnobs(options={"bpr": True, "overlap_degree": 2}), ParallelSpec()).ok
    refused = system.check_support(shape, MoEKnobs(options={"warp_speed": 9}), ParallelSpec())
    assert not refused.ok and "warp_speed" in refused.reason
    assert not system.check_support(shape, MoEKnobs(options={"gate": "softmax"}), ParallelSpec()).ok
    knobs = MoEKnobs(capacity_factor=None, options={"profile_phases": True})
    layer, weights = built(shape, knobs)
    out = layer(tokens())
    assert out.y_TM.shape == (T, M)
    stats = layer.routing_stats()
    assert stats.dropped == 0 and stats.capacity == max(stats.tokens_per_expert) and stats.l_aux > 0
    assert set(layer.phase_times()) == {"gate", "encode", "a2a", "experts", "decode"}
    back = layer.export_canonical()
    for name in ("gate_EM", "w1_EHM", "w2_EHM", "w3_EHM"):
        assert torch.equal(getattr(back, name), getattr(weights, name)), name
    plain, _ = built(shape, MoEKnobs())
    plain(tokens())
    assert plain.phase_times() is None


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_grouped_layout_agrees_with_live_rows(activation, bias):
    """The grouped layout (groups of experts padded to their own largest fill, one bmm each) is the
    default at more than one thread: same numbers and gradients as live rows, and it computes
    no more rows than max_fill and no fewer than the live ones."""
    shape, knobs = shape_for(activation, 2, bias), MoEKnobs(capacity_factor=1.25, dtype="float64")
    x = tokens(dtype=torch.float64)
    runs = {}
    for layout in ("live", "grouped", "max_fill"):
        adapter, _ = built(shape, knobs)
        adapter.layer.expert_layout = layout
        xi = x.clone().requires_grad_()
        y = adapter(xi).y_TM
        y.backward(torch.ones_like(y).contiguous())
        runs[layout] = (adapter, y.detach(), xi.grad)
    live, grouped, max_fill = (runs[k] for k in ("live", "grouped", "max_fill"))
    assert_close(grouped[1], live[1], 1e-13, "y grouped")
    assert_close(grouped[2], live[2], 1e-13, "dx grouped")
    for (name, pl), pg in zip(live[0].layer.named_parameters(), grouped[0].layer.parameters(), strict=True):
        assert_close(pg.grad, pl.grad, 1e-13, name)
    rows = {k: v[0].routing_stats().expert_rows_computed for k, v in runs.items()}
    assert rows["live"] <= rows["grouped"] <= rows["max_fill"], rows
