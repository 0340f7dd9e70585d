"""Megatron-Core's published Mixtral-8x7B throughput against the performance model.

Why this table: unlike FSMoE's, its testbed is documented. Megatron-Core's
MoE README (megatron/core/transformer/moe/README.md, MCore v0.9) reports
468 TFLOP/s per GPU for Mixtral-8x7B in bf16, and its reference mapping for
that model: 64 GPUs, dropless, all-to-all dispatcher, sequence 4096, TP 1,
EP 8, PP 4, VP 8, micro-batch 1, global batch 256, on 8 x H100 80GB nodes
with NVLink 4 and 8 x 400 Gb/s InfiniBand per node. Read together (the README
gives the figure and the mapping side by side, not as one measured row).

What the model assumes beyond that: the distributed optimizer and fp32 main
gradients (bf16 training in Megatron reduces fp32 gradients unless told
otherwise), 16 micro-batches per replica (256 / (micro-batch 1 x 16 data-parallel
replicas)), uniform routing (the README warns dropless runs are unbalanced for
the first hundreds of steps; the figure is for the trained regime), and the
testbed file testbeds/h100-cluster-8.toml. TFLOP/s per GPU counts the model's
useful FLOPs (harness/flops.py: forward + backward, full S x S attention, top-k
experts per token, LM head) over predicted time and GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from harness.perfmodel.iteration import IterationPrediction, Layout, model_flops_per_iteration, predict_iteration
from harness.perfmodel.model_memory import peak_memory_terms
from harness.perfmodel.testbed import load_testbed
from workloads.presets import FULL

PUBLISHED_TFLOPS = 468.0
TESTBEDS = ("h100-cluster-8",)
SEQ_LEN = 4096
LAYOUT = Layout(world=64, tp=1, ep=8, pp=4, vpp=8, micro_batches=16, micro_batch_size=1,
                distributed_optimizer=True, grad_bytes=4)


@dataclass
class MegatronRow:
    testbed: str
    prediction: IterationPrediction
    tflops_per_gpu: float
    memory_terms: dict[str, float]
    capacity_bytes: float

    @property
    def error(self) -> float:
        return self.tflops_per_gpu / PUBLISHED_TFLOPS - 1

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory_terms.values())


def workload():
    """Mixtral-8x7B as Megatron's reference run trains it: dropless, sequence 4096, micro-batch 1."""
    return replace(FULL["mixtral-8x7b"], seq_len=SEQ_LEN, batch_size=1, capacity_factor=None)


def modelled(testbed_name: str = TESTBEDS[0]) -> MegatronRow:
    testbed = load_testbed(testbed_name)
    w = workload()
    prediction = predict_iteration(testbed, w, "megatron_core", LAYOUT, "bfloat16")
    tflops = model_flops_per_iteration(w, LAYOUT) / prediction.total_s / LAYOUT.world / 1e12
    return MegatronRow(testbed.name, prediction, tflops, peak_memory_terms(w, LAYOUT, "bfloat16", "megatron_core"),
                       testbed.memory_capacity.value)
