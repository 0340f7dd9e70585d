"""What one MoE layer's forward+backward step costs on a testbed, under each system's schedule.

Why: to predict the time of trials nobody can run here (a paper's GPU
cluster) from the same description of the work the harness measures, and to
check the prediction against the trials we can run. First-order on purpose:
every op is ``calls x per-call overhead + work / rate``; what each system
does differently is which rows its experts compute, how many calls it makes,
and whether communication overlaps the expert GEMMs.

Legend (per rank, one layer): T tokens, E experts (E_l on this rank), k top-k,
M model width, H expert width, S shared-expert width, g GEMMs per expert (3
SwiGLU, 2 otherwise), C capacity per expert, R rows this rank sends (E x C
padded, or T x k live), es expert-sharding degree, b bytes per element.

Ops, forward (backward: GEMMs twice, data and weight gradients; memory ops
twice; the same two all-to-alls):
  gate      GEMM [T, M] x [M, E]
  route     softmax / sigmoid and top-k over [T, E] (memory-bound)
  encode    gather T x M into R x M rows (memory-bound)
  dispatch  all-to-all of R x M x b bytes (ep > 1)
  experts   g GEMMs of rows x M x H per local expert (batched: g calls; per expert: g x E_l calls)
  combine   all-to-all of R x M x b bytes (ep > 1)
  decode    weighted scatter of R x M rows back into T x M (memory-bound)
  shared    g dense GEMMs [T, M] x [M, S] (workloads with a shared expert)
  loop      per-expert systems: their other ops per expert (SystemTraits.loop_ops), forward and backward

Schedules: ``sequential`` sums everything (DeepSpeed-MoE, Megatron-Core's
all-to-all dispatcher, transformers, torchtitan, the reference); ``tutel``
pipelines dispatch -> experts -> combine in d chunks, one d for both
directions (given; the best of {1, 2, 4, 8} when its tuner runs; else 1);
``fsmoe`` chooses d separately per direction by its own cost model. The
pipelined part uses fsmoe_native's overlap model (systems/fsmoe_native/
schedule.py), fed with the testbed's costs instead of profiled ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.perfmodel.testbed import DTYPE_BYTES, Testbed
from systems.fsmoe_native.schedule import (DEGREES, AlphaBeta, LayerWork, Profile, choose_degree, chunk_times,
                                           pipelined_ms)



@dataclass(frozen=True)
class SystemTraits:
    """What the model needs to know of a system: rows its experts compute, GEMM calls, schedule."""

    rows: str  # "capacity" (padded E x C) | "live" (the T x k routed rows)
    gemm_calls: str  # "batched" (one call per projection) | "per_expert"
    schedule: str  # "sequential" | "tutel" | "fsmoe"
    # Per-expert loops: the non-GEMM ops (and module calls) each expert's iteration runs forward, read
    # from the system's code; each also has a backward node. Batched systems: 0.
    loop_ops: int = 0


SYSTEMS = {
    "tutel_native": SystemTraits("live", "batched", "tutel"),
    "tutel": SystemTraits("capacity", "batched", "tutel"),
    "fsmoe_native": SystemTraits("capacity", "batched", "fsmoe"),
    # DeepSpeed's Experts.forward: the expert module's call, SiLU, the SwiGLU product
    "deepspeed_moe": SystemTraits("capacity", "per_expert", "sequential", loop_ops=3),
    # Megatron-Core's SequentialMLP: the MLP, fc1 and fc2 module calls; chunk, SiLU, offset add, product
    "megatron_core": SystemTraits("live", "per_expert", "sequential", loop_ops=7),
    # torch_reference's loop: ==, &, nonzero, row gather, SiLU, product, gate gather, gate product, index_add_
    "torch_reference": SystemTraits("live", "per_expert", "sequential", loop_ops=9),
    "hf_transformers": SystemTraits("live", "batched", "sequential"),
    "torchtitan": SystemTraits("live", "batched", "sequential"),
}


@dataclass(frozen=True)
class LayerCase:
    """One layer trial as the model sees it."""

    system: str
    tokens: int  # per rank
    model_dim: int
    ffn_dim: int
    num_experts: int
    top_k: int
    gemms_per_expert: int
    capacity_factor: float | None  # None: dropless
    shared_ffn_dim: int = 0
    dtype: str = "float32"
    ep: int = 1
    threads: int | None = None  # per rank, CPU testbeds
    overlap_degree: int | None = None  # tutel: fixed d; None: 1, or the best when `tune`
    tune: bool = False  # tutel: its adaptive tuner picks d by measuring
    forward_degree: int | None = None  # fsmoe: fixed; None: its choice
    backward_degree: int | None = None

    @property
    def local_experts(self) -> int:
        return max(1, self.num_experts // self.ep)

    @property
    def sharding(self) -> int:
        return max(1, self.ep // self.num_experts)

    def capacity(self) -> int:
        """Tutel's rule: ceil(k x f x T / E), the largest fill when dropless (here: the mean, uniform)."""
        f = self.capacity_factor or 1.0
        return max(1, math.ceil(self.top_k * f * self.tokens / self.num_experts))

    def rows_sent(self, traits: SystemTraits) -> int:
        """Padded systems send every capacity slot; live ones the routed rows, less what capacity drops."""
        padded = self.num_experts * self.capacity()
        return padded if traits.rows == "capacity" else min(self.tokens * self.top_k, padded)


