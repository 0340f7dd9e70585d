"""Expert networks (sections 1, 5, 7): ``ffn``, ``llama_ffn`` (SwiGLU) and ``custom``.

The built-in experts run as one autograd Function over *row ranges*: expert e
owns rows [start_e, start_e + n_e) of a [N, M] buffer. At world size 1 those
are only the live rows (padding slots cost no GEMM time); for a padded
[E, C, M] buffer every range has C rows. The Function loops over experts with
``torch.mm(out=...)`` (faster than one bmm on this CPU, see
shared/docs/peers-on-cpu.md) and writes weight gradients straight into one
preallocated gradient per parameter: indexing a parameter per expert under
plain autograd would allocate a zero-filled full-size gradient per expert.

Parameter layouts (Tutel's checkpoint format, E = local experts, sc = 1 here):
  ffn:       batched_fc1_w [E, H, M]  h = x @ fc1[e].T (+ batched_fc1_bias [E, H])
             batched_fc2_w [E, H, O]  y = act(h) @ fc2[e] (+ batched_fc2_bias [E, O])
  llama_ffn: W_fc1, W_fc2 flat views of [E, M, H]; W_fc3 flat view of [E, H, M]
             y = (act(x @ W1[e]) * (x @ W2[e])) @ W3[e]

Legend: N rows, M model dim, H expert hidden, O output dim, E local experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def activation_kind(act) -> str:
    """Name of an activation with a known closed-form derivative, else 'generic'."""
    if act is F.silu or isinstance(act, nn.SiLU):
        return "silu"
    if act is F.relu or act is torch.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return "generic"


def _act_forward(kind: str, act, h: torch.Tensor, out: torch.Tensor) -> None:
    if kind == "silu":
        torch.ops.aten.silu.out(h, out=out)
    elif kind == "gelu":
        torch.ops.aten.gelu.out(h, out=out)
    elif kind == "relu":
        torch.clamp_min(h, 0, out=out)
    else:
        out.copy_(act(h))


def _act_backward(kind: str, act, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if kind == "relu":
        return grad * (h > 0)
    with torch.enable_grad():
        h_leaf = h.detach().requires_grad_(True)
        (d_h,) = torch.autograd.grad(act(h_leaf), h_leaf, grad)
    return d_h


@dataclass(frozen=True)
class RowSpec:
    """Static description of one expert call (not a tensor, so autograd ignores it)."""

    splits: tuple[int, ...]  # rows per expert
    act_kind: str
    act: object
    gated: bool  # SwiGLU: act(x W_in) * (x W_gate)
    in_transposed: bool  # W_in[e] stored [H, M] (ffn) instead of [M, H] (llama)

    def ranges(self):
        start = 0
        for e, n in enumerate(self.splits):
            yield e, start, start + n
            start += n


class _ExpertRows(torch.autograd.Function):
    """Per-expert GEMMs on row ranges; each elementwise step runs once over all rows
    (fewer, larger parallel regions: cheaper, and far less sensitive to a busy machine)."""

    @staticmethod
    def forward(ctx, x_NM, spec: RowSpec, w_in, w_gate, w_out, b_in, b_out):
        N, H, O = x_NM.shape[0], w_in.shape[1] if spec.in_transposed else w_in.shape[2], w_out.shape[2]
        if sum(spec.splits) != N:
            raise ValueError(f"expert row splits {spec.splits} do not cover the {N} rows")
        h_NH = x_NM.new_empty(N, H)  # pre-activation
        u_NH = x_NM.new_empty(N, H) if spec.gated else None  # gate branch x @ W_gate
        live = [(e, r0, r1) for e, r0, r1 in spec.ranges() if r1 > r0]
        for e, r0, r1 in live:
            x_e = x_NM[r0:r1]
            w_in_e = w_in[e].t() if spec.in_transposed else w_in[e]
            if b_in is None:
                torch.mm(x_e, w_in_e, out=h_NH[r0:r1])
            else:
                torch.addmm(b_in[e], x_e, w_in_e, out=h_NH[r0:r1])
            if spec.gated:
                torch.mm(x_e, w_gate[e], out=u_NH[r0:r1])
        s_NH = x_NM.new_empty(N, H)  # act(h)
        _act_forward(spec.act_kind, spec.act, h_NH, s_NH)
        a_NH = s_NH * u_NH if spec.gated else s_NH  # input of the output projection
        y_NO = x_NM.new_empty(N, O)
        for e, r0, r1 in live:
            if b_out is None:
                torch.mm(a_NH[r0:r1], w_out[e], out=y_NO[r0:r1])
            else:
                torch.addmm(b_out[e], a_NH[r0:r1], w_out[e], out=y_NO[r0:r1])
        ctx.spec = spec
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        ctx.save_for_backward(x_NM, w_in, w_gate, w_out, h_NH, a_NH, s_NH if spec.gated else None, u_NH)
        return y_NO

    @staticmethod
    def backward(ctx, d_y_NO):
        spec = ctx.spec
        x_NM, w_in, w_gate, w_out, h_NH, a_NH, s_NH, u_NH = ctx.saved_tensors
        need_x, _, need_in, need_gate, need_out, need_b_in, need_b_out = ctx.needs_input_grad
        d_y_NO = d_y_NO.contiguous()
        d_x = torch.empty_like(x_NM) if need_x else None
        d_in = torch.empty_like(w_in) if need_in else None
        d_gate = torch.empty_like(w_gate) if need_gate and spec.gated else None
        d_out = torch.empty_like(w_out) if need_out else None
        d_b_in = x_NM.new_empty(w_in.shape[0], h_NH.shape[1]) if need_b_in and ctx.has_b_in else None
        d_b_out = x_NM.new_empty(w_out.shape[0], w_out.shape[2]) if need_b_out and ctx.has_b_out else None
        grads = [g for g in (d_in, d_gate, d_out, d_b_in, d_b_out) if g is not None]
        live = []
        for e, r0, r1 in spec.ranges():
            if r1 > r0:
                live.append((e, r0, r1))
            else:  # an expert no token reached gets zero gradients
                for grad in grads:
                    grad[e].zero_()
        d_a_NH = x_NM.new_empty(h_NH.shape)
        for e, r0, r1 in live:
            dy_e = d_y_NO[r0:r1]
            torch.mm(dy_e, w_out[e].t(), out=d_a_NH[r0:r1])
            if d_out is not None:
                torch.mm(a_NH[r0:r1].t(), dy_e, out=d_out[e])
            if d_b_out is not None:
                torch.sum(dy_e, 0, out=d_b_out[e])
        if spec.gated:
            d_u_NH = d_a_NH * s_NH
            d_h_NH = _act_backward(spec.act_kind, spec.act, d_a_NH.mul_(u_NH), h_NH)
        else:
            d_h_NH = _act_backward(spec.act_kind, spec.act, d_a_NH, h_NH)
        for e, r0, r1 in live:
            x_e, d_h = x_NM[r0:r1], d_h_NH[r0:r1]
            if d_b_in is not None:
                torch.sum(d_h, 0, out=d_b_in[e])
            if d_in is not None:
                if spec.in_transposed:
                    torch.mm(d_h.t(), x_e, out=d_in[e])
                else:
                    torch.mm(x_e.t(), d_h, out=d_in[e])
            if spec.gated and d_gate is not None:
                torch.mm(x_e.t(), d_u_NH[r0:r1], out=d_gate[e])
            if d_x is not None:
                torch.mm(d_h, w_in[e] if spec.in_transposed else w_in[e].t(), out=d_x[r0:r1])
                if spec.gated:
                    d_x[r0:r1].addmm_(d_u_NH[r0:r1], w_gate[e].t())
        return d_x, None, d_in, d_gate, d_out, d_b_in, d_b_out


class _ExpertBase(nn.Module):
    """Shared API: fixed-order weights (the seam for all-gathers) and row-range compute."""

    weight_names: tuple[str, ...] = ()

    def local_weights(self) -> tuple[torch.Tensor, ...]:
        """This rank's expert parameters, in ``weight_names`` order (absent biases skipped)."""
        return tuple(getattr(self, n) for n in self.weight_names if getattr(self, n, None) is not None)

    def present_weight_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.weight_names if getattr(self, n, None) is not None)

    def forward(self, x_ENM: torch.Tensor, ctx=None) -> torch.Tensor:
        """Padded call (Tutel's expert interface): [E_local, N, M] -> [E_local, N, O]."""
        E, N, M = x_ENM.shape
        y_RO = self.compute_rows(x_ENM.reshape(E * N, M), (N,) * E)
        return y_RO.view(E, N, -1)


