"""What one training iteration of a whole MoE transformer costs on a testbed, under a parallel layout.

Why: paper tables report iterations of whole models on clusters (FSMoE's
Table, Megatron-Core's TFLOP/s), not single layers. This module puts the
layer model (layer.py) inside a transformer and a layout: attention and
dense FFNs around the MoE layers, tensor, expert, data and pipeline
parallelism, the 1F1B pipeline bubble, the gradient synchronisation and the
optimizer step. First-order, as the layer model is; each constant that is
an assumption is named below and in docs/performance-model.md.

Legend, per rank and micro-batch: T tokens (micro-batch x sequence), S
sequence, M model width, F dense FFN width, V vocabulary, L layers, tp/ep/
pp/dp the parallel degrees (dp = world / (tp x pp); EP is a subgroup of DP,
as in Megatron-Core), v virtual stages per pipeline rank, m micro-batches
per iteration, b bytes per element.

Per layer, forward (backward: GEMMs twice, memory-bound passes once more):
  attention   Q/K/V/O projections, GEMMs [T, (M + 2 x kv)/tp, M] and [T, M/tp, M];
              the core, 2 x 2 x T x S x M / tp FLOPs, halved for the causal mask
              (flash attention skips the masked blocks)
  elementwise ELEMENTWISE_PASSES passes over T x M / tp (norms, residuals, rotary)
  tp comm     with tp > 1: 2 all-reduces of T x M x b forward, 2 backward
  ffn         dense layers: g GEMMs [T, F/tp, M]; MoE layers: layer.predict_layer
              with T / tp tokens per rank (sequence parallel), experts not tensor-split
Per micro-batch: the embedding (a gather) on the first stage, the LM head GEMM
[T, V/tp, M] and cross-entropy on the last; pipeline sends of T x M x b / tp
between stages, forward and backward, once per virtual stage.

Iteration:
  pipeline    (m + (pp - 1) / v) x the slowest stage's micro-batch time (1F1B;
              interleaved when v > 1); pp = 1: m x the micro-batch time
  grad sync   dense gradients all-reduced over dp ranks, expert gradients over
              dp / ep ranks (grad_bytes each: 4 where fp32 main gradients are
              reduced); exposed in full after the backward pass, or hidden behind
              the last micro-batch's backward compute where the system overlaps it
              (GRAD_SYNC below)
  optimizer   Adam, memory-bound: OPTIMIZER_BYTES_PER_PARAM per local parameter,
              divided by dp where the optimizer is distributed
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from harness.perfmodel.layer import LayerPrediction, predict_layer, traits_of
from harness.perfmodel.testbed import DTYPE_BYTES, Testbed, TestbedError
from harness.perfmodel.trials import layer_case

# Assumptions (docs/performance-model.md):
ELEMENTWISE_PASSES = 12  # per layer forward over T x M: 2 norms (read+write) 4, 2 residual adds 6, rotary 2
BLOCK_CALLS = 14  # op calls per transformer block outside the FFN, forward (kernel launches / dispatches)
CAUSAL_FRACTION = 0.5  # flash attention computes about half of the S x S blocks under a causal mask
OPTIMIZER_BYTES_PER_PARAM = 28  # Adam on fp32 master weights: read weight, grad, m, v; write weight, m, v (4 B each)
ACTIVATION_BYTES_ATTENTION = 15  # per token and model-width element, 16-bit, flash attention: Korthikanti et al. 2022

# How each system places its gradient all-reduce: "after_backward" (exposed in full), "overlapped"
# (launched in buckets as gradients appear; Megatron's --overlap-grad-reduce), "partitioned" (FSMoE:
# split into the backward pass's idle gaps). Systems not named here: after_backward. The option
# `grad_sync` overrides it per call (fsmoe_native takes the same option name).
GRAD_SYNCS = ("after_backward", "overlapped", "partitioned")
GRAD_SYNC = {"megatron_core": "overlapped", "fsmoe_native": "partitioned"}


@dataclass(frozen=True)
class Layout:
    """How a model is laid over the ranks of one iteration."""

    world: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    micro_batches: int = 1  # per data-parallel replica per iteration
    micro_batch_size: int | None = None  # sequences per micro-batch; None: the workload's batch size
    distributed_optimizer: bool = False  # optimizer states sharded over data-parallel ranks
    grad_bytes: int | None = None  # bytes per reduced gradient element; None: the dtype's

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def validate(self, workload, testbed: Testbed) -> None:
        """One line naming the first thing that makes this layout impossible."""
        model = workload.model
        for name in ("world", "tp", "ep", "pp", "vpp", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TestbedError(f"layout: {name} must be a positive integer, got {value!r}")
        if self.world > testbed.devices:
            raise TestbedError(f"layout: {self.world} ranks do not fit testbed {testbed.name} ({testbed.devices} devices)")
        if self.world % (self.tp * self.pp):
            raise TestbedError(f"layout: world {self.world} is not divisible by tp x pp = {self.tp * self.pp}")
        if self.dp % self.ep:
            raise TestbedError(f"layout: ep {self.ep} does not divide the {self.dp} data-parallel ranks "
                               f"(world / (tp x pp)); expert parallelism runs inside data parallelism")
        experts = workload.layer.num_experts
        if experts % self.ep and self.ep % experts:
            raise TestbedError(f"layout: ep {self.ep} and {experts} experts: one must divide the other")
        if model.n_layers % (self.pp * self.vpp):
            raise TestbedError(f"layout: {model.n_layers} layers do not split into pp x vpp = "
                               f"{self.pp * self.vpp} equal stages")
        if self.vpp > 1 and self.pp == 1:
            raise TestbedError("layout: vpp > 1 needs pp > 1 (virtual stages interleave a pipeline)")
        if model.n_heads % self.tp or model.n_kv_heads % self.tp:
            raise TestbedError(f"layout: tp {self.tp} does not divide the {model.n_heads} heads and "
                               f"{model.n_kv_heads} KV heads")
        if self.pp > 1 and self.micro_batches < self.pp:
            raise TestbedError(f"layout: {self.micro_batches} micro-batches cannot fill a {self.pp}-stage pipeline "
                               f"(1F1B needs at least pp)")


@dataclass
class IterationPrediction:
    total_s: float
    phases_s: dict[str, float]  # per iteration on the slowest pipeline stage
    micro_batch_s: float  # the slowest stage's forward+backward of one micro-batch
    exposed_comm_s: float  # per iteration: MoE exposed communication, tp and pipeline sends, exposed grad sync
    moe: LayerPrediction | None
    notes: list[str] = field(default_factory=list)


def _moe_layer_indices(workload) -> set[int]:
    return set(workload.model.moe_block_indices())


def parameter_counts(workload, layout: Layout) -> dict[str, float]:
    """Parameters per rank on the first pipeline stage (the embedding's), dense and expert."""
    layer, model = workload.layer, workload.model
    M, g = layer.model_dim, layer.gemms_per_expert
    kv = model.n_kv_heads * (M // model.n_heads)
    attention = (2 * M * M + 2 * M * kv) / layout.tp + 2 * M  # Q, O, K, V; two norms
    dense_ffn = g * M * (model.dense_ffn_dim or layer.ffn_dim) / layout.tp
    expert = g * M * layer.ffn_dim
    local_experts = layer.num_experts / layout.ep  # fractional: an expert sharded over ep / E ranks
    shared = g * M * layer.shared_ffn_dim / layout.tp
    per_stage = model.n_layers // layout.pp
    moe_layers = _moe_layer_indices(workload)
    stage_layers = range(per_stage)  # the first stage's layers (with vpp, the same count)
    n_moe = sum(1 for i in stage_layers if i in moe_layers)
    n_dense = per_stage - n_moe
    dense = per_stage * attention + n_dense * dense_ffn + n_moe * (shared + M * layer.num_experts)
    dense += model.vocab_size * M / layout.tp  # the embedding (the head's on the last stage; untied)
    return {"dense": dense, "expert": n_moe * local_experts * expert}


def stage_layers(workload, layout: Layout) -> tuple[int, int]:
    """(MoE layers, dense-FFN layers) on the slowest stage: the most MoE layers any stage holds."""
    per_stage = workload.model.n_layers // layout.pp
    moe = sorted(_moe_layer_indices(workload))
    most = max(sum(1 for i in moe if s * per_stage <= i < (s + 1) * per_stage) for s in range(layout.pp))
    return most, per_stage - most


def predict_iteration(testbed: Testbed, workload, system: str, layout: Layout, dtype: str = "bfloat16",
                      options: dict | None = None, other_scale: float = 1.0,
                      threads: int | None = None) -> IterationPrediction:
    """One iteration (m micro-batches, gradient sync, optimizer step) on the slowest stage.

    other_scale multiplies every non-MoE compute phase (attention, dense FFNs, head, optimizer).
    threads: per rank on a CPU testbed, whose ranks share its cores (Testbed.compute_share).
    """
    layout.validate(workload, testbed)
    traits_of(system)
    if dtype not in DTYPE_BYTES:
        raise TestbedError(f"dtype {dtype!r}: the model knows {', '.join(DTYPE_BYTES)}")
    layer, model = workload.layer, workload.model
    b = DTYPE_BYTES[dtype]
    M, S, V, g = layer.model_dim, workload.seq_len, model.vocab_size, layer.gemms_per_expert
    mbs = layout.micro_batch_size or workload.batch_size
    T = mbs * S
    tp = layout.tp
    share = testbed.compute_share(min(layout.world, testbed.devices_per_node), threads)
    per_call = testbed.per_call_s / share
    bandwidth = testbed.memory_bandwidth.value * share

    def rate(shape: tuple[int, int, int]) -> float:
        return testbed.gemm_flops(dtype, shape, threads=threads) * share

    def gemm_s(m: int, n: float, k: int) -> float:
        n = max(1, int(n))
        return per_call + 2 * m * n * k / rate((m, n, k))

    kv = model.n_kv_heads * (M // model.n_heads)
    # forward + backward of one layer's parts (backward: GEMMs 2x, memory-bound passes 1x)
    attention = 3 * (gemm_s(T, (M + 2 * kv) / tp, M) + gemm_s(T, M / tp, M))
    core_flops = 2 * 2 * mbs * S * S * M / tp * CAUSAL_FRACTION
    attention += 3 * core_flops / rate((S, S, M // model.n_heads))
    attention += 2 * (ELEMENTWISE_PASSES * T * M * b / tp / bandwidth + BLOCK_CALLS * per_call)
    tp_comm = 4 * testbed.collective_seconds("all_reduce", T * M * b, tp) if tp > 1 else 0.0
    dense_ffn = 3 * g * gemm_s(T, (model.dense_ffn_dim or layer.ffn_dim) / tp, M)

    moe_case = layer_case(system, layer, max(1, T // tp), workload.capacity_factor, dtype, layout.ep,
                          options or {}, threads=threads)
    moe = predict_layer(testbed, moe_case)
    n_moe, n_dense = stage_layers(workload, layout)
    per_stage = n_moe + n_dense

    head = 3 * gemm_s(T, V / tp, M) + 3 * T * V / tp * 4 / bandwidth  # logits GEMM; fp32 softmax / loss passes
    embedding = 2 * T * M * b / bandwidth + 2 * per_call
    ends = head + embedding if layout.pp == 1 else max(head, embedding)

    pp_send = 0.0
    if layout.pp > 1:  # adjacent stages: on other nodes once a stage fills a node (pp is the outer dimension)
        scope_ranks = layout.world // layout.pp
        crossing = 2 if scope_ranks < testbed.devices_per_node else testbed.devices_per_node + 1
        cost = testbed.collective("all_gather", crossing)
        send = cost.latency_s.value + T * M * b / tp / cost.bus_bandwidth_bytes_per_s.value
        pp_send = 2 * layout.vpp * send

    compute = {
        "attention": other_scale * per_stage * attention,
        "dense ffn": other_scale * n_dense * dense_ffn,
        "moe layers": n_moe * moe.total_s,
        "embedding and head": other_scale * ends,
    }
    comm = {"tensor-parallel all-reduce": per_stage * tp_comm, "pipeline sends": pp_send}
    micro = sum(compute.values()) + sum(comm.values())
    m, p, v = layout.micro_batches, layout.pp, layout.vpp
    bubble = (p - 1) / v * micro
    phases = {name: m * seconds for name, seconds in {**compute, **comm}.items()}
    phases["pipeline bubble"] = bubble

    params = parameter_counts(workload, layout)
    grad_bytes = layout.grad_bytes or b
    edp = max(1, layout.dp // layout.ep)
    sync = (testbed.collective_seconds("all_reduce", params["dense"] * grad_bytes, layout.dp)
            + testbed.collective_seconds("all_reduce", params["expert"] * grad_bytes, edp))
    placement = (options or {}).get("grad_sync") or GRAD_SYNC.get(system, "after_backward")
    if placement not in GRAD_SYNCS:
        raise TestbedError(f"grad_sync {placement!r}: the model knows {', '.join(GRAD_SYNCS)}")
    if placement == "after_backward" or not testbed.overlaps_communication:
        hidden = 0.0
    else:  # behind the last micro-batch's backward compute that is not itself waiting on communication
        backward_compute = (2 / 3) * (micro - sum(comm.values()) - n_moe * moe.exposed_comm_s)
        hidden = min(sync, max(0.0, backward_compute))
    phases["gradient sync (exposed)"] = sync - hidden
    shard = layout.dp if layout.distributed_optimizer else 1
    local = params["dense"] / shard + params["expert"] / (edp if layout.distributed_optimizer else 1)
    phases["optimizer"] = other_scale * (local * OPTIMIZER_BYTES_PER_PARAM / bandwidth + per_call)

    exposed = m * (n_moe * moe.exposed_comm_s + sum(comm.values())) + (sync - hidden)
    notes = list(moe.notes) + [f"gradient sync: {placement}" + ("" if testbed.overlaps_communication
                                                                  else " (no overlap on shared cores)")]
    return IterationPrediction(total_s=sum(phases.values()), phases_s=phases, micro_batch_s=micro,
                               exposed_comm_s=exposed, moe=moe, notes=notes)


def model_flops_per_iteration(workload, layout: Layout) -> float:
    """Useful model FLOPs of one iteration over all ranks (harness/flops.py's counting: forward + backward,
    full S x S attention, k experts per token, LM head): what a TFLOP/s-per-GPU figure divides by."""
    from harness.flops import attention_flops, dense_ffn_flops, lm_head_flops

    mbs = layout.micro_batch_size or workload.batch_size
    micro = replace(workload, batch_size=mbs)
    layer, model = workload.layer, workload.model
    T = micro.tokens_per_step
    n_moe = model.n_moe_blocks
    moe = n_moe * 3 * T * layer.top_k * 2 * layer.gemms_per_expert * layer.model_dim * layer.ffn_dim
    moe += n_moe * 3 * 2 * T * layer.model_dim * layer.num_experts  # the router GEMM
    if layer.shared_ffn_dim:
        moe += n_moe * 3 * 2 * layer.gemms_per_expert * T * layer.model_dim * layer.shared_ffn_dim
    per_micro = (attention_flops(micro, "train") * model.n_layers
                 + dense_ffn_flops(micro, "train") * (model.n_layers - n_moe) + lm_head_flops(micro, "train") + moe)
    replicas = layout.dp  # each data-parallel replica runs m micro-batches of its own
    return per_micro * layout.micro_batches * replicas
