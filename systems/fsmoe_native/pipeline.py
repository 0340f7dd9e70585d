"""The expert step of an FSMoE-style layer: dispatch, experts, combine, pipelined at one degree
forward and another backward.

tutel_native pipelines with one degree d, and autograd replays the same chunking in backward.
FSMoE chooses the backward degree separately (its backward has twice the GEMM work, so the
best degree differs: 912 of its 1,458 layer configurations had different best degrees). This
module is one autograd Function that owns both schedules:

* forward, degree d_f: the capacity axis is cut into d_f chunks; every chunk's dispatch
  all-to-all is issued up front, each chunk's experts run as soon as it arrives, and its
  combine all-to-all is issued as soon as it is computed;
* backward, degree d_b: the output gradient is cut into d_b chunks along the same axis and
  sent to the experts' ranks; each chunk's expert backward runs on the saved activations of
  its rows (the rows are independent, so any chunking of the capacity axis is valid) and its
  input gradient is sent home as soon as it is computed. Weight gradients accumulate over the
  chunks.

The expert math is written out (batched GEMMs over the local experts, the activation's
closed-form derivative from tutel_native's expert_ops), so the saved activations can be
sliced at any degree. Rows are Tutel's padded capacity slots; padding rows carry zeros and
get zero gradients. Whole experts per rank (expert parallelism); sharded experts are not
supported here yet.

Legend: E global experts, n local experts, W ranks, C capacity, c chunk of C, M model dim,
H expert hidden, O output dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from systems.tutel_native.comm import Exchange
from systems.tutel_native.expert_ops import act_backward, act_forward, activation_kind


@dataclass
class Schedule:
    """What one call of the expert step needs besides tensors."""

    world: int
    num_local: int
    forward_degree: int
    backward_degree: int
    exchange: Exchange
    kind: str  # "llama_ffn" (w_in, w_gate, w_out) or "ffn" (w_in transposed, w_out, biases)
    activation: object

    @property
    def act_kind(self) -> str:
        return activation_kind(self.activation)


def _send_layout(chunk_ECM: torch.Tensor) -> torch.Tensor:
    """[E, c, M] -> [W * n * c, M]: destination rank w gets its n experts' slots."""
    return chunk_ECM.reshape(-1, chunk_ECM.shape[-1]).contiguous()


def _received(buf: torch.Tensor, s: Schedule, c: int) -> torch.Tensor:
    """[W * n * c, M] received from every source -> [n, W, c, M]."""
    return buf.view(s.world, s.num_local, c, -1).transpose(0, 1)


def _return_layout(y_nWcO: torch.Tensor) -> torch.Tensor:
    """[n, W, c, O] -> [W * n * c, O]: source rank w gets back its slots of my experts."""
    return y_nWcO.transpose(0, 1).reshape(-1, y_nWcO.shape[-1]).contiguous()


def _chunks(C: int, d: int) -> list[tuple[int, int]]:
    if C % d:
        raise ValueError(f"capacity {C} is not a multiple of the pipeline degree {d}")
    c = C // d
    return [(i * c, (i + 1) * c) for i in range(d)]


def _weights(kind: str, w_in, w_gate, w_out):
    """(w_in as [n, M, H], w_gate [n, M, H] or None, w_out [n, H, O])."""
    return (w_in.transpose(1, 2) if kind == "ffn" else w_in), w_gate, w_out


def _forward_rows(s: Schedule, x_nRM, w_in_nMH, w_gate, w_out, b_in, b_out):
    h = torch.bmm(x_nRM, w_in_nMH)
    if b_in is not None:
        h += b_in.unsqueeze(1)
    act = act_forward(s.act_kind, s.activation, h)
    u = torch.bmm(x_nRM, w_gate) if w_gate is not None else None
    a = act * u if u is not None else act
    y = torch.bmm(a, w_out)
    if b_out is not None:
        y += b_out.unsqueeze(1)
    return y, h, u, a


class PipelinedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, D_ECM, s: Schedule, w_in, w_gate, w_out, b_in, b_out):
        E, C, M = D_ECM.shape
        n, W = s.num_local, s.world
        w_in_nMH, w_gate, w_out = _weights(s.kind, w_in, w_gate, w_out)
        H, O = w_in_nMH.shape[2], w_out.shape[2]
        x_full = D_ECM.new_empty(n, W, C, M)
        h_full = D_ECM.new_empty(n, W, C, H)
        a_full = D_ECM.new_empty(n, W, C, H)
        u_full = D_ECM.new_empty(n, W, C, H) if w_gate is not None else None
        Y_ECO = D_ECM.new_empty(E, C, O)
        spans = _chunks(C, s.forward_degree)
        sent = [s.exchange.start(_send_layout(D_ECM[:, c0:c1])) for c0, c1 in spans]
        returning = []
        for (c0, c1), (_, finish) in zip(spans, sent, strict=True):
            c = c1 - c0
            x_nWcM = _received(finish(), s, c)
            x_full[:, :, c0:c1] = x_nWcM
            x_nRM = x_full[:, :, c0:c1].reshape(n, W * c, M)
            y, h, u, a = _forward_rows(s, x_nRM, w_in_nMH, w_gate, w_out, b_in, b_out)
            h_full[:, :, c0:c1] = h.view(n, W, c, H)
            a_full[:, :, c0:c1] = a.view(n, W, c, H)
            if u is not None:
                u_full[:, :, c0:c1] = u.view(n, W, c, H)
            returning.append(s.exchange.start(_return_layout(y.view(n, W, c, O))))
        for (c0, c1), (_, finish) in zip(spans, returning, strict=True):
            Y_ECO[:, c0:c1] = finish().view(E, c1 - c0, O)
        ctx.s = s
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        ctx.save_for_backward(w_in, w_gate, w_out, x_full, h_full, a_full, u_full)
        return Y_ECO

    @staticmethod
    def backward(ctx, dY_ECO):
        s = ctx.s
        w_in, w_gate, w_out, x_full, h_full, a_full, u_full = ctx.saved_tensors
        w_in_nMH, w_gate_nMH, w_out_nHO = _weights(s.kind, w_in, w_gate, w_out)
        n, W, C, M = x_full.shape
        H, O = h_full.shape[3], w_out_nHO.shape[2]
        E = n * W
        dY_ECO = dY_ECO.contiguous()
        g_in = x_full.new_zeros(n, M, H)
        g_gate = torch.zeros_like(w_gate_nMH) if w_gate_nMH is not None else None
        g_out = torch.zeros_like(w_out_nHO)
        g_b_in = x_full.new_zeros(n, H) if ctx.has_b_in else None
        g_b_out = x_full.new_zeros(n, O) if ctx.has_b_out else None
        dD_ECM = x_full.new_empty(E, C, M)
        spans = _chunks(C, s.backward_degree)
        sent = [s.exchange.start(_send_layout(dY_ECO[:, c0:c1])) for c0, c1 in spans]
        returning = []
        for (c0, c1), (_, finish) in zip(spans, sent, strict=True):
            c = c1 - c0
            R = W * c
            dy = _received(finish(), s, c).reshape(n, R, O)
            x = x_full[:, :, c0:c1].reshape(n, R, M)
            h = h_full[:, :, c0:c1].reshape(n, R, H)
            a = a_full[:, :, c0:c1].reshape(n, R, H)
            d_a = torch.bmm(dy, w_out_nHO.transpose(1, 2))
            g_out.baddbmm_(a.transpose(1, 2), dy)
            if g_b_out is not None:
                g_b_out += dy.sum(1)
            if w_gate_nMH is not None:
                u = u_full[:, :, c0:c1].reshape(n, R, H)
                d_u = d_a * act_forward(s.act_kind, s.activation, h)
                d_h = act_backward(s.act_kind, s.activation, d_a * u, h)
                g_gate.baddbmm_(x.transpose(1, 2), d_u)
            else:
                d_u, d_h = None, act_backward(s.act_kind, s.activation, d_a, h)
            if g_b_in is not None:
                g_b_in += d_h.sum(1)
            g_in.baddbmm_(x.transpose(1, 2), d_h)
            d_x = torch.bmm(d_h, w_in_nMH.transpose(1, 2))
            if d_u is not None:
                d_x.baddbmm_(d_u, w_gate_nMH.transpose(1, 2))
            returning.append(s.exchange.start(_return_layout(d_x.view(n, W, c, M))))
        for (c0, c1), (_, finish) in zip(spans, returning, strict=True):
            dD_ECM[:, c0:c1] = finish().view(E, c1 - c0, M)
        d_w_in = g_in.transpose(1, 2) if s.kind == "ffn" else g_in
        return dD_ECM, None, d_w_in, g_gate, g_out, g_b_in, g_b_out


def pipelined_experts(D_ECM: torch.Tensor, schedule: Schedule, w_in, w_gate, w_out, b_in=None, b_out=None):
    """Y[E, C, O] for the padded dispatch buffer D[E, C, M] (module docstring)."""
    return PipelinedExperts.apply(D_ECM, schedule, w_in, w_gate, w_out, b_in, b_out)
