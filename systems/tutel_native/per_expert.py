"""Built-in experts computed expert by expert, with oneDNN GEMMs on CPU (fp32).

Why: on the CPU this harness runs on (2 cores, AMD Zen 4) torch's fp32 ``mm``
goes to MKL, while the oneDNN matmul that ships inside torch runs the same
per-expert GEMMs 6-19% faster (forward and data-gradient GEMMs; measured in
reports/tutel_native_efficiency.md). torch exposes oneDNN's fp32 matmul only as
``torch.ops.mkldnn._linear_pointwise`` (``X @ W.T (+ b)``, a new output tensor, no
``out=``), so this path keeps every expert's activations as separate tensors
instead of row ranges of one buffer: no padding, no copies except the final
``cat`` of the outputs and input gradients. Weight gradients stay on ``mm(out=)``
into one preallocated gradient per parameter (MKL is as fast there and the
gradient must be one tensor).

``kernel_available`` probes the op once per (device, dtype) and checks it against
``mm``; without it (another build of torch, GPU, fp64, bf16) the row-range path in
experts.py is used. The numerics are fp32 GEMMs either way (no reduced-precision
fpmath mode is set): outputs agree with the ``mm`` path to fp32 rounding.

oneDNN builds one primitive per GEMM shape (0.6-1 ms the first time, then cached
by oneDNN), and row counts change with the routing. Rounding each expert's rows up
to a multiple of 8 would bound the set of shapes, but with fresh routing every
step it measured no faster (245 vs 247 ms per layer step, interleaved, 25 steps),
so rows are never padded here.

Legend: N rows of one expert, M model dim, H expert hidden, O output dim, E experts.
"""
from __future__ import annotations

import functools

import torch

from systems.tutel_native.expert_ops import RowSpec, act_backward, act_forward


def _onednn_op():
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return ops._linear_pointwise if ops is not None else None
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def kernel_available(device_type: str, dtype: torch.dtype) -> bool:
    """True when oneDNN's matmul is usable here and agrees with ``mm`` (CPU, fp32 only)."""
    if device_type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    op = _onednn_op()
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x_NM, w_MH = torch.randn(24, 16, generator=gen), torch.randn(16, 40, generator=gen)
    try:
        y_NH = op(x_NM, w_MH.t(), None, "none", [], "")  # a transposed (strided) weight view
        y2_NM = op.binary(y_NH, x_NM, w_MH, None, "add")
    except RuntimeError:
        return False
    expected_NH = x_NM @ w_MH
    return torch.allclose(y_NH, expected_NH, rtol=1e-5, atol=1e-5) and torch.allclose(
        y2_NM, expected_NH @ w_MH.t() + x_NM, rtol=1e-5, atol=1e-4
    )


def dense_weight(w_JK: torch.Tensor) -> torch.Tensor:
    """``w`` as oneDNN can take it: dense rows or dense columns. Any other view (a slice of a wider
    weight, as expert sharding makes) sends oneDNN to its reference kernel, measured 600x slower
    (12 s for a 1024x512x896 GEMM), or fails to build a primitive at all; such a view is copied."""
    return w_JK if w_JK.is_contiguous() or w_JK.t().is_contiguous() else w_JK.contiguous()


