"""tutel: the real Tutel package (``tutel.moe.moe_layer``), when it is installed.

Tutel is not on PyPI and is not installed here, so this adapter reports
itself unavailable with the reason; it is written against the contract in
docs/tutel-semantics.md (sections 1, 2, 7) and untested on this machine.

Canonical weights -> Tutel's state dict (contract section 7, sharded_count 1):
gates.0.wg.weight = gate_EM, experts as tutel_native's checkpoint module maps them
(``experts_from_canonical``, the one place that knows the layout).
Dropless is ``capacity_factor=0`` at construction. Tokens per expert are
recounted from the gate (Tutel's own dispatch_count is read off one row and
is wrong for dropless; contract section 2.6), lazily in routing_stats(), so the
timed forward is Tutel's alone.

Precision: Tutel's fast dispatch/encode kernels run fp64 input in fp32 (relative
errors about 8e-8 against an fp64 reference), declared in ``internal_precision``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import (
    Availability,
    MoELayerAdapter,
    MoEOutput,
    MoESystem,
    RoutingStats,
    grad_of,
)

NOT_INSTALLED = "the tutel package is not installed (pip install from its repository; it is not on PyPI)"


class TutelLayer(MoELayerAdapter):
    fp64_computed_in_fp32 = "Tutel's dispatch/encode kernels compute fp64 input in fp32 (relative errors about 8e-8)"

    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec):
        super().__init__()
        from tutel import moe as tutel_moe

        self.shape, self.knobs, self.parallel = shape, knobs, parallel
        self.num_local = shape.num_experts // parallel.ep
        group = None
        self.ep_rank = 0
        if parallel.ep > 1:
            from systems.distributed import expert_parallel_group

            group, self.ep_rank = expert_parallel_group(parallel.ep)
        swiglu = shape.activation == "swiglu"
        experts = {"type": "llama_ffn" if swiglu else "ffn", "num_experts_per_device": self.num_local,
                   "hidden_size_per_expert": shape.ffn_dim}
        if not swiglu:
            experts.update(activation_fn=F.gelu if shape.activation == "gelu" else F.relu,
                           has_fc1_bias=shape.expert_bias, has_fc2_bias=shape.expert_bias)
        cf = knobs.capacity_factor
        self.moe = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": shape.top_k, "capacity_factor": 0.0 if cf is None else cf,
                       "fp32_gate": False},
            model_dim=shape.model_dim, experts=experts, group=group, seeds=(knobs.seed, knobs.seed + 1, 1),
            a2a_ffn_overlap_degree=int(knobs.options.get("overlap_degree", 1)),
        ).to(dtype=knobs.torch_dtype, device=knobs.device)
        self._saved: tuple | None = None  # (x_TM, l_aux) of the last forward

    def load_canonical(self, weights: CanonicalWeights) -> None:
        from systems.tutel_native.checkpoint import experts_from_canonical, shard_expert_tensor

        weights = weights.to(dtype=self.knobs.torch_dtype)
        state = {"gates.0.wg.weight": weights.gate_EM}
        E, ep = self.shape.num_experts, self.parallel.ep
        for name, full in experts_from_canonical(weights, self.shape.activation, self.shape.expert_bias).items():
            state[f"experts.{name}"] = shard_expert_tensor(name, full, E, ep, self.ep_rank)
        self.moe.load_state_dict(state, strict=False)

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        """Tutel's layer only; the input is kept by reference for routing_stats()."""
        y_TM = self.moe(x_TM)
        l_aux = getattr(y_TM, "l_aux", None)
        self._saved = (x_TM.detach(), None if l_aux is None else l_aux.detach())
        return MoEOutput(y_TM, l_aux)

    def routing_stats(self) -> RoutingStats:
        if self._saved is None:
            raise RuntimeError("routing_stats() called before the first forward")
        x_TM, l_aux = self._saved
        with torch.no_grad():
            logits_TE = x_TM @ self.moe.gates[0].wg.weight.T
            idx_TK = torch.topk(logits_TE, self.shape.top_k, dim=1).indices
            counts_E = torch.bincount(idx_TK.flatten(), minlength=self.shape.num_experts)
        capacity = None
        if self.knobs.capacity_factor is not None:
            from systems.torch_reference import tutel_capacity

            capacity = tutel_capacity(x_TM.shape[0], self.shape.num_experts, self.shape.top_k,
                                      self.knobs.capacity_factor)
        return RoutingStats(
            tokens_per_expert=[int(c) for c in counts_E.tolist()],
            dropped=0 if capacity is None else int((counts_E - capacity).clamp(min=0).sum()),
            capacity=capacity,
            l_aux=None if l_aux is None else float(l_aux),
        )

    def local_experts(self) -> tuple[int, int]:
        return self.ep_rank * self.num_local, self.num_local

    def canonical_gradients(self) -> CanonicalWeights:
        """Tutel's expert tensors (load_canonical's layout) mapped back, as for tutel_native."""
        from systems.peer_common import canonical_from_tutel_experts

        params = dict(self.moe.experts.named_parameters())
        tensors = {name: grad_of(p) for name, p in params.items()}
        return canonical_from_tutel_experts(tensors, self.shape.activation, self.num_local, self.shape.model_dim,
                                            self.shape.ffn_dim, grad_of(self.moe.gates[0].wg.weight))

    def aux_loss_mismatch(self) -> str:
        return ""  # Tutel's top gate returns the GShard loss (tutel-semantics.md section 3)


class Tutel(MoESystem):
    name = "tutel"
    description = "Microsoft Tutel (tutel.moe.moe_layer), if installed"
    options = {"overlap_degree": "a2a_ffn_overlap_degree (int >= 1): chunks of the all-to-all / expert pipeline"}

    @classmethod
    def availability(cls) -> Availability:
        try:
            import tutel  # noqa: F401
        except ImportError:
            return Availability.no(NOT_INSTALLED)
        return Availability.yes()

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        available = self.availability()
        if not available.ok:
            return available
        return super().check_support(shape, knobs, parallel)

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return TutelLayer(shape, knobs, parallel)
