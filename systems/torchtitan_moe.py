"""torchtitan: the MoE layer of PyTorch's own training stack (torchtitan 0.3.0, pinned exactly).

Built from torchtitan's config helpers (``make_moe_config`` with a
``TokenChoiceTopKRouter`` and ``RoutedExperts``) and driven as shipped:

* router: a linear gate (torchtitan asks autocast for fp32; on the CPU autocast
  has no fp32 mode, so there the gate runs in the input dtype), softmax or
  sigmoid scores, top-k of the scores plus ``expert_bias_E`` (the bias steers
  the choice only), optional group-limited choice (a group's merit is the sum
  of its two best biased scores, as in our reference), ``route_norm`` and
  ``route_scale``. So it expresses every router a workload can declare,
  DeepSeek-V3's included, provided each group holds at least two experts;
* experts: dropless, tokens sorted by expert, three ``torch._grouped_mm``
  calls per step (w1, w3, w2 as ``[E, F, D]``, ``[E, D, F]``; F = our H).
  ``GroupedExperts`` casts tokens and weights to **bf16** whatever the input
  dtype, and torch 2.13's CPU grouped_mm computes in bf16 only with 16-byte
  aligned strides. An fp32 or fp64 trial would therefore measure bf16 expert
  math against a full-precision reference: torchtitan runs in bf16 trials only;
* shared expert: torchtitan's own ``FeedForward`` (``native_shared_experts``);
* no aux loss: load balancing is aux-loss-free. The bias update
  (``coeff * sign(mean load - load)``, centred) lives in an optimizer
  pre-step hook outside the module; the adapter registers torchtitan's own
  hook (``register_moe_load_balancing_hook``) and runs it before each optimizer
  step (``before_optimizer_step``), as torchtitan's trainer does;
* expert parallelism runs through torchtitan's DTensor parallelize plan
  (device meshes, ``ParallelDims``), not through the module: this adapter
  drives the module at ep 1 (data parallelism is the harness's).

Legend: T tokens, M model dim (torchtitan's D), H expert hidden (its F), E experts, K top-k.
"""
from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from core.values import BIAS_UPDATE_RATE, CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import Availability, MoELayerAdapter, MoEOutput, MoESystem, ReferencePolicy, RoutingStats, grad_of


class _HookRecorder:
    """Stands in for torchtitan's OptimizersContainer: keeps the pre-step hook torchtitan registers."""

    def __init__(self):
        self.hooks = []

    def register_step_pre_hook(self, hook):
        self.hooks.append(hook)


class _ParallelDims:
    """What torchtitan's bias-update hook reads of its ParallelDims: no EP and, under data parallelism,
    the group over which it sums the per-expert loads (every rank's tokens, as its loss mesh would)."""

    ep_enabled = False
    tp = 1

    def __init__(self, world_group):
        self._loss = None if world_group is None else _Mesh(world_group)

    def get_optional_mesh(self, name: str):
        return self._loss if name == "loss" else None


class _Mesh:
    def __init__(self, group):
        self._group = group

    def get_group(self):
        return self._group