def linear(x_NK: torch.Tensor, w_JK: torch.Tensor, bias_J: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` by oneDNN; ``w`` may be any view (see dense_weight)."""
    return _onednn_op()(x_NK, dense_weight(w_JK), bias_J, "none", [], "")


def linear_add(x_NK: torch.Tensor, w_JK: torch.Tensor, other_NJ: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + other`` by oneDNN (the sum fused into the GEMM)."""
    return _onednn_op().binary(x_NK, other_NJ, dense_weight(w_JK), None, "add")


class PerExpertRows(torch.autograd.Function):
    """Same contract as experts._ExpertRows (x rows split by ``spec``, weights [E, ., .] in the
    Tutel layouts described there), computed expert by expert on separate tensors."""

    @staticmethod
    def forward(ctx, x_NM, spec: RowSpec, w_in, w_gate, w_out, b_in, b_out):
        if sum(spec.splits) != x_NM.shape[0]:
            raise ValueError(f"expert row splits {spec.splits} do not cover the {x_NM.shape[0]} rows")
        O = w_out.shape[2]
        saved, y_pieces = [], []
        for e, r0, r1 in spec.ranges():
            if r1 == r0:
                y_pieces.append(x_NM.new_empty(0, O))
                continue
            x_nM = x_NM[r0:r1]
            w_in_HM = w_in[e] if spec.in_transposed else w_in[e].t()
            h_nH = linear(x_nM, w_in_HM, None if b_in is None else b_in[e])  # pre-activation
            s_nH = act_forward(spec.act_kind, spec.act, h_nH)
            u_nH = linear(x_nM, w_gate[e].t()) if spec.gated else None  # gate branch
            a_nH = s_nH * u_nH if spec.gated else s_nH  # input of the output projection
            y_pieces.append(linear(a_nH, w_out[e].t(), None if b_out is None else b_out[e]))
            saved += [h_nH, a_nH] + ([s_nH, u_nH] if spec.gated else [])
        ctx.spec = spec
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        ctx.save_for_backward(x_NM, w_in, w_gate, w_out, *saved)
        return torch.cat(y_pieces)

    @staticmethod
    def backward(ctx, d_y_NO):
        spec = ctx.spec
        x_NM, w_in, w_gate, w_out, *saved = ctx.saved_tensors
        need_x, _, need_in, need_gate, need_out, need_b_in, need_b_out = ctx.needs_input_grad
        d_y_NO = d_y_NO.contiguous()
        E, H = w_out.shape[0], w_out.shape[1]
        d_in = torch.empty_like(w_in) if need_in else None
        d_gate = torch.empty_like(w_gate) if need_gate and spec.gated else None
        d_out = torch.empty_like(w_out) if need_out else None
        d_b_in = x_NM.new_empty(E, H) if need_b_in and ctx.has_b_in else None
        d_b_out = x_NM.new_empty(E, w_out.shape[2]) if need_b_out and ctx.has_b_out else None
        for e, r0, r1 in spec.ranges():  # experts without rows: zero gradients (the others are overwritten)
            if r1 == r0:
                for grad in (d_in, d_gate, d_out, d_b_in, d_b_out):
                    if grad is not None:
                        grad[e].zero_()
        d_x_pieces = []
        per_expert = 4 if spec.gated else 2
        live = 0
        for e, r0, r1 in spec.ranges():
            if r1 == r0:
                d_x_pieces.append(x_NM.new_empty(0, x_NM.shape[1]))
                continue
            h_nH, a_nH, *gated = saved[live * per_expert : (live + 1) * per_expert]
            live += 1
            x_nM, d_y_nO = x_NM[r0:r1], d_y_NO[r0:r1]
            d_a_nH = linear(d_y_nO, w_out[e])
            if d_out is not None:
                torch.mm(a_nH.t(), d_y_nO, out=d_out[e])
            if d_b_out is not None:
                torch.sum(d_y_nO, 0, out=d_b_out[e])
            d_u_nH = None
            if spec.gated:
                s_nH, u_nH = gated
                d_u_nH = d_a_nH * s_nH
                d_a_nH.mul_(u_nH)
            d_h_nH = act_backward(spec.act_kind, spec.act, d_a_nH, h_nH)
            if d_b_in is not None:
                torch.sum(d_h_nH, 0, out=d_b_in[e])
            if d_in is not None:
                if spec.in_transposed:
                    torch.mm(d_h_nH.t(), x_nM, out=d_in[e])
                else:
                    torch.mm(x_nM.t(), d_h_nH, out=d_in[e])
            if d_gate is not None:
                torch.mm(x_nM.t(), d_u_nH, out=d_gate[e])
            if need_x:
                d_x_nM = linear(d_h_nH, w_in[e].t() if spec.in_transposed else w_in[e])
                if spec.gated:
                    d_x_nM = linear_add(d_u_nH, w_gate[e], d_x_nM)
                d_x_pieces.append(d_x_nM)
        d_x = torch.cat(d_x_pieces) if need_x else None
        return d_x, None, d_in, d_gate, d_out, d_b_in, d_b_out
