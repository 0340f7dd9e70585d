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

    score_bias_E [E]  router only: aux-loss-free selection bias (no gradient)
    shared_w1_SM, shared_w2_SM, shared_w3_SM  [S, M]  the dense shared expert
                      (S its hidden width), applied to every token like an expert

Routers (LayerShape's routing fields; ``docs/routers.md``): scores are
softmax or sigmoid of the gate logits; the top-k choice is taken on the
scores plus ``score_bias_E`` (when declared), optionally inside the best
``topk_groups`` of ``n_groups`` expert groups; gate values are the unbiased
scores of the chosen experts, renormalised to sum to 1 when ``renormalize``
and k > 1, then multiplied by ``route_scale``.

Legend: T tokens, M model dim, H expert hidden, E experts, S shared-expert hidden.
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
SCORES = ("softmax", "sigmoid")
# The routing fields of LayerShape and their values for Tutel's router (softmax, top-k, renormalised
# when k > 1), the one every system in moebench can express ("the common softmax router").
COMMON_ROUTER = {"score": "softmax", "renormalize": True, "score_bias": False, "n_groups": 1,
                 "topk_groups": 1, "route_scale": 1.0}
# The aux-loss-free bias update between training steps: bias += rate * sign(mean load - load), centred.
# DeepSeek-V3's gamma (arXiv 2412.19437, sec. 4.2) and torchtitan's default load_balance_coeff.
BIAS_UPDATE_RATE = 1e-3


@dataclass(frozen=True)
class LayerShape:
    """The shape of one MoE FFN layer, independent of any system."""

    model_dim: int
    ffn_dim: int  # H, hidden size of one expert
    num_experts: int
    top_k: int
    activation: str = "gelu"  # "gelu" | "relu" | "swiglu"
    expert_bias: bool = False  # fc1/fc2 biases (not allowed with swiglu)
    # The router (module docstring; defaults are COMMON_ROUTER).
    score: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True  # divide the k gate values by their sum (when k > 1)
    score_bias: bool = False  # aux-loss-free bias added to the scores for selection only
    n_groups: int = 1  # expert groups for group-limited selection (1: none)
    topk_groups: int = 1  # groups a token may choose from
    route_scale: float = 1.0  # gate values multiplied by this
    shared_ffn_dim: int = 0  # hidden width of the dense shared expert (0: none)

    @property
    def gemms_per_expert(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    @property
    def router(self) -> dict:
        """The routing fields, e.g. for support checks and reports."""
        return {name: getattr(self, name) for name in COMMON_ROUTER}

    @property
    def has_common_router(self) -> bool:
        return self.router == COMMON_ROUTER

    @property
    def has_softmax_router(self) -> bool:
        """Softmax top-k, renormalised or not: the common router up to renormalisation."""
        return {**self.router, "renormalize": True} == COMMON_ROUTER

    def router_label(self) -> str:
        """A short name of the router: "softmax", "softmax/no-renorm", "sigmoid+bias/g8:4/x2.5"."""
        label = self.score + ("+bias" if self.score_bias else "")
        if not self.renormalize:
            label += "/no-renorm"
        if self.n_groups > 1:
            label += f"/g{self.n_groups}:{self.topk_groups}"
        if self.route_scale != 1.0:
            label += f"/x{self.route_scale:g}"
        return label

    def with_common_router(self) -> LayerShape:
        return dataclasses.replace(self, **COMMON_ROUTER)

    def non_default_fields(self) -> dict:
        """Every field, leaving out the router and shared-expert fields at their defaults, so a
        workload that declares none of them keeps the identity (hash) it had before they existed."""
        out = dataclasses.asdict(self)
        for name, default in {**COMMON_ROUTER, "shared_ffn_dim": 0}.items():
            if out[name] == default:
                del out[name]
        return out

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
        self._validate_router()

    def _validate_router(self) -> None:
        if self.score not in SCORES:
            raise InputError(unknown_name_message("score", self.score, SCORES), "score")
        for name in ("renormalize", "score_bias"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        require_positive_ints(self, ("n_groups", "topk_groups"))
        if self.num_experts % self.n_groups:
            raise InputError(f"num_experts {self.num_experts} is not divisible by n_groups {self.n_groups}",
                             "n_groups")
        if self.topk_groups > self.n_groups:
            raise InputError(f"topk_groups ({self.topk_groups}) is larger than n_groups ({self.n_groups})",
                             "topk_groups")
        if self.topk_groups * (self.num_experts // self.n_groups) < self.top_k:
            raise InputError(f"top_k {self.top_k} experts do not fit in {self.topk_groups} of {self.n_groups} "
                             f"groups of {self.num_experts // self.n_groups} experts", "topk_groups")
        if not is_finite_positive(self.route_scale):
            raise InputError(f"route_scale must be a finite positive number, got {self.route_scale!r}",
                             "route_scale")
        if isinstance(self.shared_ffn_dim, bool) or not isinstance(self.shared_ffn_dim, int) \
                or self.shared_ffn_dim < 0:
            raise InputError(f"shared_ffn_dim must be a non-negative integer, got {self.shared_ffn_dim!r}",
                             "shared_ffn_dim")


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
    score_bias_E: torch.Tensor | None = None
    shared_w1_SM: torch.Tensor | None = None
    shared_w2_SM: torch.Tensor | None = None
    shared_w3_SM: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_EM.shape[0]

    def expert_slice(self, first: int, count: int) -> CanonicalWeights:
        """The weights of experts [first, first+count) with the full gate (and router bias and shared expert)."""

        def cut(t):
            return None if t is None else t[first : first + count]

        return CanonicalWeights(
            gate_EM=self.gate_EM,
            w1_EHM=cut(self.w1_EHM),
            w2_EHM=cut(self.w2_EHM),
            w3_EHM=cut(self.w3_EHM),
            b1_EH=cut(self.b1_EH),
            b2_EM=cut(self.b2_EM),
            score_bias_E=self.score_bias_E,
            shared_w1_SM=self.shared_w1_SM,
            shared_w2_SM=self.shared_w2_SM,
            shared_w3_SM=self.shared_w3_SM,
        )

    def routed_only(self) -> CanonicalWeights:
        """These weights without the shared expert (what a layer that leaves it to the harness loads)."""
        return dataclasses.replace(self, shared_w1_SM=None, shared_w2_SM=None, shared_w3_SM=None)

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
        weights = cls(
            gate_EM=normal(E, M, fan_in=M),
            w1_EHM=normal(E, H, M, fan_in=M),
            w2_EHM=normal(E, H, M, fan_in=H),
            w3_EHM=normal(E, H, M, fan_in=M) if swiglu else None,
            b1_EH=normal(E, H, fan_in=H) if shape.expert_bias else None,
            b2_EM=normal(E, M, fan_in=M) if shape.expert_bias else None,
        )
        # Drawn after the routed weights, so a layer without them keeps the weights it always had.
        if shape.score_bias:  # small against the scores' spread, as a trained bias is, yet changing choices
            weights.score_bias_E = (torch.randn(E, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
        S = shape.shared_ffn_dim
        if S:
            weights.shared_w1_SM = normal(S, M, fan_in=M)
            weights.shared_w2_SM = normal(S, M, fan_in=S)
            weights.shared_w3_SM = normal(S, M, fan_in=M) if swiglu else None
        return weights