class _Block(nn.Module):
    """A transformer block as torchtitan's hook finds MoE layers in it (``moe_enabled``, ``.moe``)."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe_enabled = True
        self.moe = moe


def build_torchtitan_moe(shape: LayerShape) -> nn.Module:
    from torchtitan.models.common.config_utils import (
        make_ffn_config,
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    M, H, E, K = shape.model_dim, shape.ffn_dim, shape.num_experts, shape.top_k
    grouped = shape.n_groups > 1
    router = make_router_config(dim=M, num_experts=E, gate_param_init={}, top_k=K, score_func=shape.score,
                                route_norm=shape.renormalize and K > 1, route_scale=shape.route_scale,
                                num_expert_groups=shape.n_groups if grouped else None,
                                num_limited_groups=shape.topk_groups if grouped else None)
    routed = make_routed_experts_config(dim=M, hidden_dim=H, num_experts=E, top_k=K, param_init={},
                                        comm_backend="standard")
    shared = None
    if shape.shared_ffn_dim:
        shared = make_ffn_config(dim=M, hidden_dim=shape.shared_ffn_dim, w1_param_init={}, w2w3_param_init={})
    config = make_moe_config(num_experts=E, router=router, routed_experts=routed, shared_experts=shared,
                             load_balance_coeff=BIAS_UPDATE_RATE if shape.score_bias else None)
    return config.build()


class TorchTitanLayer(MoELayerAdapter):
    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec):
        super().__init__()
        # torchtitan asks CPU autocast for fp32, which CPU autocast does not offer; it says so on every trial.
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        self.shape, self.knobs = shape, knobs
        self.moe = build_torchtitan_moe(shape).to(dtype=knobs.torch_dtype, device=knobs.device)
        if self.moe.expert_bias_E is not None:  # torchtitan keeps the bias and the loads in fp32
            self.moe.expert_bias_E = self.moe.expert_bias_E.float()
        self.moe.tokens_per_expert_E = self.moe.tokens_per_expert_E.float()
        self.moe.train()
        self._routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (scores_TE, idx_TK) of the last forward
        self.moe.router.register_forward_hook(self._record_router)
        self._bias_hooks = self._register_bias_update(parallel)

    def _register_bias_update(self, parallel: ParallelSpec) -> list:
        if self.moe.load_balance_coeff is None:
            return []
        import torch.distributed as dist
        from torchtitan.components.optimizer.optimizer import register_moe_load_balancing_hook

        holder = nn.Module()
        holder.layers = nn.ModuleDict({"0": _Block(self.moe)})
        world = dist.group.WORLD if parallel.world_size > 1 and dist.is_initialized() else None
        recorder = _HookRecorder()
        register_moe_load_balancing_hook(recorder, [holder], _ParallelDims(world))
        return recorder.hooks

    def _record_router(self, module, args, output):
        _scores_BLK, idx_BLK, scores_BLE = output
        self._routed = (scores_BLE.detach().flatten(0, 1), idx_BLK.detach().flatten(0, 1))

    def load_canonical(self, weights: CanonicalWeights) -> None:
        weights = weights.to(dtype=self.knobs.torch_dtype, device=self.knobs.device)
        experts = self.moe.routed_experts.inner_experts
        with torch.no_grad():
            self.moe.router.gate.weight.copy_(weights.gate_EM)
            experts.w1_EFD.copy_(weights.w1_EHM)
            experts.w3_EFD.copy_(weights.w3_EHM)
            experts.w2_EDF.copy_(weights.w2_EHM.transpose(1, 2))
            if self.moe.expert_bias_E is not None:
                self.moe.expert_bias_E.copy_(weights.score_bias_E)
            if self.moe.shared_experts is not None:
                shared = self.moe.shared_experts
                shared.w1.weight.copy_(weights.shared_w1_SM)
                shared.w3.weight.copy_(weights.shared_w3_SM)
                shared.w2.weight.copy_(weights.shared_w2_SM.T)
            self.moe.tokens_per_expert_E.zero_()

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        """torchtitan 0.3.0 takes [B, L, D]: one sequence of this rank's T tokens."""
        return MoEOutput(self.moe(x_TM.unsqueeze(0)).squeeze(0), None)

    def before_optimizer_step(self) -> None:
        for hook in self._bias_hooks:
            hook()

    def routing_stats(self) -> RoutingStats:
        if self._routed is None:
            raise RuntimeError("routing_stats() called before the first forward")
        _, idx_TK = self._routed
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.shape.num_experts)
        return RoutingStats(tokens_per_expert=[int(c) for c in counts_E.tolist()], dropped=0, capacity=None,
                            l_aux=None, expert_rows_computed=idx_TK.numel())

    def canonical_gradients(self) -> CanonicalWeights:
        experts = self.moe.routed_experts.inner_experts
        grads = CanonicalWeights(gate_EM=grad_of(self.moe.router.gate.weight), w1_EHM=grad_of(experts.w1_EFD),
                                 w3_EHM=grad_of(experts.w3_EFD),
                                 w2_EHM=grad_of(experts.w2_EDF).transpose(1, 2).contiguous())
        if self.moe.shared_experts is not None:
            shared = self.moe.shared_experts
            grads.shared_w1_SM = grad_of(shared.w1.weight)
            grads.shared_w3_SM = grad_of(shared.w3.weight)
            grads.shared_w2_SM = grad_of(shared.w2.weight).T.contiguous()
        return grads

    def aux_loss_mismatch(self) -> str:
        return "torchtitan balances load without an aux loss (a selection bias updated between steps)"

    def reference_policy(self) -> ReferencePolicy:
        note = "torchtitan's MoE has no capacity: every choice is computed"
        if self.knobs.capacity_factor is not None:
            note += f" (the workload's cf {self.knobs.capacity_factor:g} does not apply)"
        return ReferencePolicy(dropless=True, note=note)


class TorchTitan(MoESystem):
    name = "torchtitan"
    description = "torchtitan 0.3.0's MoE (token-choice router, grouped_mm experts, aux-loss-free bias); bf16 only"
    expert_parallel = False
    native_shared_experts = True
    options: ClassVar[dict[str, str]] = {}

    @classmethod
    def availability(cls) -> Availability:
        try:
            import torchtitan.models.common.moe  # noqa: F401
        except ImportError as exc:
            return Availability.no(f"torchtitan is not importable: {exc}")
        if not hasattr(torch, "_grouped_mm"):
            return Availability.no(f"torch {torch.__version__} has no torch._grouped_mm (torchtitan's experts)")
        return Availability.yes()

    def router_support(self, shape: LayerShape) -> str:
        if shape.n_groups > 1 and shape.num_experts // shape.n_groups < 2:
            return (f"torchtitan's group-limited routing needs at least 2 experts per group (got "
                    f"{shape.num_experts} experts in {shape.n_groups} groups)")
        return ""

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        common = super().check_support(shape, knobs, parallel)
        if not common.ok:
            return common
        dropless = self.dropless_only("torchtitan's MoE", knobs)  # identical work or no comparison
        if not dropless.ok:
            return dropless
        if knobs.dtype != "bfloat16":
            return Availability.no("torchtitan's experts cast tokens and weights to bf16 for torch._grouped_mm "
                                   f"whatever the input dtype, so a {knobs.dtype} trial would compare bf16 expert "
                                   "math with a full-precision reference: run it with --dtype bfloat16")
        if shape.activation != "swiglu" or shape.expert_bias:
            return Availability.no("torchtitan's GroupedExperts are SwiGLU without biases; this workload's experts "
                                   f"are {shape.activation}" + (" with biases" if shape.expert_bias else ""))
        misaligned = [f"{n} {v}" for n, v in (("M", shape.model_dim), ("H", shape.ffn_dim)) if v % 8]
        if misaligned:
            return Availability.no("torch._grouped_mm needs 16-byte aligned rows: model and expert widths multiples "
                                   f"of 8 in bf16 (got {', '.join(misaligned)})")
        return Availability.yes()

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return TorchTitanLayer(shape, knobs, parallel)
