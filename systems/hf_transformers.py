"""hf_transformers: Hugging Face transformers' own sparse MoE blocks (transformers 5.24.0).

These are the blocks most fine-tuning runs use: ``MixtralSparseMoeBlock`` and
``Qwen3MoeSparseMoeBlock``, built from their configs and driven as shipped.
Two expert implementations, switchable per trial (option ``experts``):
``grouped_mm`` (the default here: tokens sorted by expert, one grouped GEMM per
projection through ``torch.nn.functional.grouped_mm``) and ``eager`` (a Python
loop over the experts that received tokens).

transformers' routing semantics (read off ``modeling_mixtral.py`` and
``modeling_qwen3_moe.py``), and how they map to ours:

* router: a linear layer without bias, softmax over all experts in fp32
  (whatever the input dtype: declared through ``internal_precision``), top-k;
  Mixtral always divides the k values by their sum (even for k = 1, where the
  gate becomes 1), Qwen3-MoE only when ``norm_topk_prob``. No sigmoid, bias,
  group limits or routed scale, so DeepSeek-V3's declared router is refused
  with that reason (its softmax variant runs);
* no capacity: every choice is computed, so the adapter runs dropless trials
  only (a capacity-limited trial would time other work than the other
  systems; it is skipped with that reason);
* experts: SwiGLU without biases, stored as ``gate_up_proj [E, 2H, M]``
  (w1 rows, then w3 rows) and ``down_proj [E, M, H]`` (w2 transposed);
* aux loss: computed outside the block by the causal-LM wrapper
  (``load_balancing_loss_func``) from the router logits. The adapter calls that
  same function on the logits it records, so the timed step contains it as a
  training step would; it counts all k choices per expert, not only first ones;
* one process holds every expert (transformers' expert parallelism is for
  inference), so ep must be 1. No shared expert in these two blocks: the
  harness adds its own for workloads that declare one.

Legend: T tokens, M model dim, H expert hidden, E experts, K top-k.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import Availability, MoELayerAdapter, MoEOutput, MoESystem, RoutingStats, grad_of

EXPERT_IMPLEMENTATIONS = ("grouped_mm", "eager")
BLOCKS = ("auto", "mixtral", "qwen3_moe")


def resolve_block(shape: LayerShape, block: str) -> str:
    """"auto": Mixtral's block for the classic shapes it was written for (at most 8 experts, top-k > 1,
    renormalised), Qwen3-MoE's for everything else (fine-grained, top-1, not renormalised)."""
    if block != "auto":
        return block
    classic = shape.num_experts <= 8 and shape.top_k > 1 and shape.renormalize
    return "mixtral" if classic else "qwen3_moe"


def block_config(shape: LayerShape, block: str, experts: str):
    if block == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(hidden_size=shape.model_dim, intermediate_size=shape.ffn_dim,
                             num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                             router_jitter_noise=0.0, hidden_act="silu", experts_implementation=experts)
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=shape.model_dim, moe_intermediate_size=shape.ffn_dim,
                          num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                          norm_topk_prob=shape.renormalize and shape.top_k > 1, hidden_act="silu",
                          experts_implementation=experts)


def _build_block(shape: LayerShape, block: str, experts: str) -> torch.nn.Module:
    config = block_config(shape, block, experts)
    if block == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        return MixtralSparseMoeBlock(config)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return Qwen3MoeSparseMoeBlock(config)


