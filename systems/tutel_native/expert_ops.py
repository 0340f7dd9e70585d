"""What both expert kernels share: the row-split spec and activations with closed-form derivatives.

Kernels (see experts.py, per_expert.py and grouped.py):
  "mm"      torch mm/bmm on row ranges of one [N, M] buffer, any device and dtype;
  "onednn"  expert by expert with oneDNN's matmul (CPU, fp32);
  "grouped" one torch._grouped_mm per projection over every expert's live rows (fp32, bf16);
  "auto"    with layout "auto" too, the measured cost model of kernel_choice.py picks kernel and
            layout each step; with a fixed layout, "onednn" where available, else "mm".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("auto", "mm", "onednn", "grouped")


def activation_kind(act) -> str:
    """Name of an activation with a known closed-form derivative, else 'generic'."""
    if act is F.silu or isinstance(act, nn.SiLU):
        return "silu"
    if act is F.relu or act is torch.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return "generic"


def act_forward(kind: str, act, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(h), into ``out`` when given."""
    out = torch.empty_like(h) if out is None else out
    if kind == "silu":
        torch.ops.aten.silu.out(h, out=out)
    elif kind == "gelu":
        torch.ops.aten.gelu.out(h, out=out)
    elif kind == "relu":
        torch.clamp_min(h, 0, out=out)
    else:
        out.copy_(act(h))
    return out


def act_backward(kind: str, act, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
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
    kernel: str = "auto"  # KERNELS; experts.expert_rows resolves "auto" for the input

    def ranges(self):
        start = 0
        for e, n in enumerate(self.splits):
            yield e, start, start + n
            start += n
