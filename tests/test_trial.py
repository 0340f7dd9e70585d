"""The trial child's logic, run in this process (fast): statuses, samples, check, routing, FLOPs,
the atomic result file; plus the spec's JSON round trip and the calibration timer."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from core.values import MoEKnobs, ParallelSpec
from harness import timing, trial
from harness.trial_spec import TrialSpec
from workloads.flavors import get_workload

REPO = trial.Path(__file__).resolve().parents[1]


def debug_spec(**changes) -> TrialSpec:
    workload = get_workload("mixtral-8x7b", "debug")
    spec = TrialSpec("torch_reference", workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor), ParallelSpec(threads_per_rank=1),
                     warmup=1, steps=3, timeout_s=60)
    return spec.with_changes(**changes)


@pytest.fixture(autouse=True)
def _keep_threads():
    """One thread: two threads on a shared 2-core machine stall at every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_spec_json_round_trip_keeps_every_field():
    spec = debug_spec(knobs=MoEKnobs(capacity_factor=None, dtype="bfloat16", seed=3, options={"a": 1}),
                      parallel=ParallelSpec(world_size=4, ep=2, nnodes=2, threads_per_rank=1), fault="hang",
                      fault_rank=1, level="model", mode="train")
    back = TrialSpec.from_json(spec.to_json())
    assert back == spec
    assert back.workload.layer.activation == "swiglu"


def test_spec_validate_names_the_bad_field():
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        debug_spec(mode="sideways").validate()
    with pytest.raises(ValueError, match="neither divides the other"):
        debug_spec(parallel=ParallelSpec(world_size=3, ep=3)).validate()


@pytest.mark.parametrize("mode", ["forward", "forward_backward", "train"])
def test_layer_round_is_ok_with_samples_check_routing_and_flops(mode):
    result = trial.run_trial(debug_spec(mode=mode))
    assert result["status"] == "ok", result["message"]
    assert len(result["samples_s"]) == 3 and all(s > 0 for s in result["samples_s"])
    assert result["check"]["passed"] and result["check"]["max_rel_err_y"] == 0.0
    routing = result["routing_stats"]
    T, k = 64, 2  # debug flavour: 2 x 32 tokens, top-2
    assert sum(routing["tokens_per_expert"]) == T * k
    assert routing["expert_rows_computed"] == T * k - routing["dropped"]
    factor = 1 if mode == "forward" else 3
    shape = debug_spec().workload.layer
    assert result["flops"]["useful"] == T * k * 2 * 3 * shape.model_dim * shape.ffn_dim * factor
    assert result["calibration_before_s"] > 0 and result["calibration_after_s"] > 0
    assert result["peak_memory_bytes"] > 10_000_000  # the resident set of a process that imported torch
    assert result["peak_memory_scope"] == "system steps (warm-up + timed), after the reference check"
    assert result["tokens_per_step"] == T and result["threads"] == 1


def test_train_mode_changes_the_weights_and_forward_does_not_leave_grads():
    """train really steps an optimizer: the same spec's output changes between rounds of steps."""
    spec = debug_spec(mode="train", check=False)
    system = __import__("systems").get_system("torch_reference")
    bench, _ = trial.build_layer_bench(spec, system, "cpu")
    first = bench.step().detach().clone()
    bench.after()
    second = bench.step().detach()
    assert not torch.equal(first, second)
    spec = debug_spec(mode="forward_backward", check=False)
    bench, _ = trial.build_layer_bench(spec, system, "cpu")
    a = bench.step().detach().clone()
    bench.after()
    b = bench.step().detach()
    assert torch.equal(a, b)  # no optimizer: identical steps


def test_model_round_is_ok_with_per_layer_routing():
    result = trial.run_trial(debug_spec(level="model", mode="train"))
    assert result["status"] == "ok", result["message"]
    assert len(result["samples_s"]) == 3
    assert result["check"]["passed"]
    assert len(result["routing_stats"]["per_layer"]) == 1  # mixtral debug: one block, MoE
    assert result["flops"]["useful"] > result["flops"]["breakdown"]["moe_useful"] > 0


def test_unsupported_trial_is_skipped_with_the_systems_reason():
    result = trial.run_trial(debug_spec(knobs=MoEKnobs(options={"overlap": 2})))
    assert result["status"] == "skipped"
    assert "does not understand option(s) ['overlap']" in result["message"]
    assert result["samples_s"] == []


def test_raise_fault_becomes_error_with_type_message_and_traceback_tail():
    result = trial.run_trial(debug_spec(fault="raise"))
    assert result["status"] == "error"
    first, *rest = result["message"].splitlines()
    assert first.startswith("RuntimeError: fault injected")
    assert any("_apply_fault" in line or "raise RuntimeError" in line for line in rest)


