"""The pipeline-degree choice of an FSMoE-style layer: alpha-beta op costs and a pipelined cost model.

FSMoE (ASPLOS'25, arXiv 2501.10714) splits an MoE layer into operations, models each as
``alpha + beta * work``, fits alpha and beta by profiling on the live cluster, and picks the
pipeline degree d (chunks that pipeline communication with expert compute) from {1, 2, 4, 8}
separately for forward and backward. This module is our own formulation of that method.

Work terms, per layer and rank: f = top-k x capacity factor, b micro-batch, s sequence, m model
width, h expert hidden width, es expert-sharding degree. FSMoE's are a2a f*b*s*m/es, all-gather
and reduce-scatter f*b*s*m, GEMMs f*b*s*m*h/es * n_gemm, all-reduce g: there the es ranks of a
sharding group split the tokens. Ours follow our layout (pipeline.py), where every rank keeps
its own f*b*s choices, sends each once, and an expert's es holders all-gather what they received
and compute it with 1/es of the hidden width:

  all-to-all (dispatch, and again combine)     f*b*s*m
  all-gather, reduce-scatter (sharded experts) es*f*b*s*m
  expert GEMMs                                 f*b*s*m*h * n_gemm   (x2 in backward: data and
                                                                     weight gradients)
  gradient all-reduce                          g (bytes of replicated gradients)

Three streams run concurrently: the all-to-all stream (dispatch and combine), the intra-node
stream (all-gather and reduce-scatter, sharded experts only) and the compute stream (GEMMs).
With degree d every op runs d chunks of work/d, each costing alpha + beta * work / d. A chunk
flows dispatch -> all-gather -> GEMM -> reduce-scatter -> combine. The layer takes at least as
long as whichever stream is busiest, plus the one-chunk stages the others add before and after
it, so the model is the largest of three overlap cases (which stream dominates):

  a2a-bound:    d * (t_dispatch + t_combine) + t_allgather + t_gemm + t_reducescatter
  intra-bound:  d * (t_allgather + t_reducescatter) + t_dispatch + t_gemm + t_combine
  gemm-bound:   d * t_gemm + t_dispatch + t_allgather + t_reducescatter + t_combine

with every t the time of one chunk at degree d. The relaxed (continuous) optimum over
[1, 8] is found on a fine grid and snapped to the allowed degree nearest in log2; the
prediction of every allowed degree is kept for the log. Forward d is 1 when a whole
dispatch all-to-all takes under 1 ms (pipelining cannot pay for its extra latency there).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

DEGREES = (1, 2, 4, 8)
OPS = ("a2a", "allgather", "reducescatter", "gemm", "allreduce")
SMALL_A2A_MS = 1.0  # below this, forward d is 1
STREAMS = ("gemm", "a2a", "intra")  # the overlap cases, named by the stream that dominates
RELAXED_GRID = 701  # points of the continuous search over [1, 8]


@dataclass(frozen=True)
class AlphaBeta:
    """One op's cost in ms: alpha + beta * work (work in the unit of the op's work term)."""

    alpha: float
    beta: float

    def ms(self, work: float) -> float:
        return self.alpha + self.beta * work


@dataclass(frozen=True)
class LayerWork:
    """The work terms of one MoE layer on one rank (module docstring)."""

    f: float  # top-k x capacity factor
    b: int  # micro-batch
    s: int  # sequence length
    m: int  # model width
    h: int  # expert hidden width
    es: int = 1  # expert-sharding degree
    n_gemm: int = 3  # GEMMs per expert (3 for SwiGLU, 2 for GELU)

    @property
    def tokens(self) -> float:
        return self.f * self.b * self.s

    def a2a(self) -> float:
        return self.tokens * self.m

    def allgather(self) -> float:
        return self.es * self.tokens * self.m if self.es > 1 else 0.0

    def reducescatter(self) -> float:
        return self.allgather()

    def gemm(self) -> float:
        return self.tokens * self.m * self.h * self.n_gemm


@dataclass
class Profile:
    """Fitted costs by op name (OPS), and the points they were fitted on: op -> [[work, ms], ...]."""

    costs: dict[str, AlphaBeta]
    points: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"costs_ms": {n: asdict(c) for n, c in self.costs.items()}, "points": self.points}


def fit(points: list[tuple[float, float]]) -> AlphaBeta:
    """Least-squares alpha + beta * work through (work, ms) points; alpha and beta clamped at 0."""
    n = len(points)
    if n == 0:
        raise ValueError("no points to fit")
    if n == 1:
        work, ms = points[0]
        return AlphaBeta(0.0, ms / work if work else 0.0) if work else AlphaBeta(ms, 0.0)
    mean_w = sum(w for w, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var = sum((w - mean_w) ** 2 for w, _ in points)
    beta = 0.0 if var == 0 else sum((w - mean_w) * (t - mean_t) for w, t in points) / var
    beta = max(0.0, beta)
    return AlphaBeta(max(0.0, mean_t - beta * mean_w), beta)


def chunk_times(profile: Profile, work: LayerWork, d: float, backward: bool) -> dict[str, float]:
    """ms of one chunk of each op at degree d (0 for ops the layer does not run)."""
    gemm_work = work.gemm() * (2 if backward else 1)

    def t(op: str, total: float) -> float:
        return profile.costs[op].ms(total / d) if total > 0 else 0.0

    return {"dispatch": t("a2a", work.a2a()), "combine": t("a2a", work.a2a()),
            "allgather": t("allgather", work.allgather()), "reducescatter": t("reducescatter", work.reducescatter()),
            "gemm": t("gemm", gemm_work)}


def pipelined_ms(profile: Profile, work: LayerWork, d: float, backward: bool = False) -> tuple[float, str]:
    """(predicted ms of the layer at degree d, the dominating stream)."""
    c = chunk_times(profile, work, d, backward)
    cases = {
        "a2a": d * (c["dispatch"] + c["combine"]) + c["allgather"] + c["gemm"] + c["reducescatter"],
        "intra": d * (c["allgather"] + c["reducescatter"]) + c["dispatch"] + c["gemm"] + c["combine"],
        "gemm": d * c["gemm"] + c["dispatch"] + c["allgather"] + c["reducescatter"] + c["combine"],
    }
    bound = max(cases, key=lambda k: (cases[k], -STREAMS.index(k)))  # ties (d = 1): the first in STREAMS
    return cases[bound], bound


@dataclass
class DegreeChoice:
    direction: str  # "forward" | "backward"
    chosen: int
    relaxed: float  # continuous optimum over [1, 8]
    predicted_ms: dict[int, float]  # every allowed degree
    bound: dict[int, str]  # the stream that dominates at each allowed degree
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def choose_degree(profile: Profile, work: LayerWork, backward: bool) -> DegreeChoice:
    """The degree for one direction (module docstring); deterministic given the profile."""
    direction = "backward" if backward else "forward"
    predicted, bound = {}, {}
    for d in DEGREES:
        predicted[d], bound[d] = pipelined_ms(profile, work, d, backward)
    grid = [1 + 7 * i / (RELAXED_GRID - 1) for i in range(RELAXED_GRID)]
    relaxed = min(grid, key=lambda d: (pipelined_ms(profile, work, d, backward)[0], d))
    snapped = min(DEGREES, key=lambda d: (abs(math.log2(d) - math.log2(relaxed)), d))
    reason = f"relaxed optimum d = {relaxed:.2f}, snapped to {snapped}"
    a2a_ms = profile.costs["a2a"].ms(work.a2a())
    if not backward and a2a_ms < SMALL_A2A_MS:
        snapped, reason = 1, f"one dispatch all-to-all takes {a2a_ms:.3f} ms < {SMALL_A2A_MS:g} ms: d = 1"
    return DegreeChoice(direction, snapped, relaxed, predicted, bound, reason)


def backward_gap_ms(profile: Profile, work: LayerWork, d: int) -> float:
    """Link idle time inside the layer's backward pipeline at degree d: its predicted time minus the
    all-to-all stream's busy time (what a gradient all-reduce can fill without delaying the layer)."""
    c = chunk_times(profile, work, d, backward=True)
    total, _ = pipelined_ms(profile, work, d, backward=True)
    return max(0.0, total - d * (c["dispatch"] + c["combine"]))


def allreduce_bytes_within(profile: Profile, ms: float) -> float:
    """How many bytes of all-reduce the profile predicts to finish in `ms`."""
    ab = profile.costs["allreduce"]
    if ms <= ab.alpha:
        return 0.0
    return float("inf") if ab.beta == 0 else (ms - ab.alpha) / ab.beta
