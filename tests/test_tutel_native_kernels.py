"""tutel_native's expert kernels: "mm" (row ranges of one buffer), "onednn" (expert by expert) and
"grouped" (torch._grouped_mm over live rows), and the cost model that picks one with a layout.

All must give the same outputs and gradients (to fp32 rounding) on any row split, including
experts that get no rows and padded [E, C] buffers; a kernel is offered only where it runs.

Legend: N rows, M model dim, H hidden, E experts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from systems.tutel_native import grouped, kernel_choice, moe_layer
from systems.tutel_native.experts import resolve_kernel
from systems.tutel_native.per_expert import kernel_available

M, H, E = 32, 48, 4
ONEDNN = kernel_available("cpu", torch.float32)
GROUPED = grouped.kernel_available("cpu", torch.float32)
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch has no usable oneDNN fp32 matmul")
AVAILABLE = {"onednn": ONEDNN, "grouped": GROUPED}

EXPERTS = {
    "ffn gelu + biases": {"type": "ffn", "has_fc1_bias": True, "has_fc2_bias": True},
    "ffn relu, no biases, output dim 40": {"type": "ffn", "has_fc1_bias": False, "has_fc2_bias": False,
                                          "activation_fn": F.relu, "output_dim": 40},
    "ffn custom activation": {"type": "ffn", "activation_fn": lambda h: torch.tanh(h) * h},
    "llama_ffn (SwiGLU)": {"type": "llama_ffn"},
}


def experts_for(spec: dict, seed: int = 0):
    torch.manual_seed(seed)
    layer = moe_layer({"type": "top", "k": 2}, M, {**spec, "num_experts_per_device": E, "hidden_size_per_expert": H})
    return layer.experts


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / (b.double().abs().max().item() or 1.0)


def run(experts, x_NM, dy_NO, splits, kernel):
    experts.zero_grad(set_to_none=True)
    x = x_NM.clone().requires_grad_()
    y = experts.compute_rows(x, splits, kernel=kernel)
    y.backward(dy_NO)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in experts.named_parameters()}


def test_kernel_available_only_for_cpu_fp32():
    assert not kernel_available("cpu", torch.float64)
    assert not kernel_available("cpu", torch.bfloat16)
    assert not kernel_available("cuda", torch.float32)
    assert kernel_available("cpu", torch.float32) == (torch.backends.mkldnn.is_available() and ONEDNN)


def test_resolve_kernel():
    x32, x64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    assert resolve_kernel("auto", x64) == "mm"
    assert resolve_kernel("auto", x32) == ("onednn" if ONEDNN else "mm")
    assert resolve_kernel("mm", x32) == "mm"
    with pytest.raises(ValueError, match="expert kernel 'onednn' needs a CPU fp32 input"):
        resolve_kernel("onednn", x64)
    with pytest.raises(ValueError, match="must be one of auto, mm, onednn"):
        resolve_kernel("cublas", x32)


@pytest.mark.parametrize("kernel", ["onednn", "grouped"])
@pytest.mark.parametrize("name", list(EXPERTS))
@pytest.mark.parametrize("splits", [(7, 0, 12, 5), (0, 0, 3, 0), (6, 6, 6, 6)], ids=["ragged", "one", "padded"])
def test_kernel_matches_mm_kernel(kernel, name, splits):
    """Same outputs and gradients as the row-range kernel; both as close to an fp64 run as fp32 allows;
    experts with no rows get exactly zero weight gradients."""
    if not AVAILABLE[kernel]:
        pytest.skip(f"kernel {kernel} does not run on this torch")
    experts = experts_for(EXPERTS[name])
    N, O = sum(splits), experts.output_dim if hasattr(experts, "output_dim") else M
    gen = torch.Generator().manual_seed(1)
    x_NM, dy_NO = torch.randn(N, M, generator=gen), torch.randn(N, O, generator=gen)
    mm, other = run(experts, x_NM, dy_NO, splits, "mm"), run(experts, x_NM, dy_NO, splits, kernel)
    truth = run(experts.double(), x_NM.double(), dy_NO.double(), splits, "mm")
    experts.float()
    for what, a, b, t in [("y", mm[0], other[0], truth[0]), ("dx", mm[1], other[1], truth[1])] + [
        (n, mm[2][n], other[2][n], truth[2][n]) for n in mm[2]
    ]:
        assert rel_err(b, a) < 2e-5, f"{what}: {kernel} vs mm {rel_err(b, a):.3g}"
        assert rel_err(b, t) < 2e-5, f"{what}: {kernel} vs fp64 {rel_err(b, t):.3g}"
    for e, n in enumerate(splits):
        if n == 0:
            for name_, grad in other[2].items():
                assert grad.view(E, -1)[e].abs().max() == 0, f"{name_}: expert {e} has no rows"


@needs_onednn
def test_onednn_kernel_input_gradient_only():
    """Frozen experts: only the input gradient is asked for (weights get none)."""
    experts = experts_for(EXPERTS["llama_ffn (SwiGLU)"])
    for p in experts.parameters():
        p.requires_grad_(False)
    x = torch.randn(10, M, requires_grad=True)
    experts.compute_rows(x, (4, 0, 6, 0), kernel="onednn").sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    experts.compute_rows(x_ref, (4, 0, 6, 0), kernel="mm").sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 2e-5
    assert all(p.grad is None for p in experts.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_layout_and_kernel_of_the_layer(dtype, tmp_path, monkeypatch):
    """Kernel and layout "auto": the step runs what the cost model predicts cheapest for its fills, on
    the rows that layout implies; fp32 may choose among every kernel that runs here, fp64 only mm."""
    monkeypatch.setattr(kernel_choice, "CACHE_DIR", tmp_path)
    torch.manual_seed(0)
    layer = moe_layer({"type": "top", "k": 2, "capacity_factor": 1.25}, M,
                      {"type": "llama_ffn", "num_experts_per_device": E, "hidden_size_per_expert": H}).to(dtype)
    x = torch.randn(64, M, dtype=dtype)
    layer(x)
    stats, model = layer.last_stats, layer.kernel_cost_model
    fills = [min(n, stats.capacity) for n in stats.dispatch_count]
    (name,) = layer.kernel_choices
    assert name == "/".join(model.choose(fills)) and layer._kernel == name.split("/")[0]
    assert stats.rows_computed == kernel_choice.rows(name, fills)
    want = {"mm/live", "mm/max_fill"} | {f"{k}/live" for k, runs in AVAILABLE.items() if runs}
    assert set(model.costs) == (want if dtype == torch.float32 else {"mm/live", "mm/max_fill"})
    assert model.source == "measured" and len(list(tmp_path.glob("*.json"))) == 1




def test_cost_model_runs_the_predicted_cheapest():
    """Hand-computed: even fills favour one padded bmm (small fixed cost, no padding to pay); one
    overfull expert makes padding every expert to its fill cost more than the grouped call's overhead."""
    model = kernel_choice.KernelCostModel({"grouped/live": kernel_choice.Cost(1e-3, 1e-6),
                                           "mm/max_fill": kernel_choice.Cost(0.2e-3, 1e-6)}, {}, {}, "given", "")
    even, skewed = [10] * 8, [1] * 7 + [500]
    assert model.predict("grouped/live", even) == pytest.approx(1.08e-3)
    assert model.predict("mm/max_fill", even) == pytest.approx(0.28e-3)
    assert model.choose(even) == ("mm", "max_fill")
    assert model.predict("grouped/live", skewed) == pytest.approx(1.507e-3)
    assert model.predict("mm/max_fill", skewed) == pytest.approx(4.2e-3)
    assert model.choose(skewed) == ("grouped", "live")


