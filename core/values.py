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
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from core.errors import InputError
from core.names import unknown_name_message

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
SEED_RANGE = range(-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise InputError(unknown_name_message("dtype", name, DTYPES), "dtype") from None


def require_positive_ints(owner: object, names: tuple[str, ...]) -> None:
    """InputError naming the first of `names` that is not a positive integer (a bool is not one)."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value!r}", name)


def is_finite_positive(value: object) -> bool:
    """A number above zero that a float holds: not NaN, not infinite, not 10**400 (nor a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int beyond any float
        return False


ACTIVATIONS = ("gelu", "relu", "swiglu")


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
        require_positive_ints(self, ("model_dim", "ffn_dim", "num_experts", "top_k"))
        if self.top_k > self.num_experts:
            raise InputError(f"top_k ({self.top_k}) is larger than num_experts ({self.num_experts})", "top_k")
        if self.activation not in ACTIVATIONS:
            raise InputError(unknown_name_message("activation", self.activation, ACTIVATIONS), "activation")
        if not isinstance(self.expert_bias, bool):
            raise InputError(f"expert_bias must be true or false, got {self.expert_bias!r}", "expert_bias")
        if self.activation == "swiglu" and self.expert_bias:
            raise InputError("expert_bias is not supported with swiglu experts", "expert_bias")


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
        if self.capacity_factor is not None and not is_finite_positive(self.capacity_factor):
            raise InputError(f"capacity_factor must be a finite positive number or None (dropless), "
                             f"got {self.capacity_factor!r}", "capacity_factor")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed not in SEED_RANGE:
            raise InputError(f"seed must be an integer in -2**63..2**64-1, got {self.seed!r}", "seed")

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
        require_positive_ints(self, ("world_size", "ep", "tp", "nnodes"))
        if self.threads_per_rank is not None:
            require_positive_ints(self, ("threads_per_rank",))
        if self.world_size % (self.ep * self.tp):
            raise InputError(f"world size {self.world_size} is not divisible by ep*tp = {self.ep * self.tp}", "ep")
        if self.world_size % self.nnodes:
            raise InputError(f"world size {self.world_size} is not divisible by nnodes {self.nnodes}", "nnodes")
        if num_experts is not None and num_experts % self.ep and self.ep % num_experts:
            # ep > E with ep % E == 0 is sharded experts (Tutel); systems without them say so.
            raise InputError(f"num_experts {num_experts} and ep {self.ep}: neither divides the other", "ep")


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
