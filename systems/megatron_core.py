"""megatron_core: the real ``megatron.core.transformer.moe.moe_layer.MoELayer`` (megatron-core 0.16.1).

Experts are Megatron's ``SequentialMLP`` (one ``MLP`` per local expert, local
linear layers, no TransformerEngine), GELU/ReLU or SwiGLU through
``gated_linear_unit``. Token dispatchers: knob option ``dispatcher`` =
"alltoall" (default) or "allgather". Capacity-limited runs pad every expert to
its capacity (``moe_expert_capacity_factor`` + ``moe_pad_expert_input_to_capacity``);
``capacity_factor=None`` is dropless. On a machine without CUDA the small
compatibility layer in systems/megatron_cpu_compat.py is applied first.

Megatron's routing semantics (read off ``router.py`` / ``moe_utils.py``) and
how they differ from Tutel's (``docs/tutel-semantics.md``):

* gate values: top-k is taken on the logits and the softmax is taken over the
  k chosen logits (``moe_router_pre_softmax=False``), which equals Tutel's
  renormalised gates for k > 1. For k = 1 that softmax would be 1.0, so we
  set ``moe_router_pre_softmax=True`` (softmax over all experts, then top-1),
  which gives Tutel's top-1 gate P[t, e]. Both are stock Megatron options.
* capacity ``C = ceil(T * k / E * cf)`` with no minimum, vs Tutel's
  ``k * int(cf * ceil(T / E))``; if C > T nothing is dropped at all.
* which choices are dropped: the default "probs" policy keeps, per expert, the
  C choices with the highest gate value, whatever their rank (first/second
  choice) or position; Tutel keeps slots in order (all first choices, then
  second choices, token order). Kept gate values are *not* renormalised.
* padding to capacity makes every expert process exactly C rows (slots filled
  with other tokens at gate 0), so the expert GEMMs cost E*C rows like Tutel's.
* the aux loss ``E * sum_e mean_t(P[t,e]) * f_e`` counts all k choices in f_e
  (f_e = load_e / (T*k)), where GShard/Tutel count first choices only. It is
  not returned: Megatron attaches it to the autograd graph of the gate values
  and logs it in a tracker. We read it from the tracker, and set Megatron's
  aux-loss backward scale to 0 so that ``y.backward()`` carries the same
  gradient as every other system (the caller owns the aux loss; the cost of
  computing it stays in the measurement).
* the gate softmax runs in fp32 for any input dtype, so fp64 runs carry fp32
  routing error: declared through ``internal_precision`` (the equivalence
  check compares them at fp32 tolerance).
"""
from __future__ import annotations

import math

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
from systems.peer_common import check_world, ensure_single_process_env

DISPATCHERS = ("alltoall", "allgather")
AUX_LOSS_COEFF = 1e-2
AUX_LOSS_NAME = "load_balancing_loss"
LAYER_NUMBER = 1


def megatron_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Megatron's per-expert capacity: ceil(T * k / E * cf), no minimum."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def transformer_engine_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def _router_class():
    """TopKRouter that keeps its logits for the pre-drop routing statistics (recomputed lazily,
    outside the timed step, in routing_stats) and, without CUDA, keeps its weight on the CPU."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear, topk_routing_with_score_function
    from megatron.core.transformer.moe.router import TopKRouter

    class RecordingTopKRouter(TopKRouter):
        last_logits: torch.Tensor | None = None

        def counts_of_last(self) -> torch.Tensor:
            """Choices routed to each expert before dropping, from the last forward's logits."""
            with torch.no_grad():
                _, routing_map = topk_routing_with_score_function(
                    self.last_logits.view(-1, self.config.num_moe_experts), self.topk,
                    use_pre_softmax=self.config.moe_router_pre_softmax, score_function=self.score_function)
                return routing_map.sum(0)

        def gating(self, input):
            if torch.cuda.is_available():
                return super().gating(input)
            # CPU compat: Router.gating moves the weight to torch.cuda.current_device().
            return router_gating_linear(input, self.weight, self.bias, input.dtype)

        def routing(self, logits, padding_mask=None):
            self.last_logits = logits.detach()  # a reference, no copy
            return super().routing(logits, padding_mask=padding_mask)

    return RecordingTopKRouter


