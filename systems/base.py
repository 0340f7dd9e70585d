"""The adapter interface every MoE system implements.

The harness never special-cases a system: it asks a :class:`MoESystem` whether
it can run here, builds a :class:`MoELayerAdapter` from a workload's layer
shape, the MoE knobs and the parallel spec, loads **canonical weights** into
it, and then drives it through ``forward(x_TM) -> MoEOutput``.

The canonical weight layout and the other shared value types live in
``core/values.py``. This module adds what an adapter promises: its output,
its routing statistics, and how the equivalence check must route the
reference to compute what the system computes (:class:`ReferencePolicy`).

Tensor-name suffixes across the project: T tokens, M model dim, H expert
hidden, E experts, C capacity slots, K top-k choices.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec

# Relative tolerances of the equivalence check, on max|a-b| / max|b|.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 3e-2}
DROP_ORDERS = ("position", "prob", "gate", "given")
ROUTER_PRECISIONS = ("input", "float32_scores", "float32_logits")
AUX_LOSS_UNSTATED = "the adapter does not say which aux loss it returns"  # MoELayerAdapter.aux_loss_mismatch's default


@dataclass(frozen=True)
class ReferencePolicy:
    """How the reference must route to compute what a peer computes.

    capacity: slots per expert the peer used (None: the reference's own rule,
      or dropless when the knobs say so).
    drop_order: which choices an expert keeps when over capacity:
      "position" Tutel's slot order; "prob" the C highest softmax
      probabilities; "gate" the C highest (normalised) gate values;
      "given" the peer's own kept set `keep_TK` (when its rule is
      implementation-defined, e.g. DeepSpeed's top-1 picks among equal
      candidates by torch.topk's unspecified tie order); the check then only
      verifies that each expert kept min(load, capacity) choices.
    renormalize_after_drop: gate values divided by the sum over *kept* choices.
    dropless: the system drops nothing whatever the capacity factor (a layer with no capacity
      rule); the reference then runs dropless too, and `note` should say so.
    router_precision: how the system computes its router when the input is narrower than fp32
      (bf16, fp16): "input" logits and scores in the input dtype; "float32_scores" logits in the
      input dtype, scores and the top-k choice in fp32 (transformers, Megatron); "float32_logits"
      logits from fp32 copies of tokens and gate, scores in fp32 (DeepSpeed). In bf16 many
      experts' scores tie at bf16's resolution, so the choice depends on it; the reference routes
      the same way, and gate values go back to the input dtype.

    A peer that computes in lower precision than its input declares that with
    :meth:`MoELayerAdapter.internal_precision`, not here.
    """

    capacity: int | None = None
    drop_order: str = "position"
    keep_TK: torch.Tensor | None = None
    renormalize_after_drop: bool = False
    note: str = ""
    dropless: bool = False
    router_precision: str = "input"


@dataclass(frozen=True)
class InternalPrecision:
    """A precision a system computes part of the layer in, lower than its input's (e.g. an fp32 gate
    for fp64 tokens): the equivalence check then applies that precision's tolerance and says why."""

    dtype: str  # a key of TOLERANCE
    reason: str


class GradientsNotComparable(ValueError):
    """Raised by canonical_gradients() when this rank's gradients have no canonical form (e.g.
    sharded experts); the check records the reason instead of failing."""


@dataclass
class RoutingStats:
    """What the router did in the last step (this rank's tokens)."""

    tokens_per_expert: list[int]  # choices routed to each global expert, before dropping
    dropped: int  # choices dropped for lack of capacity
    capacity: int | None  # slots per expert; None when dropless without padding
    l_aux: float | None
    # Rows the expert GEMMs actually processed (capacity-padded systems
    # compute E*C rows; dropless ones compute the kept choices).
    expert_rows_computed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Availability:
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


@dataclass
class MoEOutput:
    y_TM: torch.Tensor
    l_aux: torch.Tensor | None


