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
}