class MegatronMoELayer(MoELayerAdapter):
    fp64_computed_in_fp32 = "Megatron's router softmax runs in fp32 whatever the input dtype"

    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec, grouped_gemm: bool = False):
        """grouped_gemm: Megatron's grouped-GEMM experts (TEGroupedMLP with TransformerEngine, else the
        grouped_gemm package's GroupedMLP; both CUDA-only) instead of SequentialMLP."""
        super().__init__()
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
        from megatron.core.transformer.transformer_config import TransformerConfig

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            from systems import megatron_cpu_compat

            megatron_cpu_compat.apply()
        self.shape, self.knobs, self.parallel = shape, knobs, parallel
        dtype = knobs.torch_dtype
        cf = knobs.capacity_factor
        act = {"gelu": F.gelu, "relu": F.relu, "swiglu": F.silu}[shape.activation]
        config = TransformerConfig(
            num_layers=1,
            hidden_size=shape.model_dim,
            num_attention_heads=1,
            ffn_hidden_size=shape.ffn_dim,
            moe_ffn_hidden_size=shape.ffn_dim,
            num_moe_experts=shape.num_experts,
            moe_router_topk=shape.top_k,
            moe_router_pre_softmax=shape.top_k == 1,
            moe_token_dispatcher_type=knobs.options.get("dispatcher", "alltoall"),
            moe_expert_capacity_factor=cf,
            moe_pad_expert_input_to_capacity=cf is not None,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=AUX_LOSS_COEFF,
            expert_model_parallel_size=parallel.ep,
            add_bias_linear=False,
            gated_linear_unit=shape.activation == "swiglu",
            activation_func=act,
            bias_activation_fusion=False,
            use_cpu_initialization=on_cpu,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            moe_grouped_gemm=grouped_gemm,
        )
        use_te = grouped_gemm and transformer_engine_present()
        spec = get_moe_module_spec(use_te=use_te, num_experts=shape.num_experts, moe_grouped_gemm=grouped_gemm,
                                   moe_use_legacy_grouped_gemm=grouped_gemm and not use_te)
        spec.submodules.router = _router_class()
        self.moe = MoELayer(config, spec.submodules, layer_number=LAYER_NUMBER)
        self.moe.set_layer_number(LAYER_NUMBER)  # the aux-loss tracker skips layers without a number
        self.moe.to(dtype=dtype)
        if knobs.device != "cpu":
            self.moe.to(device=knobs.device)
        if on_cpu:
            from systems import megatron_cpu_compat

            megatron_cpu_compat.patch_layer(self.moe)
        # Megatron adds the aux loss's gradient inside backward; scale 0 leaves the
        # caller in charge of it, like every other system (module docstring).
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.0, device=knobs.device))
        self.first_local = self.moe.local_expert_indices[0]
        self._expert_params = list(self.moe.experts.parameters())
        self.num_local = shape.num_experts // parallel.ep
        self._saved: tuple | None = None  # (T, l_aux) of the last forward

    def expert_parameters(self):
        """Megatron marks SequentialMLP weights inconsistently across versions: name them directly."""
        return self._expert_params

    def _expert_matrices(self, pick) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fc1 [H or 2H, M], fc2 [M, H]) of each local expert as views of pick(parameter) (its data or
        its gradient), whichever expert module Megatron built: SequentialMLP keeps one linear pair per
        expert, TEGroupedMLP one weight{i} pair per expert, the legacy GroupedMLP two flat tensors
        that its forward views as [E, M, fc1] and [E, H, M]. fc1 is [w1; w3] for the GLU."""
        experts, E, M = self.moe.experts, self.num_local, self.shape.model_dim
        if hasattr(experts, "local_experts"):
            return [(pick(m.linear_fc1.weight), pick(m.linear_fc2.weight)) for m in experts.local_experts]
        if hasattr(experts, "weight1"):
            w1_EMF, w2_EHM = pick(experts.weight1).view(E, M, -1), pick(experts.weight2).view(E, -1, M)
            return [(w1_EMF[e].T, w2_EHM[e].T) for e in range(E)]
        return [(pick(getattr(experts.linear_fc1, f"weight{e}")), pick(getattr(experts.linear_fc2, f"weight{e}")))
                for e in range(E)]

    def load_canonical(self, weights: CanonicalWeights) -> None:
        weights = weights.to(dtype=self.knobs.torch_dtype, device=self.knobs.device)
        with torch.no_grad():
            self.moe.router.weight.copy_(weights.gate_EM)
            for i, (fc1, fc2) in enumerate(self._expert_matrices(lambda p: p.data)):
                e = self.first_local + i
                w1 = weights.w1_EHM[e]
                if weights.w3_EHM is not None:  # Megatron's GLU: fc1 = [gate; up], act(gate) * up
                    w1 = torch.cat([weights.w1_EHM[e], weights.w3_EHM[e]], dim=0)
                fc1.copy_(w1)
                fc2.copy_(weights.w2_EHM[e].T)

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        if AUX_LOSS_NAME in tracker:
            tracker[AUX_LOSS_NAME]["values"].zero_()
        y_SBM, _bias = self.moe(x_TM.unsqueeze(1))
        y_TM = y_SBM.squeeze(1)
        l_aux = None
        if AUX_LOSS_NAME in tracker:  # one scalar copy: the tracker is zeroed at the next forward
            l_aux = tracker[AUX_LOSS_NAME]["values"][LAYER_NUMBER - 1].detach().clone()
        # Routing statistics are recounted from the router's logits in routing_stats(), outside
        # the timed step; what stays here is Megatron's own work and the aux-loss copy.
        self._saved = (x_TM.shape[0], l_aux)
        return MoEOutput(y_TM, l_aux)

    def routing_stats(self) -> RoutingStats:
        if self._saved is None:
            raise RuntimeError("routing_stats() called before the first forward")
        T, l_aux = self._saved
        counts_E = self.moe.router.counts_of_last()
        E, K = self.shape.num_experts, self.shape.top_k
        capacity, dropped, rows = None, 0, T * K
        if self.knobs.capacity_factor is not None:
            capacity = megatron_capacity(T, E, K, self.knobs.capacity_factor)
            if capacity > T:  # Megatron drops nothing, and pads every expert to all T tokens
                rows, capacity = E * T, T
            else:
                dropped = int((counts_E - capacity).clamp(min=0).sum())
                rows = E * capacity
        return RoutingStats(
            tokens_per_expert=[int(c) for c in counts_E.tolist()],
            dropped=dropped,
            capacity=capacity,
            l_aux=None if l_aux is None else float(l_aux),
            expert_rows_computed=rows,
        )

    def local_experts(self) -> tuple[int, int]:
        return self.first_local, self.num_local

    def canonical_gradients(self) -> CanonicalWeights:
        """Per expert: fc1 [H, M] (GLU: [w1; w3] stacked, [2H, M]) and fc2 [M, H] = w2^T."""
        w1, w2, w3 = [], [], []
        H = self.shape.ffn_dim
        grads = {}  # one gradient copy per parameter, however many experts view it

        def grad_view(param):
            if id(param) not in grads:
                grads[id(param)] = grad_of(param)
            return grads[id(param)]

        for fc1, fc2 in self._expert_matrices(grad_view):
            w1.append(fc1[:H])
            if self.shape.activation == "swiglu":
                w3.append(fc1[H:])
            w2.append(fc2.T)
        return CanonicalWeights(gate_EM=grad_of(self.moe.router.weight), w1_EHM=torch.stack(w1),
                                w2_EHM=torch.stack(w2), w3_EHM=torch.stack(w3) if w3 else None)

    def aux_loss_mismatch(self) -> str:
        if self.shape.top_k > 1:
            return "Megatron's aux loss counts all k choices (f_e = load_e / (T k)); GShard counts first choices"
        return ""

    def reference_policy(self):
        """How to run torch_reference so that it computes what Megatron computes (harness/equivalence.py):
        its capacity rule, and its router's fp32 scores of input-dtype logits."""
        from systems.base import ReferencePolicy

        if self.knobs.capacity_factor is None:
            return ReferencePolicy(router_precision="float32_scores")
        capacity = self.routing_stats().capacity
        return ReferencePolicy(capacity=capacity, drop_order="gate", router_precision="float32_scores",
                               note=f"Megatron capacity {capacity} (ceil(T*k/E*cf)), drops lowest gate values "
                               "per expert")