class FFNExperts(_ExpertBase):
    weight_names = ("batched_fc1_w", "batched_fc2_w", "batched_fc1_bias", "batched_fc2_bias")

    def __init__(self, model_dim, num_local, hidden, output_dim, activation_fn, fc1_bias, fc2_bias, sharded_count):
        super().__init__()
        H = hidden // sharded_count
        self.act = activation_fn
        self.act_kind = activation_kind(activation_fn)
        bound1, bound2 = 1 / math.sqrt(model_dim), 1 / math.sqrt(hidden)
        self.batched_fc1_w = nn.Parameter(torch.empty(num_local, H, model_dim).uniform_(-bound1, bound1))
        self.batched_fc2_w = nn.Parameter(torch.empty(num_local, H, output_dim).uniform_(-bound2, bound2))
        out_bias = math.ceil(output_dim / sharded_count)
        self.batched_fc1_bias = nn.Parameter(torch.empty(num_local, H).uniform_(-bound1, bound1)) if fc1_bias else None
        self.batched_fc2_bias = (
            nn.Parameter(torch.empty(num_local, out_bias).uniform_(-bound2, bound2)) if fc2_bias else None
        )
        self.output_dim = output_dim

    def compute_rows(self, x_NM: torch.Tensor, splits, weights=None) -> torch.Tensor:
        """Expert e on rows of its range; ``weights`` overrides (e.g. all-gathered) parameters."""
        names = self.present_weight_names()
        named = dict(zip(names, weights if weights is not None else self.local_weights(), strict=True))
        dt = x_NM.dtype
        w1, w2 = named["batched_fc1_w"].to(dt), named["batched_fc2_w"].to(dt)
        b1, b2 = named.get("batched_fc1_bias"), named.get("batched_fc2_bias")
        spec = RowSpec(tuple(splits), self.act_kind, self.act, gated=False, in_transposed=True)
        return _ExpertRows.apply(
            x_NM, spec, w1, None, w2, None if b1 is None else b1.to(dt), None if b2 is None else b2.to(dt)
        )


