"""Analytical FLOP counts against small hand-worked examples."""
import math

import pytest

from core.values import LayerShape
from harness.flops import attention_flops, layer_flops, model_flops, num_moe_layers
from workloads.flavors import get_workload
from workloads.spec import ModelShape, Workload

GELU = LayerShape(model_dim=4, ffn_dim=8, num_experts=4, top_k=2, activation="gelu")
SWIGLU = LayerShape(model_dim=4, ffn_dim=8, num_experts=4, top_k=2, activation="swiglu")


def test_layer_forward_counts_rows_times_two_g_m_h():
    # one row through a GELU expert: 2 GEMMs x 2 FLOPs x M(4) x H(8) = 128
    f = layer_flops(GELU, num_tokens=10, routing={"expert_rows_computed": 12}, mode="forward")
    assert f["useful"] == 10 * 2 * 128 == 2560.0
    assert f["executed"] == 12 * 128 == 1536.0
    assert f["executed_source"] == "expert_rows_computed"


def test_backward_is_twice_forward():
    fwd = layer_flops(SWIGLU, 10, {"expert_rows_computed": 12}, "forward")
    for mode in ("forward_backward", "train"):
        both = layer_flops(SWIGLU, 10, {"expert_rows_computed": 12}, mode)
        assert both["useful"] == 3 * fwd["useful"] == 3 * 10 * 2 * 192
        assert both["executed"] == 3 * fwd["executed"] == 3 * 12 * 192


def test_without_row_count_executed_falls_back_to_kept_choices():
    routing = {"tokens_per_expert": [6, 5, 5, 4], "dropped": 3, "capacity": 5, "expert_rows_computed": None}
    f = layer_flops(GELU, 10, routing, "forward")
    assert f["executed"] == 17 * 128
    assert "lower bound" in f["executed_source"]
    assert layer_flops(GELU, 10, None, "forward")["executed"] is None


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        layer_flops(GELU, 10, None, "inference")


def test_full_mixtral_layer_matches_the_papers_formula():
    wl = get_workload("mixtral-8x7b", "full")
    T, k, M, F, E, f = wl.tokens_per_step, 2, 4096, 14336, 8, wl.capacity_factor
    capacity = math.ceil(T * k * f / E)  # 1229 slots, so 9832 padded rows
    out = layer_flops(wl.layer, T, {"expert_rows_computed": E * capacity}, "forward")
    assert out["useful"] == 2 * 3 * M * F * T * k
    # the doc's "2*g*M*F*T*k*f" is the padded count, up to ceil rounding
    assert out["executed"] == pytest.approx(2 * 3 * M * F * T * k * f, rel=1e-3)


def tiny_workload() -> Workload:
    return Workload(
        name="tiny", flavor="custom",
        layer=LayerShape(model_dim=8, ffn_dim=8, num_experts=4, top_k=2, activation="gelu"),
        model=ModelShape(n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=10, moe_every=2, dense_ffn_dim=16),
        batch_size=2, seq_len=3, capacity_factor=1.0,
    )


def test_attention_of_one_block_by_hand():
    # T=6, M=8, kv_dim=1*4: Q,O 2*2*6*8*8 = 1536; K,V 2*2*6*8*4 = 768; QK^T and AV 2*2*2*3*3*8 = 576
    assert attention_flops(tiny_workload(), "forward") == 1536 + 768 + 576


def test_model_adds_attention_dense_ffn_and_lm_head():
    wl = tiny_workload()
    assert num_moe_layers(wl) == 1
    out = model_flops(wl, [{"expert_rows_computed": 16}], "forward")
    attention = 2 * 2880  # two blocks
    dense = 2 * 2 * 8 * 16 * 6  # one dense GELU block, hidden 16
    lm_head = 2 * 6 * 8 * 10
    moe_useful = 6 * 2 * (2 * 2 * 8 * 8)  # T*k rows of 256
    moe_executed = 16 * 256
    assert out["useful"] == attention + dense + lm_head + moe_useful == 12864
    assert out["executed"] == attention + dense + lm_head + moe_executed == 13888
    assert out["breakdown"]["lm_head"] == lm_head
    train = model_flops(wl, [{"expert_rows_computed": 16}], "train")
    assert (train["useful"], train["executed"]) == (3 * 12864, 3 * 13888)


def test_model_needs_stats_for_every_moe_layer():
    with pytest.raises(ValueError, match="expected routing stats for 1 MoE layers, got 2"):
        model_flops(tiny_workload(), [{}, {}], "forward")
    assert model_flops(tiny_workload(), [{}], "forward")["executed"] is None
