"""The dense shared expert, added by moebench around any system's routed layer.

Fine-grained MoEs (DeepSeek-V3: one shared expert beside 256 routed ones) run
one dense FFN on every token and add its output to the routed experts'. A
system with its own shared expert declares ``native_shared_experts`` and builds
it from ``LayerShape.shared_ffn_dim``; for every other system the harness
wraps the routed layer in ``SharedExpertLayer``. That wrapper is the same code
for every system, inside the timed step, so a comparison between systems that
both lack native support is on identical work, and one with native support is
compared against the same function.

Legend: T tokens, M model dim, S shared-expert hidden width.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import MoELayerAdapter, MoEOutput, MoESystem, RoutingStats, grad_of
from systems.peer_common import CanonicalFFN

# canonical name -> the parameter of the one-expert FFN that holds it
SHARED_NAMES = {"shared_w1_SM": "w1_HM", "shared_w2_SM": "w2_HM", "shared_w3_SM": "w3_HM"}


class SharedExpertLayer(MoELayerAdapter):
    """`routed` (any system's layer) plus moebench's SharedFFN on every token; everything else delegates."""

    def __init__(self, routed: MoELayerAdapter, shape: LayerShape, dtype: torch.dtype):
        super().__init__()
        self.routed, self.shape = routed, shape
        # One dense expert of width S, no biases (as in DeepSeek-V3): the peers' canonical one-expert FFN.
        self.shared = CanonicalFFN(dataclasses.replace(shape, ffn_dim=shape.shared_ffn_dim, expert_bias=False), dtype)
        self.fp64_computed_in_fp32 = routed.fp64_computed_in_fp32
        # The routed layer's rules for the reference (capacity, drop order, router precision), when it has
        # any: without them a bf16 check of transformers, DeepSpeed or Megatron plus a shared expert routed
        # the reference at the input precision, and near-ties among 256 experts flipped.
        if hasattr(routed, "reference_policy"):
            self.reference_policy = routed.reference_policy

    def load_canonical(self, weights: CanonicalWeights) -> None:
        self.routed.load_canonical(weights.routed_only())
        with torch.no_grad():
            for name, own in SHARED_NAMES.items():
                param = getattr(self.shared, own)
                if param is not None:
                    param.copy_(getattr(weights, name).to(dtype=param.dtype, device=param.device))

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        out = self.routed(x_TM)
        return MoEOutput(out.y_TM + self.shared(x_TM), out.l_aux)

    def routing_stats(self) -> RoutingStats:
        return self.routed.routing_stats()

    def local_experts(self) -> tuple[int, int]:
        return self.routed.local_experts()

    def canonical_num_experts(self) -> int:
        return self.routed.canonical_num_experts()

    def canonical_gradients(self) -> CanonicalWeights:
        grads = self.routed.canonical_gradients()
        for name, own in SHARED_NAMES.items():
            setattr(grads, name, grad_of(getattr(self.shared, own)))
        return grads

    def internal_precision(self, dtype: str):
        return self.routed.internal_precision(dtype)

    def aux_loss_mismatch(self) -> str:
        return self.routed.aux_loss_mismatch()

    def prepare(self, num_tokens: int) -> None:
        self.routed.prepare(num_tokens)

    def before_optimizer_step(self) -> None:
        self.routed.before_optimizer_step()

    def phase_times(self):
        return self.routed.phase_times()

    def tuning_report(self):
        return self.routed.tuning_report()

    def expert_parameters(self) -> list[nn.Parameter]:
        return self.routed.expert_parameters()  # the shared expert is replicated: averaged like dense weights


def shared_expert_source(system: MoESystem, shape: LayerShape) -> str | None:
    """Who computes the shared expert: "native" (the system), "harness" (SharedExpertLayer), None (none)."""
    if not shape.shared_ffn_dim:
        return None
    return "native" if system.native_shared_experts else "harness"


def build_moe_layer(system: MoESystem, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec,
                    layer_index: int = 0) -> MoELayerAdapter:
    """`system`'s layer for `shape`, with moebench's shared expert around it when the shape has one
    and the system does not build its own. The one way the harness builds a layer."""
    layer = system.build_layer(shape, knobs, parallel, layer_index=layer_index)
    if shared_expert_source(system, shape) == "harness":
        layer = SharedExpertLayer(layer, shape, knobs.torch_dtype).to(knobs.device)
    return layer


def with_shared_expert(routed: MoELayerAdapter, shape: LayerShape, dtype: torch.dtype) -> MoELayerAdapter:
    """A reference-side routed layer with the shared expert (the reference never has it natively)."""
    return SharedExpertLayer(routed, shape, dtype) if shape.shared_ffn_dim else routed
