"""Full-size workloads, with the source of every figure.

Sources (see docs/workloads-and-papers.md):
[mixtral-7b-card]  Mixtral-8x7B config.json: 32 layers, hidden 4096, FFN 14336
                   (SwiGLU), 32 heads / 8 KV heads, vocab 32000, 8 experts top-2.
[mixtral-22b-card] Mixtral-8x22B config.json: 56 layers, hidden 6144, FFN 16384
                   (SwiGLU), 48 heads / 8 KV heads, vocab 32768, 8 experts top-2.
[gpt2-xl-card]     GPT-2 XL: 48 layers, hidden 1600, 25 heads, FFN 4x = 6400
                   GELU, vocab 50257, context 1024.
[fsmoe-code]       FSMoE (ASPLOS'25, arXiv 2501.10714) public code's defaults:
                   batch 4, sequence 1024, capacity factor 1.2, top-2.
[qwen3-30b-card]   Qwen/Qwen3-30B-A3B config.json: hidden_size 2048,
                   moe_intermediate_size 768, num_experts 128, num_experts_per_tok
                   8, norm_topk_prob true, 48 layers (decoder_sparse_step 1, no
                   dense layers), 32 attention / 4 KV heads, head_dim 128, vocab
                   151936, SwiGLU, RMSNorm; no shared expert.
[olmoe-card]       allenai/OLMoE-1B-7B-0924 config.json: hidden_size 2048,
                   intermediate_size 1024, num_experts 64, num_experts_per_tok 8,
                   norm_topk_prob false, 16 layers, 16 / 16 heads, vocab 50304,
                   SwiGLU, RMSNorm.
[deepseek-v3-card] deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json:
                   dim 7168, inter_dim 18432 (dense layers), moe_inter_dim 2048,
                   n_routed_experts 256, n_shared_experts 1, n_activated_experts
                   8, n_expert_groups 8, n_limited_groups 4, route_scale 2.5,
                   score_func sigmoid, 61 layers of which n_dense_layers 3, 128
                   heads, vocab 129280; the aux-loss-free bias and sigmoid
                   gates normalised over the chosen 8 (arXiv 2412.19437, 2.1.2).

Approximations at model level, because moebench's transformer has one attention
kind: Qwen3's explicit head_dim 128 (4096-wide attention on a 2048 model) and
DeepSeek-V3's multi-head latent attention are modelled as plain attention with
head_dim = hidden / heads. The MoE layers, which are what the systems
implement, are exact. All three are dropless models (capacity_factor None).

Assumed, because no public source gives it: the MoE variant of GPT2-XL
(FSMoE's table does not say). We take the common GShard/DeepSpeed-MoE
convention: every other FFN replaced by an MoE layer (24 of 48), 8 experts,
top-2, each expert a copy of GPT-2's 4x GELU FFN. Batch and sequence for all
three follow FSMoE's code defaults (4 x 1024 tokens per GPU per step).
"""
from __future__ import annotations

from core.values import LayerShape
from workloads.spec import ModelShape, Workload

FSMOE_BATCH, FSMOE_SEQ, FSMOE_CF = 4, 1024, 1.2  # [fsmoe-code]

FULL: dict[str, Workload] = {
    "gpt2-xl-moe": Workload(
        name="gpt2-xl-moe",
        flavor="full",
        layer=LayerShape(model_dim=1600, ffn_dim=6400, num_experts=8, top_k=2, activation="gelu"),
        model=ModelShape(n_layers=48, n_heads=25, n_kv_heads=25, vocab_size=50257, moe_every=2, norm="layernorm"),
        batch_size=FSMOE_BATCH,
        seq_len=FSMOE_SEQ,
        capacity_factor=FSMOE_CF,
        notes="ASSUMED MoE variant: MoE every other layer, 8 experts, top-2 (no public source).",
        sources={"dims": "gpt2-xl-card", "batch/seq/cf": "fsmoe-code", "moe variant": "assumed"},
    ),
    "mixtral-8x7b": Workload(
        name="mixtral-8x7b",
        flavor="full",
        layer=LayerShape(model_dim=4096, ffn_dim=14336, num_experts=8, top_k=2, activation="swiglu"),
        model=ModelShape(n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, moe_every=1, norm="rmsnorm"),
        batch_size=FSMOE_BATCH,
        seq_len=FSMOE_SEQ,
        capacity_factor=FSMOE_CF,
        sources={"dims": "mixtral-7b-card", "batch/seq/cf": "fsmoe-code"},
    ),
    "mixtral-8x22b": Workload(
        name="mixtral-8x22b",
        flavor="full",
        layer=LayerShape(model_dim=6144, ffn_dim=16384, num_experts=8, top_k=2, activation="swiglu"),
        model=ModelShape(n_layers=56, n_heads=48, n_kv_heads=8, vocab_size=32768, moe_every=1, norm="rmsnorm"),
        batch_size=FSMOE_BATCH,
        seq_len=FSMOE_SEQ,
        capacity_factor=FSMOE_CF,
        sources={"dims": "mixtral-22b-card", "batch/seq/cf": "fsmoe-code"},
    ),
    # The fine-grained MoEs: many small experts, top-8. Batch and sequence as for the others.
    "qwen3-30b-a3b": Workload(
        name="qwen3-30b-a3b",
        flavor="full",
        layer=LayerShape(model_dim=2048, ffn_dim=768, num_experts=128, top_k=8, activation="swiglu",
                         score="softmax", renormalize=True),
        model=ModelShape(n_layers=48, n_heads=32, n_kv_heads=4, vocab_size=151936, moe_every=1, norm="rmsnorm"),
        batch_size=FSMOE_BATCH,
        seq_len=FSMOE_SEQ,
        capacity_factor=None,
        notes="attention approximated (head_dim = hidden / heads, not Qwen3's 128)",
        sources={"dims/router": "qwen3-30b-card", "batch/seq": "fsmoe-code"},
    ),
    "olmoe-1b-7b": Workload(
        name="olmoe-1b-7b",
        flavor="full",
        layer=LayerShape(model_dim=2048, ffn_dim=1024, num_experts=64, top_k=8, activation="swiglu",
                         score="softmax", renormalize=False),
        model=ModelShape(n_layers=16, n_heads=16, n_kv_heads=16, vocab_size=50304, moe_every=1, norm="rmsnorm"),
        batch_size=FSMOE_BATCH,
        seq_len=FSMOE_SEQ,
        capacity_factor=None,
        sources={"dims/router": "olmoe-card", "batch/seq": "fsmoe-code"},
    ),
    "deepseek-v3": Workload(
        name="deepseek-v3",
        flavor="full",
        layer=LayerShape(model_dim=7168, ffn_dim=2048, num_experts=256, top_k=8, activation="swiglu",
                         score="sigmoid", renormalize=True, score_bias=True, n_groups=8, topk_groups=4,
                         route_scale=2.5, shared_ffn_dim=2048),
        model=ModelShape(n_layers=61, n_heads=128, n_kv_heads=128, vocab_size=129280, moe_every=1, norm="rmsnorm",
                         dense_ffn_dim=18432, first_dense=3),
        batch_size=FSMOE_BATCH,
        seq_len=FSMOE_SEQ,
        capacity_factor=None,
        notes="attention approximated (plain multi-head, not multi-head latent attention)",
        sources={"dims/router/shared": "deepseek-v3-card", "batch/seq": "fsmoe-code"},
    ),
}

# The fine-grained presets (many small experts): the sweep runs each under its declared router
# and under the common softmax router.
FINE_GRAINED = ("qwen3-30b-a3b", "deepseek-v3", "olmoe-1b-7b")