class MegatronCore(MoESystem):
    name = "megatron_core"
    description = "Megatron-Core MoELayer (SequentialMLP experts, all-to-all or all-gather dispatcher)"
    options = {"dispatcher": "token dispatcher: 'alltoall' (default) or 'allgather'",
               "grouped_gemm": "Megatron's grouped GEMM experts (CUDA-only; refused here: the "
                               "megatron_grouped_gemm system runs them)"}

    @classmethod
    def availability(cls) -> Availability:
        try:
            import megatron.core.transformer.moe.moe_layer  # noqa: F401
        except ImportError as exc:
            return Availability.no(f"megatron-core is not importable: {exc}")
        return Availability.yes()

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        common = super().check_support(shape, knobs, parallel)
        if not common.ok:
            return common
        dispatcher = knobs.options.get("dispatcher", "alltoall")
        if dispatcher not in DISPATCHERS:
            return Availability.no(f"megatron_core dispatcher must be one of {DISPATCHERS}, got {dispatcher!r}")
        if knobs.options.get("grouped_gemm"):
            return Availability.no("Megatron's grouped GEMM needs the grouped_gemm package or TransformerEngine, "
                                   "both CUDA-only; not installed here")
        if shape.expert_bias:
            return Availability.no("megatron_core adapter: expert biases (add_bias_linear) are not wired up "
                                   "(Megatron fails with an in-place view error at world size 1)")
        if torch.cuda.is_available():
            from megatron.core.transformer.moe import moe_utils

            if not hasattr(moe_utils, "te_general_gemm"):
                return Availability.no("on GPU Megatron's router needs TransformerEngine (te_general_gemm is "
                                       "undefined without it) and we run Megatron unpatched on GPU")
        return Availability.yes()

    def init_distributed(self, parallel: ParallelSpec) -> None:
        """torch.distributed (also for one process) and Megatron's parallel_state with EP = parallel.ep."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        if parallel.world_size == 1:
            ensure_single_process_env()
        check_world(parallel.world_size)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            import os

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        parallel_state.initialize_model_parallel(expert_model_parallel_size=parallel.ep,
                                                 create_gloo_process_groups=False)
        from megatron.core.tensor_parallel import random as mrandom

        if torch.cuda.is_available():
            mrandom.model_parallel_cuda_manual_seed(0)

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return MegatronMoELayer(shape, knobs, parallel)

    def teardown(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
