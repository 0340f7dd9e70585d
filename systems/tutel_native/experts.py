"""Expert networks (sections 1, 5, 7): ``ffn``, ``llama_ffn`` (SwiGLU) and ``custom``.

The built-in experts run on *row ranges*: expert e owns rows [start_e, start_e + n_e)
of a [N, M] buffer. At world size 1 those are only the live rows (padding slots cost
no GEMM time); for a padded [E, C, M] buffer every range has C rows. Two kernels
(expert_ops.KERNELS): "onednn" (per_expert.py; expert by expert with oneDNN's matmul,
the default on CPU fp32) and "mm", this module's one autograd Function for any device
and dtype. In the "mm" kernel consecutive experts with equal ranges run
as one ``torch.bmm(out=...)`` per GEMM, a lone range as one ``torch.mm(out=...)``
(with more than one intra-op thread a batched call parallelises over experts and
synchronises once; see reports/tutel_native_efficiency.md), and weight gradients
are written straight into one preallocated gradient per parameter: indexing a parameter per expert under
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

import torch
import torch.nn.functional as F
from torch import nn

from systems.tutel_native import grouped, per_expert
from systems.tutel_native.expert_ops import KERNELS, RowSpec, act_backward, act_forward, activation_kind


class _Groups:
    """The experts' row ranges as runs: consecutive experts with equal non-empty ranges (a
    padded or grouped buffer) run as one batched call per GEMM, a lone range as one mm.
    Weights come as [E, K, J] tensors already oriented (transposes are views)."""

    def __init__(self, spec: RowSpec):
        self.spec = spec
        runs: list[list[int]] = []  # [first expert, experts, first row, rows per expert]
        for e, r0, r1 in spec.ranges():
            n = r1 - r0
            if n and runs and runs[-1][3] == n and runs[-1][0] + runs[-1][1] == e:
                runs[-1][1] += 1
            elif n:
                runs.append([e, 1, r0, n])
        self.runs = [tuple(r) for r in runs]
        self.empty = [e for e, r0, r1 in spec.ranges() if r1 == r0]

    @staticmethod
    def _3d(t_N: torch.Tensor, g: int, r0: int, n: int) -> torch.Tensor:
        return t_N[r0 : r0 + g * n].view(g, n, t_N.shape[1])

    def mm(self, a_N, b_E, out_N, bias_E=None, accumulate=False) -> None:
        """out[rows e] = a[rows e] @ b[e] (+ bias[e]), or += when ``accumulate``."""
        for e, g, r0, n in self.runs:
            if g > 1:
                a3, o3, b3 = self._3d(a_N, g, r0, n), self._3d(out_N, g, r0, n), b_E[e : e + g]
                if accumulate:
                    o3.baddbmm_(a3, b3)
                elif bias_E is not None:
                    torch.baddbmm(bias_E[e : e + g].unsqueeze(1), a3, b3, out=o3)
                else:
                    torch.bmm(a3, b3, out=o3)
                continue
            r1 = r0 + n
            if accumulate:
                out_N[r0:r1].addmm_(a_N[r0:r1], b_E[e])
            elif bias_E is not None:
                torch.addmm(bias_E[e], a_N[r0:r1], b_E[e], out=out_N[r0:r1])
            else:
                torch.mm(a_N[r0:r1], b_E[e], out=out_N[r0:r1])

    def mm_tn(self, a_N, b_N, out_E) -> None:
        """out[e] = a[rows e].T @ b[rows e] (a weight gradient); zero for experts with no rows."""
        for e, g, r0, n in self.runs:
            if g > 1:
                torch.bmm(self._3d(a_N, g, r0, n).transpose(1, 2), self._3d(b_N, g, r0, n), out=out_E[e : e + g])
            else:
                torch.mm(a_N[r0 : r0 + n].t(), b_N[r0 : r0 + n], out=out_E[e])
        for e in self.empty:
            out_E[e].zero_()

    def row_sum(self, a_N, out_E) -> None:
        """out[e] = sum of a over rows e (a bias gradient)."""
        for e, g, r0, n in self.runs:
            if g > 1:
                torch.sum(self._3d(a_N, g, r0, n), 1, out=out_E[e : e + g])
            else:
                torch.sum(a_N[r0 : r0 + n], 0, out=out_E[e])
        for e in self.empty:
            out_E[e].zero_()


class _ExpertRows(torch.autograd.Function):
    """Expert GEMMs on row ranges; each elementwise step runs once over all rows
    (fewer, larger parallel regions: cheaper, and far less sensitive to a busy machine)."""

    @staticmethod
    def forward(ctx, x_NM, spec: RowSpec, w_in, w_gate, w_out, b_in, b_out):
        N, H, O = x_NM.shape[0], w_in.shape[1] if spec.in_transposed else w_in.shape[2], w_out.shape[2]
        if sum(spec.splits) != N:
            raise ValueError(f"expert row splits {spec.splits} do not cover the {N} rows")
        groups = _Groups(spec)
        w_in_EMH = w_in.transpose(1, 2) if spec.in_transposed else w_in
        h_NH = x_NM.new_empty(N, H)  # pre-activation
        groups.mm(x_NM, w_in_EMH, h_NH, bias_E=b_in)
        u_NH = None
        if spec.gated:  # gate branch x @ W_gate
            u_NH = x_NM.new_empty(N, H)
            groups.mm(x_NM, w_gate, u_NH)
        s_NH = x_NM.new_empty(N, H)  # act(h)
        act_forward(spec.act_kind, spec.act, h_NH, s_NH)
        a_NH = s_NH * u_NH if spec.gated else s_NH  # input of the output projection
        y_NO = x_NM.new_empty(N, O)
        groups.mm(a_NH, w_out, y_NO, bias_E=b_out)
        ctx.spec = spec
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        ctx.save_for_backward(x_NM, w_in, w_gate, w_out, h_NH, a_NH, s_NH if spec.gated else None, u_NH)
        return y_NO

    @staticmethod
    def backward(ctx, d_y_NO):
        spec = ctx.spec
        groups = _Groups(spec)
        x_NM, w_in, w_gate, w_out, h_NH, a_NH, s_NH, u_NH = ctx.saved_tensors
        need_x, _, need_in, need_gate, need_out, need_b_in, need_b_out = ctx.needs_input_grad
        d_y_NO = d_y_NO.contiguous()
        d_a_NH = x_NM.new_empty(h_NH.shape)
        groups.mm(d_y_NO, w_out.transpose(1, 2), d_a_NH)
        d_out = d_b_out = d_in = d_gate = d_b_in = d_x = None
        if need_out:
            d_out = torch.empty_like(w_out)
            groups.mm_tn(a_NH, d_y_NO, d_out)
        if need_b_out and ctx.has_b_out:
            d_b_out = x_NM.new_empty(w_out.shape[0], w_out.shape[2])
            groups.row_sum(d_y_NO, d_b_out)
        d_u_NH = None
        if spec.gated:
            d_u_NH = d_a_NH * s_NH
            d_h_NH = act_backward(spec.act_kind, spec.act, d_a_NH.mul_(u_NH), h_NH)
        else:
            d_h_NH = act_backward(spec.act_kind, spec.act, d_a_NH, h_NH)
        if need_b_in and ctx.has_b_in:
            d_b_in = x_NM.new_empty(w_in.shape[0], h_NH.shape[1])
            groups.row_sum(d_h_NH, d_b_in)
        if need_in:
            d_in = torch.empty_like(w_in)
            if spec.in_transposed:
                groups.mm_tn(d_h_NH, x_NM, d_in)
            else:
                groups.mm_tn(x_NM, d_h_NH, d_in)
        if need_gate and spec.gated:
            d_gate = torch.empty_like(w_gate)
            groups.mm_tn(x_NM, d_u_NH, d_gate)
        if need_x:
            d_x = torch.empty_like(x_NM)
            groups.mm(d_h_NH, w_in if spec.in_transposed else w_in.transpose(1, 2), d_x)
            if spec.gated:
                groups.mm(d_u_NH, w_gate.transpose(1, 2), d_x, accumulate=True)
        return d_x, None, d_in, d_gate, d_out, d_b_in, d_b_out


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """"auto" -> "onednn" where oneDNN's fp32 matmul is usable for ``x``, else "mm" (the rule when a
    layout is fixed; with both kernel and layout "auto" the layer asks kernel_choice.py instead)."""
    if kernel not in KERNELS:
        raise ValueError(f"expert kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    available = per_expert.kernel_available(x.device.type, x.dtype)
    if kernel == "auto":
        return "onednn" if available else "mm"
    if kernel == "onednn" and not available:
        raise ValueError(f"expert kernel 'onednn' needs a CPU fp32 input and torch built with oneDNN "
                         f"(got {x.device.type} {x.dtype})")
    if kernel == "grouped" and not grouped.kernel_available(x.device.type, x.dtype):
        raise ValueError(f"expert kernel 'grouped' needs torch._grouped_mm for {x.device.type} {x.dtype}")
    return kernel


FUNCTIONS = {"onednn": per_expert.PerExpertRows, "grouped": grouped.GroupedRows}


def expert_rows(x_NM, spec: RowSpec, w_in, w_gate, w_out, b_in, b_out) -> torch.Tensor:
    """The built-in experts on ``spec``'s row ranges, with its kernel (resolved for ``x_NM`` here)."""
    function = FUNCTIONS.get(resolve_kernel(spec.kernel, x_NM), _ExpertRows)
    return function.apply(x_NM, spec, w_in, w_gate, w_out, b_in, b_out)