def test_cost_model_is_measured_once_then_read_back(tmp_path, monkeypatch):
    """A second process (here: this one with its memory cleared) reads the first one's constants, so
    both make the same choices for the same fills."""
    monkeypatch.setattr(kernel_choice, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(kernel_choice, "_MODELS", {})
    experts = experts_for(EXPERTS["llama_ffn (SwiGLU)"])
    first = kernel_choice.model_for(experts, torch.device("cpu"), torch.float32, rows_per_expert=12.0)
    monkeypatch.setattr(kernel_choice, "_MODELS", {})
    again = kernel_choice.model_for(experts, torch.device("cpu"), torch.float32, rows_per_expert=14.0)  # same n
    assert (first.source, again.source) == ("measured", "cache") and first.costs == again.costs
    assert first.key["rows_per_expert"] == [16, 32] and first.key["num_experts"] == E
    assert all(len(points) == 2 and all(t > 0 for _, t in points) for points in first.points.values())
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_a_broken_cache_file_is_measured_around_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_choice, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(kernel_choice, "_MODELS", {})
    experts = experts_for(EXPERTS["ffn gelu + biases"])
    first = kernel_choice.model_for(experts, torch.device("cpu"), torch.float64, rows_per_expert=8.0)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{ truncated")
    monkeypatch.setattr(kernel_choice, "_MODELS", {})
    again = kernel_choice.model_for(experts, torch.device("cpu"), torch.float64, rows_per_expert=8.0)
    assert first.source == "measured" and "cache file unusable" in again.source and str(path) in again.source
    assert set(again.costs) == {"mm/live", "mm/max_fill"}  # fp64: grouped_mm and oneDNN do not run



@needs_onednn
def test_onednn_gemm_gets_a_dense_copy_of_a_weight_sliced_out_of_a_wider_one(monkeypatch):
    """Expert sharding hands the kernel column slices of wider weights; given one, oneDNN ran its
    reference kernel (12 s instead of 20 ms for a 1024x512x896 GEMM on this CPU). The op must see
    dense weights only, and the result must agree with mm."""
    from systems.tutel_native import per_expert
    real_op, seen = per_expert._onednn_op(), []

    def recording_op(x, w, *rest):
        seen.append(w)
        return real_op(x, w, *rest)

    monkeypatch.setattr(per_expert, "_onednn_op", lambda: recording_op)
    gen = torch.Generator().manual_seed(0)
    w_EMH = torch.randn(2, 48, 40, generator=gen)
    sliced_JK = w_EMH[:, :, :24][0].t()  # rows of 48 with a column stride of 40
    assert not (sliced_JK.is_contiguous() or sliced_JK.t().is_contiguous())
    x_NK = torch.randn(12, 48, generator=gen)
    torch.testing.assert_close(per_expert.linear(x_NK, sliced_JK), x_NK @ sliced_JK.t(), rtol=1e-5, atol=1e-5)
    assert seen[-1].is_contiguous()
    transposed_JK = w_EMH[0].t()
    per_expert.linear(torch.randn(12, 48, generator=gen), transposed_JK)
    assert seen[-1] is transposed_JK  # dense columns go through uncopied
