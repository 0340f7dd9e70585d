"""The adaptive (r, d[, capacity]) tuner: fed fixed timings, it must pick the
fastest, deterministically, and every rank must agree (max over ranks)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from systems.tutel_native.layer import MoELayer
from systems.tutel_native.tuner import AdaptiveTuner, Candidate, candidates_for, candidates_for_layer
from tests.test_tutel_native_distributed import spawn


class ScriptedClock:
    """Each step reads the clock twice; step i lasts durations[i]."""

    def __init__(self, durations):
        self.durations, self.now, self.calls = list(durations), 0.0, 0

    def __call__(self):
        if self.calls % 2 == 1:
            self.now += self.durations[self.calls // 2]
        self.calls += 1
        return self.now


def drive(tuner, steps):
    used = []
    for _ in range(steps):
        with tuner.step() as cand:
            used.append(cand)
    return used


def test_candidates_cover_valid_r_and_d():
    cands = candidates_for(4, world_size=4, overlap_degrees=(1, 2))
    assert [(c.adaptive_r, c.overlap_degree) for c in cands] == [
        (0, 1), (1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)
    ]
    assert candidates_for(1, world_size=1) == [Candidate(1, 1)]
    with_cf = candidates_for(1, world_size=2, overlap_degrees=(1,), capacity_factors=(1.0, 0.0))
    assert [c.forward_kwargs() for c in with_cf] == [
        {"adaptive_r": 0, "a2a_ffn_overlap_degree": 1, "capacity_factor": 1.0},
        {"adaptive_r": 1, "a2a_ffn_overlap_degree": 1, "capacity_factor": 1.0},
        {"adaptive_r": 0, "a2a_ffn_overlap_degree": 1, "capacity_factor": 0.0},
        {"adaptive_r": 1, "a2a_ffn_overlap_degree": 1, "capacity_factor": 0.0},
    ]
    with pytest.raises(ValueError, match="not valid"):
        candidates_for(4, world_size=4, adaptive_rs=(3,))


def test_picks_the_fastest_ignores_warmup_and_logs():
    cands = [Candidate(1, 1), Candidate(1, 2), Candidate(2, 1)]
    # per candidate: 1 warm-up step (huge, must be ignored), then 3 timed steps
    times = [9.0, 3.0, 3.1, 2.9] + [9.0, 2.0, 2.5, 2.2] + [0.1, 2.4, 2.6, 2.3]
    lines = []
    tuner = AdaptiveTuner(cands, warmup_steps=1, measure_steps=3, clock=ScriptedClock(times), logger=lines.append)
    used = drive(tuner, 12)
    assert used == [cands[0]] * 4 + [cands[1]] * 4 + [cands[2]] * 4
    assert tuner.done and tuner.chosen == Candidate(1, 2)  # medians 3.0, 2.2, 2.4
    assert drive(tuner, 2) == [Candidate(1, 2)] * 2  # settled: keeps using it
    assert [t["score"] for t in tuner.report()] == pytest.approx([3.0, 2.2, 2.4])
    assert lines[-1] == "tuner: chose adaptive_r=1 a2a_ffn_overlap_degree=2 (2200.000 ms/step)"
    assert len(lines) == 4 and lines == tuner.lines


def test_deterministic_and_ties_go_to_the_earliest():
    cands = candidates_for(2, world_size=2, overlap_degrees=(1, 2))
    times = [1.0, 0.75, 0.5, 0.875, 0.5]  # (r=1, d=2) and (r=2, d=2) tie at 0.5 (exact in binary)
    choices = set()
    for _ in range(3):
        tuner = AdaptiveTuner(cands, warmup_steps=0, measure_steps=1, clock=ScriptedClock(times), logger=lambda s: None)
        drive(tuner, len(cands))
        choices.add((tuner.chosen, tuple(tuner.lines)))
    assert len(choices) == 1
    (chosen, _), = choices
    assert chosen == cands[2]  # the first of the two 0.5 s candidates


def _agree(rank, world):
    # rank 0 finds A fastest, rank 1 finds A slowest: the max over ranks decides (B)
    cands = [Candidate(1, 1), Candidate(1, 2)]
    times = [1.0, 3.0] if rank == 0 else [5.0, 4.0]
    tuner = AdaptiveTuner(cands, warmup_steps=0, measure_steps=1, clock=ScriptedClock(times), logger=lambda s: None)
    drive(tuner, 2)
    assert tuner.chosen == Candidate(1, 2), tuner.lines
    assert [t["score"] for t in tuner.report()] == pytest.approx([5.0, 4.0])
    # live steps on a sharded layer (real clock): every rank settles on the same candidate
    layer = MoELayer({"type": "top", "k": 1}, 8, {"type": "ffn", "hidden_size_per_expert": 16,
                                                  "num_experts_per_device": -2}, seeds=(1, 2, 3))
    live = AdaptiveTuner(candidates_for_layer(layer, overlap_degrees=(1, 2)), warmup_steps=1, measure_steps=1,
                         logger=lambda s: None)
    x = torch.randn(16, 8)
    while not live.done:
        with live.step() as cand:
            layer(x, **cand.forward_kwargs()).sum().backward()
    everyone = [None] * world
    dist.all_gather_object(everyone, live.chosen)
    assert len(set(everyone)) == 1 and live.chosen in candidates_for_layer(layer, overlap_degrees=(1, 2))


def test_ranks_agree_on_the_slowest_rank_time():
    spawn(_agree, 2)


def test_bad_configuration():
    with pytest.raises(ValueError, match="at least one"):
        AdaptiveTuner([])
    with pytest.raises(ValueError, match="duplicate"):
        AdaptiveTuner([Candidate(1, 1), Candidate(1, 1)])