class _ExpertBase(nn.Module):
    """Shared API: fixed-order weights (the seam for all-gathers) and row-range compute."""

    weight_names: tuple[str, ...] = ()

    def local_weights(self) -> tuple[torch.Tensor, ...]:
        """This rank's expert parameters, in ``weight_names`` order (absent biases skipped)."""
        return tuple(getattr(self, n) for n in self.weight_names if getattr(self, n, None) is not None)

    def present_weight_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.weight_names if getattr(self, n, None) is not None)

    def row_widths(self) -> tuple[int, int, int]:
        """(M, H, O): the widths of the rows the GEMMs read and write (what grouped_mm aligns)."""
        raise NotImplementedError

    def has_bias(self) -> bool:
        return False

    def synthetic_weights(self, num_experts: int, dtype, gen) -> tuple:
        """(w_in, w_gate, w_out, b_in, b_out) for ``num_experts`` experts in this class's layouts, random:
        what kernel_choice.py times the kernels on."""
        raise NotImplementedError

    def forward(self, x_ENM: torch.Tensor, ctx=None) -> torch.Tensor:
        """Padded call (Tutel's expert interface): [E_local, N, M] -> [E_local, N, O]."""
        E, N, M = x_ENM.shape
        y_RO = self.compute_rows(x_ENM.reshape(E * N, M), (N,) * E, kernel=getattr(ctx, "expert_kernel", "auto"))
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
        self.num_local = num_local

    def row_widths(self) -> tuple[int, int, int]:
        return self.batched_fc1_w.shape[2], self.batched_fc1_w.shape[1], self.batched_fc2_w.shape[2]

    def has_bias(self) -> bool:
        return self.batched_fc1_bias is not None or self.batched_fc2_bias is not None

    def row_spec(self, splits, kernel: str) -> RowSpec:
        return RowSpec(tuple(splits), self.act_kind, self.act, gated=False, in_transposed=True, kernel=kernel)

    def synthetic_weights(self, num_experts: int, dtype, gen) -> tuple:
        M, H, O = self.row_widths()

        def draw(*shape):
            return torch.randn(*shape, generator=gen, dtype=dtype) * 0.02

        return (draw(num_experts, H, M), None, draw(num_experts, H, O),
                draw(num_experts, H) if self.batched_fc1_bias is not None else None,
                draw(num_experts, O) if self.batched_fc2_bias is not None else None)

    def compute_rows(self, x_NM: torch.Tensor, splits, weights=None, kernel: str = "auto") -> torch.Tensor:
        """Expert e on rows of its range; ``weights`` overrides (e.g. all-gathered) parameters."""
        names = self.present_weight_names()
        named = dict(zip(names, weights if weights is not None else self.local_weights(), strict=True))
        dt = x_NM.dtype
        w1, w2 = named["batched_fc1_w"].to(dt), named["batched_fc2_w"].to(dt)
        b1, b2 = named.get("batched_fc1_bias"), named.get("batched_fc2_bias")
        return expert_rows(
            x_NM, self.row_spec(splits, kernel), w1, None, w2,
            None if b1 is None else b1.to(dt), None if b2 is None else b2.to(dt)
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

    def row_widths(self) -> tuple[int, int, int]:
        return self.model_dim, self.hidden, self.model_dim

    def row_spec(self, splits, kernel: str) -> RowSpec:
        return RowSpec(tuple(splits), self.act_kind, self.act, gated=True, in_transposed=False, kernel=kernel)

    def synthetic_weights(self, num_experts: int, dtype, gen) -> tuple:
        E, M, H = num_experts, self.model_dim, self.hidden

        def draw(*shape):
            return torch.randn(*shape, generator=gen, dtype=dtype) * 0.02

        return draw(E, M, H), draw(E, M, H), draw(E, H, M), None, None

    def compute_rows(self, x_NM: torch.Tensor, splits, weights=None, kernel: str = "auto") -> torch.Tensor:
        """``weights``: full (unsharded or all-gathered) flat tensors in W_fc1, W_fc2, W_fc3 order."""
        weights = self.local_weights() if weights is None else weights
        w1, w2, w3 = self.full_views(tuple(w.to(x_NM.dtype) for w in weights))
        return expert_rows(x_NM, self.row_spec(splits, kernel), w1, w2, w3, None, None)


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
