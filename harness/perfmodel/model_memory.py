"""Peak memory per device of a whole model under a layout: what decides whether a paper's layout fits.

Why its own estimate: the memory guard (harness/memory_guard.py) sizes the
harness's own trials (one process, layer or model level, no pipeline). At a
paper's scale what matters is how parameters, gradients and optimizer states
split over tensor, expert, pipeline and data parallelism, and how many
micro-batches' activations the first pipeline stage holds under 1F1B.

Terms, per device, first pipeline stage (the one holding most activations):
  weights      local parameters x b
  gradients    local parameters x grad_bytes (4 where fp32 main gradients are kept)
  optimizer    Adam: m and v (8 B) plus an fp32 master copy (4 B) when training in 16 bits,
               divided by dp (dense) and dp / ep (experts) with a distributed optimizer
  activations  per layer and micro-batch: attention 15 x T x M / tp x b / 2 bytes (flash attention, no
               S x S scores; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
               Transformer Models", their 11 sbh for attention plus 4 sbh for the norms), and the FFN:
               dense (T x M + g x T x F / tp) x b; MoE (2 x R x M + g x R x H) x b + 4 x T x E (dispatched and
               combined rows, the expert projections, fp32 router scores), R the rows this rank sends;
               times the micro-batches in flight: min(m, pp), x (1 + (pp - 1) / (pp x v)) interleaved
  head         pp = 1: fp32 logits and their gradient, 2 x T x V / tp x 4
"""
from __future__ import annotations

from harness.perfmodel.iteration import ACTIVATION_BYTES_ATTENTION, Layout, stage_layers, parameter_counts
from harness.perfmodel.layer import traits_of
from harness.perfmodel.testbed import DTYPE_BYTES
from harness.perfmodel.trials import layer_case


def peak_memory_terms(workload, layout: Layout, dtype: str, system: str) -> dict[str, float]:
    """Bytes per device by term (module docstring)."""
    layer, model = workload.layer, workload.model
    b = DTYPE_BYTES[dtype]
    params = parameter_counts(workload, layout)
    local = params["dense"] + params["expert"]
    grad_bytes = layout.grad_bytes or b
    edp = max(1, layout.dp // layout.ep)
    state = 8 + (4 if b < 4 else 0)
    if layout.distributed_optimizer:
        optimizer = state * (params["dense"] / layout.dp + params["expert"] / edp)
    else:
        optimizer = state * local

    mbs = layout.micro_batch_size or workload.batch_size
    T = mbs * workload.seq_len
    M, H, E, g, tp = layer.model_dim, layer.ffn_dim, layer.num_experts, layer.gemms_per_expert, layout.tp
    tokens = max(1, T // tp)
    rows = layer_case(system, layer, tokens, workload.capacity_factor, dtype, layout.ep, {}, None) \
        .rows_sent(traits_of(system))
    attention = ACTIVATION_BYTES_ATTENTION * T * M / tp * b / 2
    dense_ffn = (T * M + g * T * (model.dense_ffn_dim or H) / tp) * b
    moe = (2 * rows * M + g * rows * H) * b + 4 * tokens * E
    n_moe, n_dense = stage_layers(workload, layout)
    per_micro = (n_moe + n_dense) * attention + n_dense * dense_ffn + n_moe * moe
    p, v = layout.pp, layout.vpp
    in_flight = min(layout.micro_batches, p) * ((1 + (p - 1) / (p * v)) if v > 1 else 1)
    head = 2 * T * model.vocab_size / tp * 4 if p == 1 else 0.0
    return {"weights": local * b, "gradients": local * grad_bytes, "optimizer": optimizer,
            "activations": per_micro * in_flight, "head": head}


def peak_memory_bytes(workload, layout: Layout, dtype: str, system: str) -> float:
    return sum(peak_memory_terms(workload, layout, dtype, system).values())
