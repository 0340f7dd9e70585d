"""Run-time choice of (adaptive r, overlap degree d[, capacity factor]) on live steps.

Tutel's promise is that the best parallel setting depends on the run, and
both r and d switch per call at no cost; it leaves the search to the user.
This is that search, opt-in: the training loop wraps each step in
``with tuner.step() as cand: y = layer(x, **cand.forward_kwargs()); ...``.
The tuner walks the candidates in order, gives each ``warmup_steps``
untimed and ``measure_steps`` timed steps, scores it by the median of its
timed steps, agrees with the other ranks on the score (max over ranks, so
the slowest rank decides, as it does for a synchronous step), keeps the
fastest (the earliest candidate on ties) and uses it from then on.

Deterministic: the same timings give the same choice and the same log; the
clock is injectable so tests feed fixed times. Capacity candidates change
which tokens are dropped, so they are only tried when asked for.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from systems.tutel_native.parallel import divisors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One setting to try; None leaves the layer's own value."""

    adaptive_r: int | None = None
    overlap_degree: int | None = None
    capacity_factor: float | None = None

    def forward_kwargs(self) -> dict:
        """Keyword arguments for MoELayer.forward."""
        kw = {}
        if self.adaptive_r is not None:
            kw["adaptive_r"] = self.adaptive_r
        if self.overlap_degree is not None:
            kw["a2a_ffn_overlap_degree"] = self.overlap_degree
        if self.capacity_factor is not None:
            kw["capacity_factor"] = self.capacity_factor
        return kw

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.forward_kwargs().items()]
        return " ".join(parts) or "defaults"


def candidates_for(
    sharded_count: int,
    world_size: int,
    overlap_degrees: Sequence[int] = (1, 2, 4),
    capacity_factors: Sequence[float] | None = None,
    adaptive_rs: Sequence[int] | None = None,
) -> list[Candidate]:
    """Every valid (r, d[, cf]): r in {0} + divisors(sc) (only r = 1 at world size 1,
    where there is nothing to exchange); d only matters when r > 0."""
    if adaptive_rs is None:
        adaptive_rs = [0, *divisors(sharded_count)] if world_size > 1 else [1]
    valid = {0, *divisors(sharded_count)}
    bad = [r for r in adaptive_rs if r not in valid]
    if bad:
        raise ValueError(f"adaptive r {bad} not valid for sharded_count {sharded_count}; choose from {sorted(valid)}")
    cfs = list(capacity_factors) if capacity_factors else [None]
    out = []
    for cf in cfs:
        for r in adaptive_rs:
            for d in overlap_degrees if (r > 0 and world_size > 1) else (1,):
                out.append(Candidate(r, d, cf))
    return out


def candidates_for_layer(layer, **kw) -> list[Candidate]:
    """candidates_for() with a MoELayer's sharded_count and world size."""
    return candidates_for(layer.sharded_count, layer.world_size, **kw)


def default_clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _max_over_ranks(values: list[float], group) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


@dataclass
class Trial:
    candidate: Candidate
    seconds: list[float] = field(default_factory=list)  # this rank's timed steps
    score: float | None = None  # median, then max over ranks


class AdaptiveTuner:
    """Times candidates on live steps and settles on the fastest (module docstring)."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        *,
        warmup_steps: int = 1,
        measure_steps: int = 3,
        clock: Callable[[], float] = default_clock,
        group=None,
        logger: Callable[[str], None] | None = None,
    ):
        if not candidates:
            raise ValueError("the tuner needs at least one candidate")
        if len(set(candidates)) != len(candidates):
            raise ValueError("duplicate tuner candidates")
        if warmup_steps < 0 or measure_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and measure_steps >= 1")
        self.trials = [Trial(c) for c in candidates]
        self.warmup_steps, self.measure_steps = warmup_steps, measure_steps
        self.clock, self.group = clock, group
        self.logger = logger or log.info
        self.chosen: Candidate | None = None
        self._index = 0  # trial being run
        self._step_in_trial = 0
        self.lines: list[str] = []

    @property
    def done(self) -> bool:
        return self.chosen is not None

    @property
    def current(self) -> Candidate:
        """The setting the next step must use."""
        return self.chosen if self.chosen is not None else self.trials[self._index].candidate

    @contextmanager
    def step(self) -> Iterator[Candidate]:
        """Wrap one whole training step (forward, backward, optimizer) in this."""
        candidate = self.current
        if self.done:  # settled: no more timing (no clock reads, no synchronisation)
            yield candidate
            return
        start = self.clock()
        yield candidate
        self.record(self.clock() - start)

    def record(self, seconds: float) -> None:
        """Account one step run with :attr:`current` that took `seconds` (if timed elsewhere)."""
        if self.done:
            return
        trial = self.trials[self._index]
        if self._step_in_trial >= self.warmup_steps:
            trial.seconds.append(float(seconds))
        self._step_in_trial += 1
        if self._step_in_trial == self.warmup_steps + self.measure_steps:
            self._index += 1
            self._step_in_trial = 0
            if self._index == len(self.trials):
                self._decide()

    def _decide(self) -> None:
        local = [statistics.median(t.seconds) for t in self.trials]
        agreed = _max_over_ranks(local, self.group)
        for trial, score in zip(self.trials, agreed, strict=True):
            trial.score = score
            self._say(f"tuner: tried {trial.candidate.label()}: {score * 1e3:.3f} ms/step (median, max over ranks)")
        best = min(range(len(self.trials)), key=lambda i: (agreed[i], i))
        self.chosen = self.trials[best].candidate
        self._say(f"tuner: chose {self.chosen.label()} ({agreed[best] * 1e3:.3f} ms/step)")

    def _say(self, line: str) -> None:
        self.lines.append(line)
        self.logger(line)

    def report(self) -> list[dict]:
        """What was tried: candidate settings, this rank's timings, the agreed score."""
        return [
            {**t.candidate.forward_kwargs(), "seconds": list(t.seconds), "score": t.score,
             "chosen": t.candidate == self.chosen}
            for t in self.trials
        ]
