"""deepspeed_moe: the real ``deepspeed.moe.layer.MoE`` (DeepSpeed 0.19.8) behind the adapter.

Configured for deterministic routing comparable with the other systems:
``use_rts=False`` (no random token selection), ``top2_2nd_expert_sampling=False``
(the second expert is the true second-best, not Gumbel-sampled), no noisy gate.
The experts are our :class:`~systems.peer_common.CanonicalFFN` (DeepSpeed takes
any module), loaded from canonical weights.

DeepSpeed's routing semantics, and how they differ from Tutel's
(``docs/tutel-semantics.md``; read off ``deepspeed/moe/sharded_moe.py``):

* capacity ``C = max(ceil(T / E * cf * k), min_capacity)`` (min_capacity 4 by
  default) instead of Tutel's ``k * int(cf * ceil(T / E))``;
* top-2 places choices like Tutel (first choices before second ones, token
  order) and drops slots ``>= C``; top-1 keeps C of an expert's tokens chosen
  by ``torch.topk`` over equal 0/1 entries, i.e. in an unspecified tie order
  (not the first C tokens; the check uses DeepSpeed's kept set for top-1);
  k > 2 keeps, per expert, the C choices with the highest softmax probability;
* k >= 2: gate values are renormalised over the *kept* choices (a token whose
  second choice is dropped gets weight 1 on its first); Tutel normalises
  before dropping;
* dropless (``drop_tokens=False``): C = the largest expert load, all-reduced
  over the expert group, so the expert GEMMs still run on E*C padded rows;
* the gate runs in fp32 whatever the input dtype (so fp64 runs carry fp32
  routing error): declared through ``internal_precision``, compared at fp32 tolerance;
* aux loss: ``E * sum_e mean_t(P[t,e]) * frac_e`` with frac over first choices
  (GShard) for k <= 2; k > 2 counts all choices and divides by k.
"""
from __future__ import annotations

import torch

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import (
    Availability,
    MoELayerAdapter,
    MoEOutput,
    MoESystem,
    RoutingStats,
    grad_of,
)
from systems.peer_common import CanonicalFFN, check_world, ensure_single_process_env


def _name_the_accelerator() -> None:
    """Tell DeepSpeed which accelerator it is on (its documented DS_ACCELERATOR switch) instead of
    letting it probe and warn; a user's own setting wins."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


MIN_CAPACITY = 4  # DeepSpeed's default, kept so the benchmark measures DeepSpeed as shipped


def deepspeed_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                       min_capacity: int = MIN_CAPACITY) -> int:
    """DeepSpeed's capacity-limited C (for documentation and tests; the layer computes its own)."""
    import math

    return max(math.ceil(num_tokens / num_experts * capacity_factor * top_k), min_capacity)