def grad_of(param: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy of `param`'s gradient (zeros when backward gave it none); None for no parameter."""
    if param is None:
        return None
    return torch.zeros_like(param.detach()) if param.grad is None else param.grad.detach().clone()


class MoELayerAdapter(nn.Module, ABC):
    """One system's MoE layer behind a uniform call: ``forward(x_TM) -> MoEOutput``.

    ``x_TM`` is this rank's tokens, flattened to [T, M]. Every parameter of the
    layer is owned by the wrapped module so optimizers see it.
    """

    def canonical_parameters(self) -> dict[str, nn.Parameter | None] | None:
        """The parameters that hold a canonical tensor as is (same shape and layout; this rank's
        local_experts() slice), by canonical name (core/values.py), None for one the layer does not
        have. An adapter that gives them gets load_canonical() and canonical_gradients() from this
        class; the default (None) means it defines both itself, as every built-in adapter does."""
        return None

    def load_canonical(self, weights: CanonicalWeights) -> None:
        """Copy in the global canonical weights; the adapter picks its local experts.
        Default: copy each of canonical_parameters() from its local_experts() slice."""
        params = self.canonical_parameters()
        if params is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither load_canonical nor canonical_parameters")
        local = weights.expert_slice(*self.local_experts())
        with torch.no_grad():
            for name, param in params.items():
                if param is not None:
                    param.copy_(getattr(local, name))

    @abstractmethod
    def forward(self, x_TM: torch.Tensor) -> MoEOutput: ...

    @abstractmethod
    def routing_stats(self) -> RoutingStats: ...

    def local_experts(self) -> tuple[int, int]:
        """(first global expert, count) whose whole weights live on this rank: the slice
        canonical_gradients() covers. Default: all experts (a single-process layer)."""
        return 0, self.canonical_num_experts()

    def canonical_num_experts(self) -> int:
        return self.shape.num_experts  # every adapter in systems/ keeps its LayerShape as .shape

    def canonical_gradients(self) -> CanonicalWeights:
        """This rank's gradients after a backward, in canonical layout (core/values.py): the full
        gate gradient (from this rank's tokens only: no system reduces it inside backward) and the
        local experts' slice (local_experts(); from every token routed to them, whichever rank it
        came from). The inverse of load_canonical's mapping, applied to ``.grad``; a parameter
        without a gradient gives zeros. Raise GradientsNotComparable when there is no canonical form.
        Default: the gradients of canonical_parameters(), when the adapter gives them."""
        params = self.canonical_parameters()
        if params is None:
            raise NotImplementedError(f"{type(self).__name__} does not map its gradients to canonical layout")
        return CanonicalWeights(**{name: grad_of(param) for name, param in params.items()})

    # Why this system computes part of the layer in fp32 when its input is fp64 ("" when it does not):
    # the peers route or dispatch in fp32 whatever the input dtype.
    fp64_computed_in_fp32: ClassVar[str] = ""

    def internal_precision(self, dtype: str) -> InternalPrecision | None:
        """The lower precision this system computes in for `dtype` input, and why; None: it computes
        in the input's precision. The check's tolerance is then that precision's (one mechanism for
        every such system; most declare it through fp64_computed_in_fp32)."""
        if dtype == "float64" and self.fp64_computed_in_fp32:
            return InternalPrecision("float32", self.fp64_computed_in_fp32)
        return None

    def aux_loss_mismatch(self) -> str:
        """Why the returned l_aux is not the reference's GShard loss (E * sum_e mean_t P[t,e] *
        share of first choices on e, this rank's tokens), or "" when it is and can be compared.
        A layer that returns l_aux=None need not say anything: the check notes that it returns none."""
        return AUX_LOSS_UNSTATED

    def prepare(self, num_tokens: int) -> None:
        """Called once by the harness after the weights are loaded and before the first step it checks,
        counts or times, with the tokens per step this layer will get: where a system measures or tunes
        what it needs (tutel_native's kernel cost model), so that no measured step pays for it.
        Default: nothing."""

    def before_optimizer_step(self) -> None:
        """The work a training step does on this layer outside its module, just before the optimizer
        step (the harness calls it in train mode, inside the timed step): e.g. the aux-loss-free bias
        update of DeepSeek-V3-style routers, which torchtitan runs in an optimizer pre-step hook.
        Default: nothing."""

    def phase_times(self) -> dict[str, float] | None:
        """Seconds per phase of the last step (gate, dispatch, experts, combine, comm), if measured."""
        return None

    def tuning_report(self) -> dict | None:
        """What a run-time tuner tried and chose (settings, timings), so a result says which setting
        its timed steps ran with; None when the system did no tuning."""
        return None

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters holding this rank's experts: sharded over expert-parallel ranks, so
        they are averaged only across data-parallel replicas of the same experts, never
        across the whole world. Default: parameters marked the way Tutel
        (``skip_allreduce = True``) or DeepSpeed/Megatron (``allreduce = False``) mark them."""
        return [
            p for p in self.parameters()
            if getattr(p, "skip_allreduce", False) or getattr(p, "allreduce", True) is False
        ]


class MoESystem(ABC):
    """A MoE implementation the harness can run. Built-ins register in systems/__init__.py; any other
    subclass is a plugin (systems/plugins.py: --system-plugin REF, or a moebench.systems entry point)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # System-specific knobs (MoEKnobs.options) this system understands: name -> meaning.
    options: ClassVar[dict[str, str]] = {}
    # Can ep exceed the expert count (ep % E == 0: each expert sharded over ep / E ranks, Tutel-style)?
    shards_experts: ClassVar[bool] = False
    # Can its experts be split over expert-parallel ranks at all? False: every rank holds all experts
    # (a single-process layer, e.g. a plugin), so check_support allows ep 1 only.
    expert_parallel: ClassVar[bool] = True
    # Does it build the shape's dense shared expert itself? False: the harness adds moebench's own
    # (systems/shared_expert.py) around the routed layer, identically for every such system.
    native_shared_experts: ClassVar[bool] = False

    def router_support(self, shape: LayerShape) -> str:
        """Why this system cannot express `shape`'s router ("" when it can). Default: the common
        softmax router only (core/values.py COMMON_ROUTER: softmax, top-k, renormalised when k > 1)."""
        if shape.has_common_router:
            return ""
        return (f"{self.name} routes by softmax top-k renormalised only; this workload's router is "
                f"{shape.router_label()} (run it with router=softmax for the common softmax variant)")

    @staticmethod
    def dropless_only(what: str, knobs: MoEKnobs) -> Availability:
        """For a system without capacity: refuse a capacity-factor trial, which would time other work."""
        if knobs.capacity_factor is None:
            return Availability.yes()
        return Availability.no(f"{what}: no capacity (every choice is computed), so a capacity factor "
                               f"{knobs.capacity_factor:g} trial would time other work than the rest: run it "
                               "with --capacity-factor dropless")

    @classmethod
    def availability(cls) -> Availability:
        """Can this system run on this machine at all (packages present, ...)?"""
        return Availability.yes()

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        """Can it run this particular trial? Unsupported options give a reason, never a crash.

        The rules every system shares; a subclass adds its own after calling this."""
        unknown = sorted(set(knobs.options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            return Availability.no(f"{self.name} does not understand option(s) {unknown} (known: {known})")
        if parallel.tp != 1:
            return Availability.no(f"{self.name} runs without tensor parallelism (tp must be 1)")
        E, ep = shape.num_experts, parallel.ep
        if ep > 1 and not self.expert_parallel:
            return Availability.no(f"{self.name} keeps every expert in one process (ep must be 1, got {ep})")
        if E % ep and not (self.shards_experts and ep % E == 0):
            if self.shards_experts:
                return Availability.no(f"{E} experts can be neither split over nor sharded across ep {ep} ranks")
            return Availability.no(f"{E} experts are not divisible by ep {ep} ({self.name} has no sharded experts)")
        why = self.router_support(shape)
        if why:
            return Availability.no(why)
        return Availability.yes()

    def gradient_sync(self, parallel: ParallelSpec, layers: list[MoELayerAdapter]):
        """At model level, an object that takes over the data-parallel gradient sync: the harness calls
        ``attach(module, expert_params)`` once, after the layers are prepared, and ``finish()`` after each
        backward (e.g. to issue the all-reduce in partitions inside backward). None (the default): the
        harness all-reduces the replicated gradients once after backward."""
        return None

    def init_distributed(self, parallel: ParallelSpec) -> None:
        """Set up process groups. Default: plain torch.distributed from torchrun's env vars
        (NCCL when CUDA is present, gloo otherwise, as the peer adapters do)."""
        from systems import distributed

        distributed.init_default_process_group(parallel, device="cuda" if torch.cuda.is_available() else "cpu")

    @abstractmethod
    def build_layer(
        self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec, layer_index: int = 0
    ) -> MoELayerAdapter: ...

    def teardown(self) -> None:
        """Release global state. Trials run in fresh processes, so this is best effort."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
