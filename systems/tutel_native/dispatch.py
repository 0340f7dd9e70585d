"""Sparse encode (dispatch) and decode (combine) as autograd Functions (section 2.7-2.10).

Both directions are gathers costing O(S*K*M), never a dense [S, E, C]
product and never an atomic scatter-add (slow on CPU):
  dispatch: rows[n] = src[token_N[n]] (* scale_N[n])            (encode fwd, decode bwd)
  combine:  out[s]  = sum_i w[s, i] * rows[row_SK[s, i]]        (decode fwd, encode bwd)
with w the gate (zero where the choice was dropped). The dispatched buffer is
compact ([N, M], live rows only, expert-major: what the experts need at world
size 1) or padded ([E*C, M], zeros where no token landed: what an all-to-all
needs). All indices come from the step's RoutePlan, computed once.

Legend: S tokens, K choices, M model dim, O expert output dim, N live choices, R buffer rows.
"""
from __future__ import annotations

import torch

from systems.tutel_native.routing import RoutePlan


def _dispatch(src_SM: torch.Tensor, plan: RoutePlan, scale_N: torch.Tensor | None) -> torch.Tensor:
    live_NM = src_SM.index_select(0, plan.token_N)
    if scale_N is not None:
        live_NM.mul_(scale_N.unsqueeze(1))
    if not plan.padded:
        return live_NM
    out_RM = src_SM.new_zeros(plan.rows, src_SM.shape[1])
    return out_RM.index_copy_(0, plan.slot_N, live_NM)


def _combine(rows_RM: torch.Tensor, plan: RoutePlan, weight_SK: torch.Tensor | None) -> torch.Tensor:
    """out[s] = sum_i w[s, i] * rows[row(s, i)]; weight None means the keep mask alone."""
    if weight_SK is None:
        weight_SK = plan.keep_SK
    elif plan.keep_SK is not None:
        weight_SK = weight_SK * plan.keep_SK
    out_SM = rows_RM.index_select(0, plan.row_SK[:, 0])
    if weight_SK is not None:
        out_SM.mul_(weight_SK[:, :1])
    for i in range(1, plan.top_k):
        picked = rows_RM.index_select(0, plan.row_SK[:, i])
        if weight_SK is None:
            out_SM.add_(picked)
        else:
            out_SM.addcmul_(picked, weight_SK[:, i : i + 1])
    return out_SM


def _pair_dots(a_SM: torch.Tensor, rows_RM: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """d[s, i] = <a[s], rows[row(s, i)]> for kept choices, 0 for dropped ones."""
    dots = [(a_SM * rows_RM.index_select(0, plan.row_SK[:, i])).sum(1) for i in range(plan.top_k)]
    d_SK = torch.stack(dots, dim=1)
    return d_SK if plan.keep_SK is None else d_SK * plan.keep_SK


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SM, gates_SK, plan: RoutePlan, prescale: bool):
        scale_N = gates_SK.reshape(-1).index_select(0, plan.flat_N) if prescale else None
        ctx.plan, ctx.prescale = plan, prescale
        ctx.save_for_backward(x_SM if prescale else None, gates_SK if prescale else None)
        return _dispatch(x_SM, plan, scale_N)

    @staticmethod
    def backward(ctx, d_rows_RM):
        x_SM, gates_SK = ctx.saved_tensors
        plan = ctx.plan
        d_rows_RM = d_rows_RM.contiguous()
        d_gates = _pair_dots(x_SM, d_rows_RM, plan) if ctx.prescale and ctx.needs_input_grad[1] else None
        d_x = _combine(d_rows_RM, plan, gates_SK) if ctx.needs_input_grad[0] else None
        return d_x, d_gates, None, None


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RO, gates_SK, plan: RoutePlan, weighted: bool):
        ctx.plan, ctx.weighted = plan, weighted
        ctx.save_for_backward(y_RO if weighted else None, gates_SK if weighted else None)
        return _combine(y_RO, plan, gates_SK if weighted else None)

    @staticmethod
    def backward(ctx, d_out_SO):
        y_RO, gates_SK = ctx.saved_tensors
        plan = ctx.plan
        d_out_SO = d_out_SO.contiguous()
        d_gates = _pair_dots(d_out_SO, y_RO, plan) if ctx.weighted and ctx.needs_input_grad[1] else None
        scale_N = gates_SK.reshape(-1).index_select(0, plan.flat_N) if ctx.weighted else None
        d_y = _dispatch(d_out_SO, plan, scale_N) if ctx.needs_input_grad[0] else None
        return d_y, d_gates, None, None


def encode(x_SM: torch.Tensor, plan: RoutePlan, is_postscore: bool) -> torch.Tensor:
    """Dispatched rows [R, M]; pre-scaled by the gate when ``is_postscore`` is False."""
    return _Encode.apply(x_SM, plan.gates_SK.to(x_SM.dtype), plan, not is_postscore)


def decode(y_RO: torch.Tensor, plan: RoutePlan, is_postscore: bool) -> torch.Tensor:
    """Combined output [S, O]; gate-weighted when ``is_postscore`` is True."""
    return _Decode.apply(y_RO, plan.gates_SK.to(y_RO.dtype), plan, is_postscore)