class DeepSpeedMoELayer(MoELayerAdapter):
    fp64_computed_in_fp32 = "DeepSpeed's gate computes in fp32 whatever the input dtype"

    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.shape, self.knobs, self.parallel = shape, knobs, parallel
        cf = knobs.capacity_factor
        self.moe = MoE(
            hidden_size=shape.model_dim,
            expert=CanonicalFFN(shape, knobs.torch_dtype),
            num_experts=shape.num_experts,
            ep_size=parallel.ep,
            k=shape.top_k,
            capacity_factor=cf if cf is not None else 1.0,
            eval_capacity_factor=cf if cf is not None else 1.0,
            min_capacity=MIN_CAPACITY,
            noisy_gate_policy=None,
            drop_tokens=cf is not None,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.moe.set_deepspeed_parallelism()
        self.moe.to(dtype=knobs.torch_dtype, device=knobs.device)
        self.num_local = shape.num_experts // parallel.ep
        import torch.distributed as dist

        self.ep_rank = dist.get_rank() % parallel.ep if dist.is_initialized() else 0
        self._gate_out = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._record_gate)
        self._saved: tuple | None = None  # (gate outputs, l_aux, exp_counts) of the last forward

    def _record_gate(self, module, args, output):
        # (l_aux, capacity, E, indices[K, T] (-1 = dropped), locations, gates, exp_counts)
        self._gate_out = output

    def load_canonical(self, weights: CanonicalWeights) -> None:
        weights = weights.to(dtype=self.knobs.torch_dtype)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(weights.gate_EM)
        for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            expert.load_expert(weights, self.ep_rank * self.num_local + i)

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        """DeepSpeed's layer only; the gate's outputs are kept by reference and counted lazily in
        routing_stats() (what remains inside is DeepSpeed's own work, e.g. its exp_counts)."""
        y_TM, l_aux, exp_counts = self.moe(x_TM)
        self._saved = (self._gate_out, l_aux.detach(), exp_counts)
        return MoEOutput(y_TM, l_aux)

    def routing_stats(self) -> RoutingStats:
        if self._saved is None:
            raise RuntimeError("routing_stats() called before the first forward")
        gate_out, l_aux, exp_counts = self._saved
        _l_aux, capacity, num_experts, indices_KT = gate_out[:4]
        capacity = int(capacity)
        kept = int((indices_KT >= 0).sum())
        return RoutingStats(
            tokens_per_expert=[int(c) for c in exp_counts.tolist()],
            dropped=indices_KT.numel() - kept,
            capacity=capacity,
            l_aux=float(l_aux),
            expert_rows_computed=int(num_experts) * capacity,
        )

    def local_experts(self) -> tuple[int, int]:
        return self.ep_rank * self.num_local, self.num_local

    def canonical_gradients(self) -> CanonicalWeights:
        """DeepSpeed keeps one CanonicalFFN per local expert: stack their gradients along E."""
        experts = list(self.moe.deepspeed_moe.experts.deepspeed_experts)

        def stack(name):
            grads = [grad_of(getattr(ex, name)) for ex in experts]
            return None if grads[0] is None else torch.stack(grads)

        return CanonicalWeights(gate_EM=grad_of(self.moe.deepspeed_moe.gate.wg.weight), w1_EHM=stack("w1_HM"),
                                w2_EHM=stack("w2_HM"), w3_EHM=stack("w3_HM"), b1_EH=stack("b1_H"),
                                b2_EM=stack("b2_M"))

    def aux_loss_mismatch(self) -> str:
        if self.shape.top_k > 2:
            return "DeepSpeed's top-k (k > 2) aux loss counts all k choices and divides by k"
        return ""

    def reference_policy(self):
        """How to run torch_reference so that it computes what DeepSpeed computes (harness/equivalence.py):
        its capacity rules, and its gate on fp32 copies of tokens and weight (TopKGate), so in bf16 the
        reference's router does the same."""
        import dataclasses

        return dataclasses.replace(self._capacity_policy(), router_precision="float32_logits")

    def _capacity_policy(self):
        from systems.base import ReferencePolicy

        stats = self.routing_stats()
        k = self.shape.top_k
        if self.knobs.capacity_factor is None:
            return ReferencePolicy()
        if k == 1:  # top-1 keeps C of an expert's tokens in torch.topk's (unspecified) tie order
            keep_TK = (self._gate_out[3] >= 0).T.cpu()
            return ReferencePolicy(capacity=stats.capacity, drop_order="given", keep_TK=keep_TK,
                                   note=f"DeepSpeed capacity {stats.capacity}; top-1 drop set is torch.topk's tie "
                                   "order, reference uses DeepSpeed's kept set")
        return ReferencePolicy(
            capacity=stats.capacity,
            drop_order="position" if k == 2 else "prob",
            renormalize_after_drop=k >= 2,
            note=f"DeepSpeed capacity {stats.capacity} (ceil(T/E*cf*k), min {MIN_CAPACITY})"
            + ("; gates renormalised over kept choices" if k >= 2 else ""),
        )


class DeepSpeedMoE(MoESystem):
    name = "deepspeed_moe"
    description = "DeepSpeed-MoE (deepspeed.moe.layer.MoE), deterministic top-k gate, sparse dispatch"

    @classmethod
    def availability(cls) -> Availability:
        _name_the_accelerator()
        try:
            import deepspeed.moe.layer  # noqa: F401
        except ImportError as exc:
            return Availability.no(f"deepspeed is not importable: {exc}")
        return Availability.yes()

    def init_distributed(self, parallel: ParallelSpec) -> None:
        """deepspeed.init_distributed even for one process: MoE's groups need its comm backend."""
        _name_the_accelerator()
        import deepspeed

        if parallel.world_size == 1:
            ensure_single_process_env()
        check_world(parallel.world_size)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return DeepSpeedMoELayer(shape, knobs, parallel)
