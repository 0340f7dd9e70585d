"""Analytical FLOP counts per step, so times can be read as achieved TFLOP/s.

Source: docs/workloads-and-papers.md, "Analytical model": expert FLOPs
forward ``2*g*M*F*T*k*f`` (g GEMMs per expert: 2 GELU/ReLU, 3 SwiGLU; F is the
expert hidden size, written H here), backward twice the forward.

Two counts, because capacity-padded and dropless systems do different work
for the same tokens:

* useful   = T*k routing choices (kept or not) x 2*g*M*H -- the work the model
             asks for, the same for every system;
* executed = rows the expert GEMMs actually computed (RoutingStats
             .expert_rows_computed: E*C for padded systems, kept choices for
             dropless ones) x 2*g*M*H.

forward_backward and train count forward + backward = 3x forward. The
optimizer step and element-wise work (norms, activations, softmax) are not
counted; neither is the gate GEMM (2*T*M*E, under 1% for these shapes).
"""
from __future__ import annotations

from core.values import LayerShape

MODES = ("forward", "forward_backward", "train")
BACKWARD_FACTOR = 2  # backward = 2x forward (input and weight gradients)


def mode_multiplier(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return 1 if mode == "forward" else 1 + BACKWARD_FACTOR


def expert_row_flops(shape: LayerShape) -> int:
    """Forward FLOPs of one token row through one expert: g GEMMs of M x H, 2 FLOPs per multiply-add."""
    return 2 * shape.gemms_per_expert * shape.model_dim * shape.ffn_dim


def executed_rows(routing: dict | None) -> tuple[int | None, str]:
    """Rows the expert GEMMs computed and where the figure came from.

    Prefers the adapter's expert_rows_computed; without it, the kept choices
    (sum(tokens_per_expert) - dropped) are a lower bound and are labelled so.
    """
    routing = routing or {}
    rows = routing.get("expert_rows_computed")
    if rows is not None:
        return int(rows), "expert_rows_computed"
    if routing.get("tokens_per_expert") is not None:
        return int(sum(routing["tokens_per_expert"]) - (routing.get("dropped") or 0)), "kept choices (lower bound)"
    return None, "unknown"


def layer_flops(shape: LayerShape, num_tokens: int, routing: dict | None, mode: str) -> dict:
    """{"executed", "useful"} FLOPs of one MoE layer's expert GEMMs for num_tokens tokens, one step.

    executed is None when the routing statistics give no row count.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    per_row = expert_row_flops(shape) * mode_multiplier(mode)
    rows, source = executed_rows(routing)
    return {
        "executed": None if rows is None else float(rows * per_row),
        "useful": float(num_tokens * shape.top_k * per_row),
        "executed_source": source,
    }


def attention_flops(workload, mode: str) -> float:
    """One transformer block's attention: Q/K/V/O projections (K and V with n_kv_heads) plus
    QK^T scores and the value matmul, each 2*B*S*S*M (full S x S; causal masking not discounted)."""
    model, M = workload.model, workload.layer.model_dim
    B, S = workload.batch_size, workload.seq_len
    T = B * S
    kv_dim = model.n_kv_heads * (M // model.n_heads)
    projections = 2 * T * M * M * 2 + 2 * T * M * kv_dim * 2  # Q and O: M x M; K and V: M x kv_dim
    scores_and_values = 2 * 2 * B * S * S * M
    return float((projections + scores_and_values) * mode_multiplier(mode))


def dense_ffn_flops(workload, mode: str) -> float:
    """One non-MoE block's FFN: same activation (so GEMM count) as the experts, hidden dense_ffn_dim."""
    layer = workload.layer
    hidden = workload.model.dense_ffn_dim or layer.ffn_dim
    return float(2 * layer.gemms_per_expert * layer.model_dim * hidden * workload.tokens_per_step
                 * mode_multiplier(mode))


def lm_head_flops(workload, mode: str) -> float:
    """Output projection to the vocabulary (2*T*M*V); the embedding lookup is a gather, 0 FLOPs."""
    return float(2 * workload.tokens_per_step * workload.layer.model_dim * workload.model.vocab_size
                 * mode_multiplier(mode))


def num_moe_layers(workload) -> int:
    """Blocks whose FFN is an MoE layer (after first_dense, one in every moe_every blocks)."""
    return workload.model.n_moe_blocks


def model_flops(workload, routing_per_layer: list[dict], mode: str) -> dict:
    """{"executed", "useful", breakdown...} FLOPs of one model step (per rank's tokens).

    routing_per_layer: one RoutingStats dict per MoE block, in order.
    executed is None when any MoE layer's row count is unknown.
    """
    n_moe = num_moe_layers(workload)
    if len(routing_per_layer) != n_moe:
        raise ValueError(f"expected routing stats for {n_moe} MoE layers, got {len(routing_per_layer)}")
    T = workload.tokens_per_step
    moe = [layer_flops(workload.layer, T, routing, mode) for routing in routing_per_layer]
    moe_useful = sum(f["useful"] for f in moe)
    moe_executed = None if any(f["executed"] is None for f in moe) else sum(f["executed"] for f in moe)
    attention = attention_flops(workload, mode) * workload.model.n_layers
    dense = dense_ffn_flops(workload, mode) * (workload.model.n_layers - n_moe)
    lm_head = lm_head_flops(workload, mode)
    shared = attention + dense + lm_head
    sources = sorted({f["executed_source"] for f in moe})
    return {
        "executed": None if moe_executed is None else moe_executed + shared,
        "useful": moe_useful + shared,
        "executed_source": ", ".join(sources),
        "breakdown": {"attention": attention, "dense_ffn": dense, "lm_head": lm_head,
                      "moe_useful": moe_useful, "moe_executed": moe_executed},
    }
