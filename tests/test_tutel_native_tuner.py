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


# ---- reachable from the harness: the adapter's `tune` option -------------------------------------

def _tuned_layer(options: dict, parallel=None, seed_rank: int = 0):
    from core.values import CanonicalWeights, MoEKnobs, ParallelSpec
    from systems import get_system
    from workloads.flavors import get_workload

    shape = get_workload("mixtral-8x7b", "debug").layer
    knobs = MoEKnobs(capacity_factor=1.2, options=options)
    parallel = parallel or ParallelSpec()
    system = get_system("tutel_native")
    assert system.check_support(shape, knobs, parallel).ok
    layer = system.build_layer(shape, knobs, parallel)
    layer.load_canonical(CanonicalWeights.random(shape, seed=3, dtype=torch.float32))
    x = torch.randn(64, shape.model_dim, generator=torch.Generator().manual_seed(10 + seed_rank))
    return layer, x


def test_tune_option_tunes_in_the_first_forward_and_reports_it():
    layer, x = _tuned_layer({"tune": True, "tune_steps": 2, "tune_warmup": 0})
    plain, _ = _tuned_layer({})
    y = layer(x.clone().requires_grad_()).y_TM
    report = layer.tuning_report()
    plain(x)
    assert "tuner" not in plain.tuning_report()  # only the kernel cost model's report
    # world size 1: the only valid setting is r = 1, d = 1; it is timed and chosen
    assert report["chosen"] == {"adaptive_r": 1, "a2a_ffn_overlap_degree": 1}
    assert [len(c["seconds"]) for c in report["candidates"]] == [2] and report["candidates"][0]["chosen"]
    assert report["wall_s"] > 0 and report["log"][-1].startswith("tuner: chose")
    assert all(p.grad is None for p in layer.parameters())  # tuning accumulated no gradients
    torch.testing.assert_close(y, plain(x).y_TM)  # and changed nothing the step computes
    layer(x)
    assert layer.tuning_report()["candidates"] == report["candidates"]  # tuned once, not per forward


def test_tune_option_values_are_checked():
    from core.values import LayerShape, MoEKnobs, ParallelSpec
    from systems import get_system

    shape = LayerShape(8, 16, 4, 1, "gelu")
    for bad in ({"tune_steps": 0}, {"tune_warmup": -1}, {"tune_steps": 1.5}):
        support = get_system("tutel_native").check_support(shape, MoEKnobs(options=bad), ParallelSpec())
        assert not support.ok and next(iter(bad)) in support.reason


def test_tune_option_runs_in_a_trial_round():
    from core.values import MoEKnobs, ParallelSpec
    from harness import trial
    from harness.trial_spec import TrialSpec
    from workloads.flavors import get_workload

    threads = torch.get_num_threads()
    workload = get_workload("mixtral-8x7b", "debug")
    spec = TrialSpec("tutel_native", workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor, options={"tune": True, "tune_steps": 1}),
                     ParallelSpec(threads_per_rank=1), warmup=1, steps=2, timeout_s=60)
    try:
        result = trial.run_trial(spec)
    finally:
        torch.set_num_threads(threads)
    assert result["status"] == "ok", result["message"]
    assert result["check"]["passed"] and len(result["samples_s"]) == 2


def _tune_two_ranks(rank, world):
    from core.values import ParallelSpec

    layer, x = _tuned_layer({"tune": True, "tune_steps": 1}, ParallelSpec(world_size=2, ep=2), seed_rank=rank)
    layer(x)
    report = layer.tuning_report()
    # E = 8 over 2 ranks: r in {0, 1}, and d in {1, 2, 4} where r > 0
    assert [(c["adaptive_r"], c["a2a_ffn_overlap_degree"]) for c in report["candidates"]] == [
        (0, 1), (1, 1), (1, 2), (1, 4)]
    everyone = [None] * world
    dist.all_gather_object(everyone, report["chosen"])
    assert everyone[0] == everyone[1]  # the slowest rank's times decide, so every rank agrees
    assert (layer.layer.adaptive_r, layer.layer.a2a_ffn_overlap_degree) == tuple(report["chosen"].values())


def test_tune_option_agrees_across_two_ranks():
    spawn(_tune_two_ranks, 2)
