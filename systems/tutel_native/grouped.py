"""Built-in experts on live row ranges with one grouped GEMM per projection (``torch._grouped_mm``).

Why: with many small experts (fine-grained MoE: 64-256 experts of a few dozen rows each) a
per-expert loop pays Python and dispatch overhead per expert and GEMM, and a padded batched
GEMM pays for padding rows. ``torch._grouped_mm`` takes the rows of every expert in one
call, split by offsets, and loops over the groups in C++: no padding and one call per
projection. torch 2.13 has a CPU kernel for it in fp32 and bf16 (strides must be 16-byte
aligned, so model and hidden widths must be multiples of 4 in fp32, 8 in bf16).

Same contract as experts._ExpertRows: x rows split by ``spec``, weights ``[E, ., .]`` in the
Tutel layouts described in experts.py. Weight gradients are grouped GEMMs of the transposed
activations against the output gradients (``_grouped_mm`` with 2-D operands splits the
shared dimension by the offsets), giving zeros for experts without rows.

Legend: N rows, M model dim, H expert hidden, O output dim, E experts.
"""
from __future__ import annotations

import functools

import torch

from systems.tutel_native.expert_ops import RowSpec, act_backward, act_forward


@functools.cache
def kernel_available(device_type: str, dtype: torch.dtype) -> bool:
    """True when torch._grouped_mm runs here for ``dtype`` and agrees with ``mm``."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16):
        return False
    gen = torch.Generator().manual_seed(0)
    x_NM = torch.randn(12, 16, generator=gen).to(device=device_type, dtype=dtype)
    w_EMH = torch.randn(2, 16, 8, generator=gen).to(device=device_type, dtype=dtype)
    offs = torch.tensor([5, 12], dtype=torch.int32, device=device_type)
    try:
        y_NH = torch._grouped_mm(x_NM, w_EMH, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    want_NH = torch.cat([x_NM[:5] @ w_EMH[0], x_NM[5:] @ w_EMH[1]])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return torch.allclose(y_NH.float(), want_NH.float(), rtol=tol, atol=tol)


def aligned(*widths: int, dtype: torch.dtype) -> bool:
    """grouped_mm's 16-byte stride rule for these row widths."""
    per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
    return all(w % per_16_bytes == 0 for w in widths)


def _offsets(spec: RowSpec, device) -> torch.Tensor:
    ends, total = [], 0
    for n in spec.splits:
        total += n
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32, device=device)


def _row_experts(spec: RowSpec, device) -> torch.Tensor:
    counts = torch.tensor(spec.splits, device=device)
    return torch.repeat_interleave(torch.arange(len(spec.splits), device=device), counts)


class GroupedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NM, spec: RowSpec, w_in, w_gate, w_out, b_in, b_out):
        if sum(spec.splits) != x_NM.shape[0]:
            raise ValueError(f"expert row splits {spec.splits} do not cover the {x_NM.shape[0]} rows")
        gmm = torch._grouped_mm
        offs = _offsets(spec, x_NM.device)
        rows_E = _row_experts(spec, x_NM.device) if b_in is not None or b_out is not None else None
        w_in_EMH = w_in.transpose(1, 2) if spec.in_transposed else w_in
        h_NH = gmm(x_NM, w_in_EMH, offs=offs)  # pre-activation
        if b_in is not None:
            h_NH += b_in[rows_E]
        s_NH = act_forward(spec.act_kind, spec.act, h_NH)
        u_NH = gmm(x_NM, w_gate, offs=offs) if spec.gated else None  # gate branch
        a_NH = s_NH * u_NH if spec.gated else s_NH  # input of the output projection
        y_NO = gmm(a_NH, w_out, offs=offs)
        if b_out is not None:
            y_NO += b_out[rows_E]
        ctx.spec, ctx.offs, ctx.rows_E = spec, offs, rows_E
        ctx.save_for_backward(x_NM, w_in, w_gate, w_out, h_NH, a_NH, s_NH if spec.gated else None, u_NH)
        return y_NO

    @staticmethod
    def backward(ctx, d_y_NO):
        spec, offs, rows_E = ctx.spec, ctx.offs, ctx.rows_E
        gmm = torch._grouped_mm
        x_NM, w_in, w_gate, w_out, h_NH, a_NH, s_NH, u_NH = ctx.saved_tensors
        need_x, _, need_in, need_gate, need_out, need_b_in, need_b_out = ctx.needs_input_grad
        d_y_NO = d_y_NO.contiguous()
        E = w_out.shape[0]
        d_a_NH = gmm(d_y_NO, w_out.transpose(1, 2), offs=offs)
        d_out = gmm(a_NH.t(), d_y_NO, offs=offs) if need_out else None
        d_b_out = d_b_in = d_in = d_gate = d_x = None
        if need_b_out and rows_E is not None:
            d_b_out = d_y_NO.new_zeros(E, d_y_NO.shape[1]).index_add_(0, rows_E, d_y_NO)
        d_u_NH = None
        if spec.gated:
            d_u_NH = d_a_NH * s_NH
            d_h_NH = act_backward(spec.act_kind, spec.act, d_a_NH.mul_(u_NH), h_NH)
        else:
            d_h_NH = act_backward(spec.act_kind, spec.act, d_a_NH, h_NH)
        d_h_NH = d_h_NH.contiguous()
        if need_b_in and rows_E is not None:
            d_b_in = d_h_NH.new_zeros(E, d_h_NH.shape[1]).index_add_(0, rows_E, d_h_NH)
        if need_in:
            d_in = gmm(d_h_NH.t(), x_NM, offs=offs) if spec.in_transposed else gmm(x_NM.t(), d_h_NH, offs=offs)
        if need_gate and spec.gated:
            d_gate = gmm(x_NM.t(), d_u_NH, offs=offs)
        if need_x:
            d_x = gmm(d_h_NH, w_in if spec.in_transposed else w_in.transpose(1, 2), offs=offs)
            if spec.gated:
                d_x += gmm(d_u_NH, w_gate.transpose(1, 2), offs=offs)
        return d_x, None, d_in, d_gate, d_out, d_b_in, d_b_out