def test_nonfinite_output_is_classified():
    assert trial.run_trial(debug_spec(fault="nonfinite"))["status"] == "nonfinite"
    assert trial.run_trial(debug_spec(fault="nonfinite", level="model", mode="train"))["status"] == "nonfinite"


def test_out_of_memory_is_classified_as_oom():
    assert trial.classify(MemoryError()) == "oom"
    assert trial.classify(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "oom"
    assert trial.classify(torch.OutOfMemoryError("CUDA error")) == "oom"
    assert trial.classify(ValueError("out of memory")) == "error"
    assert trial.classify(RuntimeError("[enforce fail] something else")) == "error"


def test_an_allocation_the_cpu_allocator_refuses_is_oom():
    """PyTorch's CPU allocator refuses 1 PiB at once, with its own words (not "out of memory")."""
    with pytest.raises(RuntimeError, match="can't allocate memory") as refused:
        torch.empty(2**50, dtype=torch.uint8)
    assert trial.classify(refused.value) == "oom"


def test_peak_memory_covers_the_systems_steps_not_the_check(tmp_path):
    """In a fresh process: the figure (VmHWM reset after the check) is positive and below the whole
    process's ru_maxrss, which the check (a second model, its inputs and gradients) raised; what it
    covers is recorded. The proxy layer, so the check's share is tens of MiB, not the debug layer's few."""
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(debug_spec(warmup=0, steps=1, workload=get_workload("mixtral-8x7b", "proxy")).to_json())
    subprocess.run([sys.executable, "-m", "harness.trial", str(spec_path), str(out_path)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    result = json.loads(out_path.read_text())
    assert result["status"] == "ok" and result["check"]["passed"]
    assert 0 < result["peak_memory_bytes"] < result["process_peak_memory_bytes"] - 8 * 2**20, result
    assert result["peak_memory_scope"] == "system steps (warm-up + timed), after the reference check"


def test_peak_memory_scope_says_what_ran_before_the_steps():
    assert trial.steps_scope(debug_spec(check=False)) == ("system steps (warm-up + timed), after the build "
                                                          "(no check this round)")
    assert trial.steps_scope(debug_spec(check=False, verify={"ranks": []})).endswith("the checksum verification")


def test_peak_memory_falls_back_to_ru_maxrss_without_clear_refs(monkeypatch):
    def refuse():
        raise PermissionError("/proc/self/clear_refs")

    monkeypatch.setattr(trial, "reset_peak_rss", refuse)
    peak = trial.StepsPeak("cpu", trial.steps_scope(debug_spec()))
    assert peak.scope == trial.PROCESS_SCOPE and peak.scope.startswith("whole process (ru_maxrss)")
    assert peak.bytes() == trial.peak_memory_bytes("cpu") > 0


def test_child_process_writes_its_result_atomically_and_exit_code_follows_status(tmp_path):
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(debug_spec(fault="raise", steps=1, check=False).to_json())
    proc = subprocess.run([sys.executable, "-m", "harness.trial", str(spec_path), str(out_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    result = json.loads(out_path.read_text())
    assert result["status"] == "error" and "fault injected" in result["message"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_calibration_and_step_timer_measure_real_work():
    assert timing.calibration_seconds("cpu") > 0
    timer = timing.StepTimer("cpu")
    assert timer.name == "perf_counter"
    value, seconds = timer.time(lambda: sum(range(200_000)))
    assert value == sum(range(200_000)) and seconds > 0


def test_a_teardown_failure_keeps_the_round(monkeypatch):
    """A system whose teardown raises after a successful round: the samples stay, the failure is noted."""
    import systems
    from systems.torch_reference import TorchReference

    class FailingTeardown(TorchReference):  # the real reference, with a teardown that raises
        def teardown(self) -> None:
            raise RuntimeError("teardown broke (test hook)")

    monkeypatch.setattr(systems, "get_system", lambda name: FailingTeardown())
    result = trial.run_trial(debug_spec())
    assert result["status"] == "ok" and len(result["samples_s"]) == 3
    assert result["check"]["passed"]
    assert "teardown broke" in result["teardown_error"]


def test_model_level_fp64_check_compares_the_weights_actually_loaded():
    """build_model and the check take each MoE block's weights from one function, cast once: in fp64
    the check once compared fp32-rounded loaded weights with exact fp64 ones (6e-8, over 1e-10)."""
    result = trial.run_trial(debug_spec(level="model", mode="train",
                                        knobs=MoEKnobs(capacity_factor=1.2, dtype="float64")))
    assert result["status"] == "ok", result["message"]
    assert result["check"]["passed"] and result["check"]["max_rel_err_y"] <= 1e-10
