"""Issue 5's matrix through the real runner (torchrun, gloo): every system at EP 2 on the debug
flavour, and the native system on 4 ranks: sharded experts (E=2, sharded_count 2) at the ends of
the r range, overlap degree 4, and 2DH with local_size 2. (Every system at EP 4 is checked against
the reference by tests/test_peers_distributed.py, tests/test_reference_distributed.py and
tests/test_tutel_native_distributed.py; through the runner, EP 2 shows the layout reaches each.) Each trial's in-process
equivalence check compares every rank's output and input gradient with a single-process
reference on that rank's tokens, so "ok + check passed" means the layout computed the same thing."""
from __future__ import annotations

import io
from dataclasses import replace

import pytest

from core.values import MoEKnobs, ParallelSpec
from harness import runner
from harness.trial_spec import TrialSpec
from systems import availability, get_system, system_names
from workloads.flavors import get_workload

AVAILABLE = [name for name in system_names() if availability(name).ok]


def spec(system: str, world: int, ep: int, experts: int | None = None, **options) -> TrialSpec:
    workload = get_workload("mixtral-8x7b", "debug")
    if experts is not None:
        workload = replace(workload, layer=replace(workload.layer, num_experts=experts))
    return TrialSpec(system, workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor, options=options),
                     ParallelSpec(world_size=world, ep=ep, threads_per_rank=1), warmup=1, steps=2, timeout_s=180)


def assert_ok_and_checked(trials: list[dict]) -> None:
    for t in trials:
        assert t["status"] == "ok", f"{t['id']}: {t['status']}: {t['message'][-500:]}"
        assert t["check"] is not None and t["check"]["passed"], f"{t['id']}: {t['check']}"
        assert len(t["per_rank_samples_s"]) == t["parallel"]["world_size"]
        # exposed communication: measured for every multi-rank step, never negative nor above the step
        exposed = t["exposed_comm_s"]
        assert len(exposed) == len(t["samples_s"]), t["id"]
        assert all(0 <= e <= s for e, s in zip(exposed, t["samples_s"], strict=True)), t["id"]
        assert max(exposed) > 0, t["id"]  # every system here exchanges tokens


@pytest.mark.slow
@pytest.mark.parametrize("world", [2])
def test_every_available_system_at_full_expert_parallelism(world):
    # Systems that keep every expert in one process (transformers' blocks, torchtitan's module) or
    # run bf16 only refuse this trial with their reason (tests/test_hf_transformers.py, test_torchtitan.py).
    specs = [s for s in (spec(name, world, world) for name in AVAILABLE)
             if get_system(s.system).check_support(s.workload.layer, s.knobs, s.parallel).ok]
    if "megatron_core" in AVAILABLE and world == 2:  # its other dispatcher (CPU compat layer's buffers)
        specs.append(spec("megatron_core", world, world, dispatcher="allgather"))
    trials = runner.run_trials(specs, runner.RunOptions(repeats=1, progress=io.StringIO()))
    assert {t["system"] for t in trials} >= {"torch_reference", "tutel_native", "deepspeed_moe", "megatron_core"}
    assert_ok_and_checked(trials)
    # above one rank too, tutel_native's cost model chose the kernel (live rows, or one bmm over the padding)
    (native,) = [t for t in trials if t["system"] == "tutel_native" and not t["knobs"]["options"]]
    steps = native["tuning"][0]["kernel_choice"]["steps"]
    assert sum(steps.values()) >= 3 and set(steps) <= {"grouped/live", "onednn/live", "mm/live", "mm/max_fill"}


@pytest.mark.slow
def test_native_sharded_experts_every_r_overlap_and_2dh_on_four_ranks():
    # The knobs reach the adapter through the runner; every r and overlap degree is checked against
    # one process in tests/test_tutel_native_distributed.py, so the ends of each range are enough here.
    specs = [spec("tutel_native", 4, 4, experts=2, adaptive_r=r) for r in (0, 2)]
    specs += [spec("tutel_native", 4, 4, overlap_degree=4)]
    specs += [spec("tutel_native", 4, 4, use_2dh=True, local_size=2)]
    trials = runner.run_trials(specs, runner.RunOptions(repeats=1, progress=io.StringIO()))
    assert_ok_and_checked(trials)
    sharded = [t for t in trials if t["workload_spec"]["layer"]["num_experts"] == 2]
    assert [t["knobs"]["options"]["adaptive_r"] for t in sharded] == [0, 2]
    assert len({t["id"] for t in trials}) == len(trials)  # options are part of the trial id
