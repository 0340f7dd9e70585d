"""The value types every layer of moebench shares: shapes, knobs, parallel layout, weights.

One small module that imports nothing of ours, so ``workloads`` (data),
``systems`` (adapters) and ``harness`` (the runner) can all use the same types
without depending on each other.

Canonical weight layout (one layout for all systems, so every system runs on
identical parameters; E experts, M model dim, H expert hidden dim)::

    gate_EM  [E, M]   logits = x_TM @ gate_EM.T
    w1_EHM   [E, H, M] first projection:  h = x @ w1[e].T
    w2_EHM   [E, H, M] output projection: y = h @ w2[e]
    w3_EHM   [E, H, M] SwiGLU only, the "up" projection: u = x @ w3[e].T
    b1_EH    [E, H]   optional fc1 bias (GELU experts only)
    b2_EM    [E, M]   optional fc2 bias (GELU experts only)

GELU expert:   y = act(x w1^T + b1) w2 + b2
SwiGLU expert: y = (silu(x w1^T) * (x w3^T)) w2     (Mixtral's w1/w3/w2)

Legend: T tokens, M model dim, H expert hidden, E experts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class LayerShape:
    """The shape of one MoE FFN layer, independent of any system."""

    model_dim: int
    ffn_dim: int  # H, hidden size of one expert
    num_experts: int
    top_k: int
    activation: str = "gelu"  # "gelu" | "relu" | "swiglu"
    expert_bias: bool = False  # fc1/fc2 biases (not allowed with swiglu)

    @property
    def gemms_per_expert(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    def validate(self) -> None:
        for name in ("model_dim", "ffn_dim", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) is larger than num_experts ({self.num_experts})")
        if self.activation not in ("gelu", "relu", "swiglu"):
            raise ValueError(f"activation must be gelu, relu or swiglu, got {self.activation!r}")
        if self.activation == "swiglu" and self.expert_bias:
            raise ValueError("expert_bias is not supported with swiglu experts")


@dataclass(frozen=True)
class MoEKnobs:
    """Per-trial MoE settings. ``capacity_factor=None`` means dropless."""

    capacity_factor: float | None = 1.25
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    # System-specific options (e.g. tutel_native's overlap degree); each
    # system rejects the ones it does not understand in check_support().
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        torch_dtype(self.dtype)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"capacity_factor must be positive or None (dropless), got {self.capacity_factor!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class ParallelSpec:
    """How a trial is spread over processes (torchrun's vocabulary).

    world_size = nnodes * nproc_per_node; ep experts-parallel ranks per group;
    dp = world_size // (ep * tp) data-parallel replicas of each expert.
    """

    world_size: int = 1
    ep: int = 1
    tp: int = 1
    nnodes: int = 1
    threads_per_rank: int | None = None

    @property
    def dp(self) -> int:
        return self.world_size // (self.ep * self.tp)

    def validate(self, num_experts: int | None = None) -> None:
        for name in ("world_size", "ep", "tp", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.world_size % (self.ep * self.tp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by ep*tp = {self.ep * self.tp}"
            )
        if self.world_size % self.nnodes:
            raise ValueError(f"world size {self.world_size} is not divisible by nnodes {self.nnodes}")
        if num_experts is not None and num_experts % self.ep and self.ep % num_experts:
            # ep > E with ep % E == 0 is sharded experts (Tutel); systems without them say so.
            raise ValueError(f"num_experts {num_experts} and ep {self.ep}: neither divides the other")


@dataclass
class CanonicalWeights:
    """All E experts' parameters in the one documented layout (module docstring)."""

    gate_EM: torch.Tensor
    w1_EHM: torch.Tensor
    w2_EHM: torch.Tensor
    w3_EHM: torch.Tensor | None = None
    b1_EH: torch.Tensor | None = None
    b2_EM: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_EM.shape[0]

    def expert_slice(self, first: int, count: int) -> CanonicalWeights:
        """The weights of experts [first, first+count) with the full gate."""

        def cut(t):
            return None if t is None else t[first : first + count]

        return CanonicalWeights(
            gate_EM=self.gate_EM,
            w1_EHM=cut(self.w1_EHM),
            w2_EHM=cut(self.w2_EHM),
            w3_EHM=cut(self.w3_EHM),
            b1_EH=cut(self.b1_EH),
            b2_EM=cut(self.b2_EM),
        )

    def to(self, dtype: torch.dtype | None = None, device: str | None = None) -> CanonicalWeights:
        def conv(t):
            return None if t is None else t.to(dtype=dtype, device=device)

        return CanonicalWeights(**{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def random(cls, shape: LayerShape, seed: int, dtype: torch.dtype = torch.float32) -> CanonicalWeights:
        """Seeded weights with fan-in scaled normal init; identical on every call."""
        gen = torch.Generator().manual_seed(seed)
        E, H, M = shape.num_experts, shape.ffn_dim, shape.model_dim

        def normal(*size, fan_in):
            return (torch.randn(*size, generator=gen, dtype=torch.float64) / fan_in**0.5).to(dtype)

        swiglu = shape.activation == "swiglu"
        return cls(
            gate_EM=normal(E, M, fan_in=M),
            w1_EHM=normal(E, H, M, fan_in=M),
            w2_EHM=normal(E, H, M, fan_in=H),
            w3_EHM=normal(E, H, M, fan_in=M) if swiglu else None,
            b1_EH=normal(E, H, fan_in=H) if shape.expert_bias else None,
            b2_EM=normal(E, M, fan_in=M) if shape.expert_bias else None,
        )
