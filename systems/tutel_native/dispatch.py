"""Sparse encode (dispatch) and decode (combine) as autograd Functions (section 2.7-2.10).

Both cost O(N*M) gathers/scatters over the live choices (N <= S*K), never a
dense [S, E, C] product. The dispatched buffer is either compact ([N, M],
live rows only, expert-major: what the experts need at world size 1) or
padded ([E*C, M], zero rows where no token landed: what an all-to-all needs).
The row index comes from the RoutePlan, computed once per step.

Legend: S tokens, M model dim, O expert output dim, N live choices, R buffer rows.
"""
from __future__ import annotations

import torch

from systems.tutel_native.routing import RoutePlan


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SM, gate_N, token_N, row_N, num_rows, prescale):
        live_NM = x_SM.index_select(0, token_N)
        if prescale:
            live_NM.mul_(gate_N.unsqueeze(1))
        if row_N is None:
            out_RM = live_NM
        else:
            out_RM = x_SM.new_zeros(num_rows, x_SM.shape[1])
            out_RM.index_copy_(0, row_N, live_NM)
        ctx.num_tokens, ctx.prescale = x_SM.shape[0], prescale
        ctx.save_for_backward(x_SM if prescale else None, gate_N if prescale else None, token_N, row_N)
        return out_RM

    @staticmethod
    def backward(ctx, d_out_RM):
        x_SM, gate_N, token_N, row_N = ctx.saved_tensors
        d_live_NM = d_out_RM if row_N is None else d_out_RM.index_select(0, row_N)
        d_gate_N = None
        if ctx.prescale:
            if ctx.needs_input_grad[1]:
                d_gate_N = (d_live_NM * x_SM.index_select(0, token_N)).sum(1)
            d_live_NM = d_live_NM * gate_N.unsqueeze(1)
        d_x_SM = None
        if ctx.needs_input_grad[0]:
            d_x_SM = d_live_NM.new_zeros(ctx.num_tokens, d_live_NM.shape[1])
            d_x_SM.index_add_(0, token_N, d_live_NM)
        return d_x_SM, d_gate_N, None, None, None, None


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RO, gate_N, token_N, row_N, num_tokens, weighted):
        live_NO = y_RO if row_N is None else y_RO.index_select(0, row_N)
        contrib_NO = live_NO * gate_N.unsqueeze(1) if weighted else live_NO
        out_SO = y_RO.new_zeros(num_tokens, y_RO.shape[1])
        out_SO.index_add_(0, token_N, contrib_NO)
        ctx.rows, ctx.weighted = y_RO.shape[0], weighted
        ctx.save_for_backward(live_NO if weighted else None, gate_N if weighted else None, token_N, row_N)
        return out_SO

    @staticmethod
    def backward(ctx, d_out_SO):
        live_NO, gate_N, token_N, row_N = ctx.saved_tensors
        d_live_NO = d_out_SO.index_select(0, token_N)
        d_gate_N = None
        if ctx.weighted:
            if ctx.needs_input_grad[1]:
                d_gate_N = (d_live_NO * live_NO).sum(1)  # <dy[s], Y[slot]>
            d_live_NO.mul_(gate_N.unsqueeze(1))
        d_y_RO = d_live_NO
        if row_N is not None:
            d_y_RO = d_live_NO.new_zeros(ctx.rows, d_live_NO.shape[1])
            d_y_RO.index_copy_(0, row_N, d_live_NO)
        return d_y_RO, d_gate_N, None, None, None, None


def encode(x_SM: torch.Tensor, plan: RoutePlan, is_postscore: bool) -> torch.Tensor:
    """Dispatched rows [R, M]; pre-scaled by the gate when ``is_postscore`` is False."""
    gate_N = plan.gate_N.to(x_SM.dtype)
    return _Encode.apply(x_SM, gate_N, plan.token_N, plan.row_N, plan.rows, not is_postscore)


def decode(y_RO: torch.Tensor, plan: RoutePlan, is_postscore: bool) -> torch.Tensor:
    """Combined output [S, O]; gate-weighted when ``is_postscore`` is True."""
    gate_N = plan.gate_N.to(y_RO.dtype)
    return _Decode.apply(y_RO, gate_N, plan.token_N, plan.row_N, plan.num_tokens, is_postscore)