@dataclass
class LayerPrediction:
    total_s: float
    phases_s: dict[str, float]  # op -> seconds, forward and backward together
    exposed_comm_s: float
    degrees: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def traits_of(system: str) -> SystemTraits:
    from harness.perfmodel.testbed import TestbedError

    if system not in SYSTEMS:
        from core.names import unknown_name_message

        raise TestbedError(unknown_name_message("system for the performance model", system, sorted(SYSTEMS)))
    return SYSTEMS[system]


def _profile(testbed: Testbed, case: LayerCase, rows: int) -> Profile:
    """The testbed's costs in fsmoe_native's units: ms per element for communication, per multiply-add
    for the expert GEMMs (at the expert GEMM's own shape)."""
    b = DTYPE_BYTES[case.dtype]
    share = testbed.compute_share(case.ep, case.threads)
    per_call = testbed.per_call_s * 1e3 / share

    def comm(op: str, ranks: int) -> AlphaBeta:
        if ranks <= 1:
            return AlphaBeta(0.0, 0.0)
        cost = testbed.collective(op, ranks)
        factor = (ranks - 1) / ranks  # the share of a rank's elements that leave it
        return AlphaBeta(cost.latency_s.value * 1e3, b * factor / cost.bus_bandwidth_bytes_per_s.value * 1e3)

    rows_per_expert = max(1, rows * case.ep // case.num_experts)
    flops = testbed.gemm_flops(case.dtype, (rows_per_expert, case.ffn_dim // case.sharding, case.model_dim),
                               threads=case.threads) * share
    calls = case.gemms_per_expert * (1 if traits_of(case.system).gemm_calls == "batched" else case.local_experts)
    return Profile(costs={
        "a2a": comm("all_to_all", case.ep),
        "allgather": comm("all_gather", case.sharding),
        "reducescatter": comm("reduce_scatter", case.sharding),
        "gemm": AlphaBeta(calls * per_call, 2 / flops * 1e3),
    })  # no all-reduce: a layer step syncs no gradients, so a testbed need not price one


def predict_layer(testbed: Testbed, case: LayerCase) -> LayerPrediction:
    traits = traits_of(case.system)
    b = DTYPE_BYTES[case.dtype]
    T, M, H, E, k = case.tokens, case.model_dim, case.ffn_dim, case.num_experts, case.top_k
    rows = case.rows_sent(traits)
    share = testbed.compute_share(case.ep, case.threads)  # ranks sharing cores run slower (testbed.py)
    per_call = testbed.per_call_s / share
    bandwidth = testbed.memory_bandwidth.value * share

    def gemm_s(m: int, n: int, kk: int, calls: int = 1) -> float:
        flops = testbed.gemm_flops(case.dtype, (m, n, kk), threads=case.threads) * share
        return calls * per_call + 2 * m * n * kk / flops

    def memory_s(nbytes: float, calls: int = 1) -> float:
        return calls * per_call + nbytes / bandwidth

    # Forward, outside the pipelined part; backward doubles each (module docstring).
    outside = {
        "gate": gemm_s(T, E, M),
        "route": memory_s(3 * T * E * 4, calls=4),
        "encode": memory_s((T * M + rows * M) * b, calls=2),
        "decode": memory_s((rows * M + T * M) * b + rows * 4, calls=2),
    }
    if case.shared_ffn_dim:
        outside["shared"] = gemm_s(T, case.shared_ffn_dim, M, calls=case.gemms_per_expert)
    # forward + backward: a GEMM's backward is two GEMMs (data and weight gradients), a memory op's one pass
    phases = {name: (3 if name in ("gate", "shared") else 2) * seconds for name, seconds in outside.items()}

    profile = _profile(testbed, case, rows)
    work = LayerWork(f=rows / T, b=1, s=T, m=M, h=H // case.sharding, es=case.sharding, n_gemm=case.gemms_per_expert)
    degrees, notes = _degrees(case, traits, profile, work, testbed.overlaps_communication)
    overlap = testbed.overlaps_communication
    expert_s = (expert_ms(profile, work, degrees["forward"], False, overlap)
                + expert_ms(profile, work, degrees["backward"], True, overlap)) / 1e3
    gemm_busy_ms = sum(degrees[d] * profile.costs["gemm"].ms(work.gemm() * (2 if d == "backward" else 1) / degrees[d])
                       for d in ("forward", "backward"))
    exposed_s = max(0.0, expert_s - gemm_busy_ms / 1e3) if case.ep > 1 else 0.0
    phases["experts and all-to-all"] = expert_s
    # the expert activation: read the g - 1 projections' rows, write one (SwiGLU: two in, one out)
    phases["activation"] = 3 * memory_s(case.gemms_per_expert * rows * (H // case.sharding) * b)
    if traits.loop_ops:  # each loop op once forward and once as a backward node
        phases["expert loop"] = 2 * traits.loop_ops * case.local_experts * per_call
    return LayerPrediction(total_s=sum(phases.values()), phases_s=phases, exposed_comm_s=exposed_s,
                           degrees=degrees, notes=notes)


def expert_ms(profile: Profile, work: LayerWork, d: int, backward: bool, overlap: bool) -> float:
    """dispatch -> experts -> combine at degree d: pipelined where communication runs beside compute,
    otherwise d chunks one op after another."""
    if overlap:
        return pipelined_ms(profile, work, d, backward=backward)[0]
    return d * sum(chunk_times(profile, work, d, backward).values())


def _degrees(case: LayerCase, traits: SystemTraits, profile: Profile, work: LayerWork,
             overlap: bool) -> tuple[dict, list[str]]:
    """fsmoe: its own cost model's choice (which assumes overlap, as the system does), or the given
    degrees; tutel: the given d, the measured best when its tuner runs, else 1 (its default)."""
    if case.ep == 1 or traits.schedule == "sequential":
        return {"forward": 1, "backward": 1}, []
    if traits.schedule == "fsmoe":
        fwd = case.forward_degree or choose_degree(profile, work, backward=False).chosen
        bwd = case.backward_degree or choose_degree(profile, work, backward=True).chosen
        return {"forward": fwd, "backward": bwd}, [f"fsmoe degrees: forward {fwd}, backward {bwd}"]
    if case.overlap_degree:
        d = case.overlap_degree
        return {"forward": d, "backward": d}, [f"tutel overlap degree {d} (given)"]
    if not case.tune:
        return {"forward": 1, "backward": 1}, ["tutel overlap degree 1 (its default; no tuner)"]
    best = min(DEGREES, key=lambda d: (expert_ms(profile, work, d, False, overlap)
                                       + expert_ms(profile, work, d, True, overlap), d))
    return {"forward": best, "backward": best}, [f"tutel overlap degree {best} (its tuner's best of {DEGREES})"]