class HFTransformersLayer(MoELayerAdapter):
    fp64_computed_in_fp32 = "transformers' router takes its softmax in fp32 whatever the input dtype"

    def __init__(self, shape: LayerShape, knobs: MoEKnobs):
        super().__init__()
        self.shape, self.knobs = shape, knobs
        self.block_kind = resolve_block(shape, knobs.options.get("block", "auto"))
        self.experts_kind = knobs.options.get("experts", "grouped_mm")
        self.block = self.build_block().to(dtype=knobs.torch_dtype, device=knobs.device)
        self.block.train()
        self._routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits_TE, idx_TK) of the last forward
        self.block.gate.register_forward_hook(self._record_router)

    def build_block(self) -> torch.nn.Module:
        """The transformers block as shipped (a subclass may swap its experts for a drop-in)."""
        return _build_block(self.shape, self.block_kind, self.experts_kind)

    def _record_router(self, module, args, output):
        logits_TE, _scores_TK, idx_TK = output
        self._routed = (logits_TE, idx_TK)

    def load_canonical(self, weights: CanonicalWeights) -> None:
        weights = weights.to(dtype=self.knobs.torch_dtype, device=self.knobs.device)
        experts = self.block.experts
        with torch.no_grad():
            self.block.gate.weight.copy_(weights.gate_EM)
            experts.gate_up_proj.copy_(torch.cat([weights.w1_EHM, weights.w3_EHM], dim=1))
            experts.down_proj.copy_(weights.w2_EHM.transpose(1, 2))

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        """The block on [1, T, M] (its input is batch-first), then the causal-LM wrapper's aux loss."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        y_TM = self.block(x_TM.unsqueeze(0)).squeeze(0)
        logits_TE = self._routed[0]
        l_aux = load_balancing_loss_func((logits_TE,), self.shape.num_experts, self.shape.top_k)
        return MoEOutput(y_TM, l_aux)

    def routing_stats(self) -> RoutingStats:
        if self._routed is None:
            raise RuntimeError("routing_stats() called before the first forward")
        logits_TE, idx_TK = self._routed
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.shape.num_experts)
        probs_TE = torch.softmax(logits_TE.detach().float(), dim=-1)
        l_aux = self.shape.num_experts * float((probs_TE.mean(0) * counts_E / logits_TE.shape[0]).sum())
        return RoutingStats(tokens_per_expert=[int(c) for c in counts_E.tolist()], dropped=0, capacity=None,
                            l_aux=l_aux, expert_rows_computed=idx_TK.numel())

    def canonical_gradients(self) -> CanonicalWeights:
        experts, H = self.block.experts, self.shape.ffn_dim
        d_gate_up = grad_of(experts.gate_up_proj)
        return CanonicalWeights(gate_EM=grad_of(self.block.gate.weight), w1_EHM=d_gate_up[:, :H].contiguous(),
                                w3_EHM=d_gate_up[:, H:].contiguous(),
                                w2_EHM=grad_of(experts.down_proj).transpose(1, 2).contiguous())

    def aux_loss_mismatch(self) -> str:
        if self.shape.top_k == 1:
            return ""
        return "transformers' load-balancing loss counts all k choices per expert (GShard's counts first choices)"

    def reference_policy(self):
        from systems.base import ReferencePolicy

        note = "transformers' blocks have no capacity: every choice is computed"
        if self.knobs.capacity_factor is not None:
            note += f" (the workload's cf {self.knobs.capacity_factor:g} does not apply)"
        return ReferencePolicy(dropless=True, note=note, router_precision="float32_scores")


class HFTransformers(MoESystem):
    name = "hf_transformers"
    description = "Hugging Face transformers' Mixtral / Qwen3-MoE sparse blocks (grouped_mm or eager experts)"
    expert_parallel = False
    options: ClassVar[dict[str, str]] = {
        "experts": "transformers' experts implementation: 'grouped_mm' (default) or 'eager' (loop over experts)",
        "block": "'auto' (Mixtral's block for <= 8 experts top-k > 1 renormalised, else Qwen3-MoE's), "
                 "'mixtral' or 'qwen3_moe'",
    }

    @classmethod
    def availability(cls) -> Availability:
        try:
            import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
        except ImportError as exc:
            return Availability.no(f"transformers is not importable: {exc}")
        return Availability.yes()

    def router_support(self, shape: LayerShape) -> str:
        if not shape.has_softmax_router:
            return (f"transformers' Mixtral / Qwen3-MoE routers are softmax top-k only; this workload's router is "
                    f"{shape.router_label()} (run it with router=softmax for the common softmax variant)")
        return ""

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        common = super().check_support(shape, knobs, parallel)
        if not common.ok:
            return common
        dropless = self.dropless_only("transformers' blocks", knobs)  # identical work or no comparison
        if not dropless.ok:
            return dropless
        experts = knobs.options.get("experts", "grouped_mm")
        if experts not in EXPERT_IMPLEMENTATIONS:
            return Availability.no(f"hf_transformers experts must be one of {', '.join(EXPERT_IMPLEMENTATIONS)}, "
                                   f"got {experts!r}")
        block = knobs.options.get("block", "auto")
        if block not in BLOCKS:
            return Availability.no(f"hf_transformers block must be one of {', '.join(BLOCKS)}, got {block!r}")
        if shape.activation != "swiglu" or shape.expert_bias:
            return Availability.no("transformers' Mixtral / Qwen3-MoE experts are SwiGLU without biases; this "
                                   f"workload's experts are {shape.activation}"
                                   + (" with biases" if shape.expert_bias else ""))
        kind = resolve_block(shape, block)
        if kind == "mixtral" and not (shape.renormalize and shape.top_k > 1):
            return Availability.no("Mixtral's block always divides the top-k gate values by their sum (for top-1 "
                                   "too); this workload does not: use block=qwen3_moe")
        if experts == "grouped_mm":
            if knobs.dtype == "float64":
                return Availability.no("torch's grouped_mm has no float64 kernel; use experts=eager for fp64")
            per_16_bytes = 16 // torch.empty((), dtype=knobs.torch_dtype).element_size()
            if shape.model_dim % per_16_bytes or shape.ffn_dim % per_16_bytes:
                return Availability.no(f"torch's grouped_mm needs 16-byte aligned rows: model and expert widths "
                                       f"multiples of {per_16_bytes} in {knobs.dtype} (got M {shape.model_dim}, "
                                       f"H {shape.ffn_dim}); use experts=eager")
        return Availability.yes()

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return HFTransformersLayer(shape, knobs)
