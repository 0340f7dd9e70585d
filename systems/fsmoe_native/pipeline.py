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

Sharded experts (ESP, FSMoE's expert sharding; ep = sc x E here): the sc ranks holding one
expert each keep a hidden slice of it. The all-to-all sends every token once, to one holder
(rows part m of a chunk to holder m, Tutel's layout at r = 1); the holders all-gather their
rows over a process group of their own, compute partial outputs with their slices, and
reduce-scatter them (each holder gets the summed output of its own part), which goes home by
the combine all-to-all. Backward all-gathers the output gradient the same way and
reduce-scatters the partial input gradients; each slice's weight gradient is complete where
it is (its holder saw every token of the expert). The intra-group collectives are issued
asynchronously beside the all-to-alls in flight.

The expert math is written out (batched GEMMs over the local experts, the activation's
closed-form derivative from tutel_native's expert_ops), so the saved activations can be
sliced at any degree: they are kept by capacity slot, [n, W, C, .]. Rows are Tutel's padded
capacity slots; padding rows carry zeros and get zero gradients.

Legend: E global experts, n local experts (1 when sharded), W ranks, sc holders per expert,
C capacity, c chunk of C, r = c / sc rows a holder receives from each source, R rows one
step computes (sc x W x r), M model dim, H expert hidden (a slice when sharded), O output dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    sharded: int = 1  # sc: ranks holding slices of each expert
    intra_group: object = None  # their process group (sc > 1)

    @property
    def act_kind(self) -> str:
        return activation_kind(self.activation)


def _send_layout(chunk_ECM: torch.Tensor) -> torch.Tensor:
    """[E, c, M] -> [W * n * r, M]: destination rank w gets its n experts' slots (sharded: rows part
    w % sc of expert w // sc)."""
    return chunk_ECM.reshape(-1, chunk_ECM.shape[-1]).contiguous()


def _chunks(C: int, d: int, sc: int) -> list[tuple[int, int]]:
    if C % (d * sc):
        raise ValueError(f"capacity {C} is not a multiple of the pipeline degree {d} x {sc} expert holders")
    c = C // d
    return [(i * c, (i + 1) * c) for i in range(d)]


def _arrived(buf: torch.Tensor, s: Schedule, c: int):
    """What a rank received from every source for a chunk of c slots -> a pending [n, R, X] compute
    tensor (sharded: after the all-gather among the expert's holders, issued now)."""
    r = c // s.sharded
    if s.sharded == 1:
        return lambda: buf.view(s.world, s.num_local, r, -1).transpose(0, 1).reshape(s.num_local, s.world * r, -1)
    out = buf.new_empty(s.sharded * buf.shape[0], buf.shape[1])
    work = dist.all_gather_into_tensor(out, buf, group=s.intra_group, async_op=True)

    def done():
        work.wait()
        return out.view(1, -1, buf.shape[1])  # rows ordered (holder m, source w, row j)

    return done


def _leaving(y_nRX: torch.Tensor, s: Schedule, c: int):
    """A chunk's computed rows [n, R, X] -> a pending [W * n * r, X], what goes home by the all-to-all
    (sharded: the holders' partial sums reduce-scattered first, issued now, so each holder sends its
    own part, summed; the caller computes the next chunk before it waits)."""
    r = c // s.sharded
    if s.sharded == 1:
        out = y_nRX.view(s.num_local, s.world, r, -1).transpose(0, 1).reshape(-1, y_nRX.shape[-1]).contiguous()
        return lambda: out
    out = y_nRX.new_empty(s.world * r, y_nRX.shape[-1])
    work = dist.reduce_scatter_tensor(out, y_nRX.reshape(-1, y_nRX.shape[-1]).contiguous(), group=s.intra_group,
                                      async_op=True)

    def done():
        work.wait()
        return out

    return done


def _send_home(pending, leaving, s: Schedule) -> None:
    """Start the combine all-to-all of the chunk whose rows were waiting (one chunk behind)."""
    if leaving is not None:
        pending.append(s.exchange.start(leaving()))


def _to_slots(t_nRX: torch.Tensor, s: Schedule, c: int) -> torch.Tensor:
    """Compute rows (holder m, source w, row j) -> [n, W, c, X] by slot (slot m * r + j of source w)."""
    n, X, r = t_nRX.shape[0], t_nRX.shape[-1], c // s.sharded
    return t_nRX.view(n, s.sharded, s.world, r, X).transpose(1, 2).reshape(n, s.world, c, X)


def _from_slots(buf_nWcX: torch.Tensor, s: Schedule) -> torch.Tensor:
    """The inverse of _to_slots: [n, W, c, X] -> [n, R, X] in compute-row order."""
    n, W, c, X = buf_nWcX.shape
    r = c // s.sharded
    return buf_nWcX.reshape(n, W, s.sharded, r, X).transpose(1, 2).reshape(n, s.sharded * W * r, X)


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
        spans = _chunks(C, s.forward_degree, s.sharded)
        sent = [s.exchange.start(_send_layout(D_ECM[:, c0:c1])) for c0, c1 in spans]
        returning, leaving = [], None
        for (c0, c1), (_, finish) in zip(spans, sent, strict=True):
            c = c1 - c0
            x_nRM = _arrived(finish(), s, c)()
            y, h, u, a = _forward_rows(s, x_nRM, w_in_nMH, w_gate, w_out, b_in, b_out)
            x_full[:, :, c0:c1] = _to_slots(x_nRM, s, c)
            h_full[:, :, c0:c1] = _to_slots(h, s, c)
            a_full[:, :, c0:c1] = _to_slots(a, s, c)
            if u is not None:
                u_full[:, :, c0:c1] = _to_slots(u, s, c)
            _send_home(returning, leaving, s)
            leaving = _leaving(y, s, c)
        _send_home(returning, leaving, s)
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
        E = dY_ECO.shape[0]
        dY_ECO = dY_ECO.contiguous()
        g_in = x_full.new_zeros(n, M, H)
        g_gate = torch.zeros_like(w_gate_nMH) if w_gate_nMH is not None else None
        g_out = torch.zeros_like(w_out_nHO)
        g_b_in = x_full.new_zeros(n, H) if ctx.has_b_in else None
        g_b_out = x_full.new_zeros(n, O) if ctx.has_b_out else None
        dD_ECM = x_full.new_empty(E, C, M)
        spans = _chunks(C, s.backward_degree, s.sharded)
        sent = [s.exchange.start(_send_layout(dY_ECO[:, c0:c1])) for c0, c1 in spans]
        returning, leaving = [], None
        for (c0, c1), (_, finish) in zip(spans, sent, strict=True):
            c = c1 - c0
            dy = _arrived(finish(), s, c)()
            x = _from_slots(x_full[:, :, c0:c1], s)
            h = _from_slots(h_full[:, :, c0:c1], s)
            a = _from_slots(a_full[:, :, c0:c1], s)
            d_a = torch.bmm(dy, w_out_nHO.transpose(1, 2))
            g_out.baddbmm_(a.transpose(1, 2), dy)
            if g_b_out is not None:
                g_b_out += dy.sum(1)
            if w_gate_nMH is not None:
                u = _from_slots(u_full[:, :, c0:c1], s)
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
            _send_home(returning, leaving, s)
            leaving = _leaving(d_x, s, c)
        _send_home(returning, leaving, s)
        for (c0, c1), (_, finish) in zip(spans, returning, strict=True):
            dD_ECM[:, c0:c1] = finish().view(E, c1 - c0, M)
        d_w_in = g_in.transpose(1, 2) if s.kind == "ffn" else g_in
        return dD_ECM, None, d_w_in, g_gate, g_out, g_b_in, g_b_out


def pipelined_experts(D_ECM: torch.Tensor, schedule: Schedule, w_in, w_gate, w_out, b_in=None, b_out=None):
    """Y[E, C, O] for the padded dispatch buffer D[E, C, M] (module docstring)."""
    return PipelinedExperts.apply(D_ECM, schedule, w_in, w_gate, w_out, b_in, b_out)