class LlamaFFNExperts(_ExpertBase):
    weight_names = ("W_fc1", "W_fc2", "W_fc3")

    def __init__(self, model_dim, num_local, hidden, activation_fn, sharded_count):
        super().__init__()
        self.model_dim, self.num_local, self.hidden = model_dim, num_local, hidden
        self.act = activation_fn
        self.act_kind = activation_kind(activation_fn)
        numel = num_local * model_dim * hidden
        shard = math.ceil(numel / sharded_count)
        self.W_fc1 = nn.Parameter(torch.randn(shard) * 0.01)
        self.W_fc2 = nn.Parameter(torch.randn(shard) * 0.01)
        self.W_fc3 = nn.Parameter(torch.randn(shard) * 0.01)

    def full_views(self, weights):
        """[E, M, H], [E, M, H], [E, H, M] views of full flat weights (trailing padding ignored)."""
        E, M, H = self.num_local, self.model_dim, self.hidden
        numel = E * M * H  # slicing only when padded: a slice's backward zero-fills the whole parameter
        w1, w2, w3 = (w if w.numel() == numel else w[:numel] for w in weights)
        return w1.view(E, M, H), w2.view(E, M, H), w3.view(E, H, M)

    def compute_rows(self, x_NM: torch.Tensor, splits, weights=None) -> torch.Tensor:
        """``weights``: full (unsharded or all-gathered) flat tensors in W_fc1, W_fc2, W_fc3 order."""
        weights = self.local_weights() if weights is None else weights
        w1, w2, w3 = self.full_views(tuple(w.to(x_NM.dtype) for w in weights))
        spec = RowSpec(tuple(splits), self.act_kind, self.act, gated=True, in_transposed=False)
        return _ExpertRows.apply(x_NM, spec, w1, w2, w3, None, None)


EXPERT_KEYS = {
    "type",
    "num_experts_per_device",
    "hidden_size_per_expert",
    "activation_fn",
    "output_dim",
    "has_fc1_bias",
    "has_fc2_bias",
    "module",
}


def build_experts(spec: dict, model_dim: int, num_local: int, sharded_count: int) -> nn.Module:
    kind = spec.get("type")
    if kind == "ffn":
        act = spec.get("activation_fn") or F.gelu
        return FFNExperts(
            model_dim,
            num_local,
            _require(spec, "hidden_size_per_expert"),
            spec.get("output_dim") or model_dim,
            act,
            spec.get("has_fc1_bias", True),
            spec.get("has_fc2_bias", True),
            sharded_count,
        )
    if kind == "llama_ffn":
        act = spec.get("activation_fn") or F.silu
        return LlamaFFNExperts(model_dim, num_local, _require(spec, "hidden_size_per_expert"), act, sharded_count)
    if kind == "custom":
        module_cls = _require(spec, "module")
        extra = {k: v for k, v in spec.items() if k not in ("type", "module", "num_experts_per_device")}
        return module_cls(
            model_dim=model_dim, num_experts_per_device=num_local, sharded_count=sharded_count, **extra
        )
    raise ValueError(f"experts type must be 'ffn', 'llama_ffn' or 'custom', got {kind!r}")


def _require(spec: dict, key: str):
    if key not in spec:
        raise ValueError(f"experts[{key!r}] is required for type {spec.get('type')!r}")
    return spec[key]
