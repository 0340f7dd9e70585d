"""The runner on real child processes: interleaved rounds, pooled samples, a failing trial that
does not stop the run, a hanging torchrun tree killed without orphans, the results file, the table;
and the run command's one-line input errors."""
from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.values import MoEKnobs, ParallelSpec
from harness import runner, schema
from harness.trial_spec import TrialSpec
from workloads.flavors import get_workload

REPO = Path(__file__).resolve().parents[1]
STEPS, ROUNDS = 3, 2


def debug_spec(**changes) -> TrialSpec:
    workload = get_workload("mixtral-8x7b", "debug")
    spec = TrialSpec("torch_reference", workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor), ParallelSpec(threads_per_rank=1),
                     warmup=1, steps=STEPS, timeout_s=120)
    return spec.with_changes(**changes)


@pytest.fixture(scope="module")
def run():
    """layer ok, a failing trial, model ok: 2 interleaved rounds (the failing one stops after round 1)."""
    specs = [debug_spec(), debug_spec(fault="raise", mode="forward"), debug_spec(level="model", mode="train")]
    progress = io.StringIO()
    trials = runner.run_trials(specs, runner.RunOptions(repeats=ROUNDS, progress=progress))
    return trials, progress.getvalue().splitlines()


@pytest.mark.slow
def test_ok_trials_pool_samples_over_rounds(run):
    trials, _ = run
    for trial in (trials[0], trials[2]):
        assert trial["status"] == "ok", trial["message"]
        assert len(trial["samples_s"]) == STEPS * ROUNDS
        assert trial["summary"]["n"] == STEPS * ROUNDS
        assert trial["summary"]["min"] == min(trial["samples_s"])
        assert [r["round"] for r in trial["rounds"]] == [1, 2]
        assert all(r["calibration_before_s"] > 0 and r["calibration_after_s"] > 0 for r in trial["rounds"])
        assert all(r["load_before"] >= 0 and r["load_after"] >= 0 for r in trial["rounds"])
        assert trial["check"]["passed"]
        assert trial["routing_stats"]["tokens_per_expert"]
        assert trial["throughput"]["tokens_per_s"] == pytest.approx(64 / trial["summary"]["median"])
    assert trials[2]["level"] == "model" and len(trials[2]["routing_stats"]["per_layer"]) == 1


@pytest.mark.slow
def test_failing_trial_is_an_error_and_the_run_goes_on(run):
    trials, progress = run
    failed = trials[1]
    assert failed["status"] == "error"
    assert "fault injected" in failed["message"]
    assert len(failed["rounds"]) == 1  # not retried: a deterministic failure
    assert failed["summary"] is None and failed["samples_s"] == []
    # interleaving, in the seeded order of each round: round 1 runs all three; round 2 runs the two
    # others (the failed trial stopped, and its round left the planned total from then on)
    first, second = runner.round_orders(3, ROUNDS, seed=0)
    failed_at = first.index(1)
    expected = [f"[{n + 1}/{6 if n <= failed_at else 5}" for n in range(5)]
    assert [line.split("]")[0] for line in progress] == expected
    assert "error: RuntimeError: fault injected" in progress[failed_at]
    assert "check ok  (elapsed " in progress[first.index(0)]


@pytest.mark.slow
def test_results_file_is_complete_and_the_table_compares(run, tmp_path):
    trials, _ = run
    path = runner.write_results(trials, runner.method(1, STEPS, ROUNDS), ["moebench", "run"], tmp_path)
    doc = schema.load(path)
    assert [t["status"] for t in doc["trials"]] == ["ok", "error", "ok"]
    assert len({t["id"] for t in doc["trials"]}) == 3
    table = runner.format_table(trials)
    assert "1.00x" in table and "pass" in table
    assert "torch_reference mixtral-8x7b: error: RuntimeError: fault injected" in table


def _processes_mentioning(marker: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in entry.joinpath("cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_hanging_torchrun_tree_times_out_and_leaves_no_process(tmp_path):
    """torchrun starts each worker in a session of its own; all of them must still die."""
    spec = debug_spec(fault="hang", timeout_s=15, parallel=ParallelSpec(world_size=2, ep=2, threads_per_rank=1))
    seen: set[int] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_processes_mentioning(str(tmp_path)))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        result = runner.run_round(spec, tmp_path, 0, runner.RunOptions(grace_s=3))
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - started
    assert result["status"] == "timeout"
    assert result["message"].startswith("no result after 15 s")
    assert elapsed < 15 + 3 + 5
    assert len(seen) >= 3, "torchrun and its two workers should have been seen"
    assert not [pid for pid in seen if runner.is_alive(pid)]
    assert not _processes_mentioning(str(tmp_path))


def test_missing_result_file_reads_as_error_with_exit_code(tmp_path, monkeypatch):
    """A child that exits without writing (killed, segfault): status error naming the exit code."""
    monkeypatch.setattr(runner, "trial_command",
                        lambda *a, **k: [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); "
                                                                "sys.exit(3)"])
    result = runner.run_round(debug_spec(), tmp_path, 0, runner.RunOptions())
    assert result["status"] == "error"
    assert "exited with code 3 without a result" in result["message"] and "boom" in result["message"]
    assert result["exit_code"] == 3


# The cases, each in its own process (the real entry point) ...
CLI_ERRORS = {
    "unknown system": (["--systems", "torch_reference,nosuch"], "unknown system 'nosuch'"),
    "unknown workload": (["--workload", "gpt5"], "unknown workload 'gpt5'"),
    "top-k > experts": (["--top-k", "9"], "top_k (9) is larger than num_experts (8)"),
    "zero size": (["--model-dim", "0"], "model_dim must be a positive integer"),
    "unreadable config": (["--config", "/nonexistent/x.toml"], "config file /nonexistent/x.toml"),
}
# ... and more, in this process (each subprocess pays a torch import).
MORE_CLI_ERRORS = {
    "bad option": (["--option", "overlap"], "--option must be KEY=VALUE"),
    "bad int": (["--steps", "five"], "invalid int value: 'five'"),
    "zero steps": (["--steps", "0"], "--steps must be at least 1"),
    "ep does not divide": (["--nproc-per-node", "2", "--ep", "4"], "not divisible by ep*tp = 4"),
    "experts not divisible": (["--nproc-per-node", "3", "--ep", "3"], "neither divides the other"),
    "multi-node without endpoint": (["--nnodes", "2"], "needs --rdzv-endpoint"),
    "bad endpoint": (["--nnodes", "2", "--rdzv-endpoint", "host"], "must be HOST:PORT"),
    "node rank": (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "node-rank must be in 0..1"),
    "bad mode": (["--mode", "inference"], "unknown mode 'inference'"),
    "bad routing": (["--routing", "random"], "unknown routing 'random'"),
    "bad dtype": (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    "bad capacity": (["--capacity-factor", "-1"], "capacity_factor must be a positive number"),
    "routing the model ignores": (["--level", "model", "--routing", "zipf"], "applies at layer level only"),
    "option nobody declares": (["--option", "warp_speed=9"], "no selected system declares option 'warp_speed'"),
    "option unknown to its system": (["--option", "torch_reference.overlap_degree=2"],
                                     "torch_reference has no option 'overlap_degree'"),
    "option for an unselected system": (["--systems", "torch_reference", "--option", "tutel_native.adaptive_r=0"],
                                        "system tutel_native is not among the selected systems"),
    "malformed variant": (["--variant", "tutel_native"], "--variant must be SYSTEM:KEY=VALUE"),
    "variant option unknown": (["--systems", "tutel_native", "--variant", "tutel_native:warp=1"],
                               "tutel_native has no option 'warp'"),
    "variant repeats an entry": (["--systems", "tutel_native", "--option", "tutel_native.adaptive_r=0",
                                  "--variant", "tutel_native:adaptive_r=0"], "repeats an entry"),
}


def _check_one_line(name: str, code: int, err: str, expected: str) -> None:
    assert code == 2, (name, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, (name, err)
    assert lines[0].startswith("moebench run: error: ") and expected in lines[0], (name, lines[0])


def test_run_command_input_errors_are_one_line_exit_2():
    procs = {name: subprocess.Popen([sys.executable, "-m", "harness", "run", "--flavor", "debug", *argv],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in CLI_ERRORS.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        _check_one_line(name, proc.returncode, err, CLI_ERRORS[name][1])
        assert out == ""


@pytest.mark.parametrize("name", MORE_CLI_ERRORS)
def test_more_run_command_input_errors(name, capsys):
    from harness.cli import main

    argv, expected = MORE_CLI_ERRORS[name]
    try:
        code = main(["run", "--flavor", "debug", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    _check_one_line(name, code, capsys.readouterr().err, expected)


def _parsed(argv: list[str]):
    import argparse

    from harness.commands import run as run_command

    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    return parser.parse_args(["--flavor", "debug", *argv])


def test_an_option_addressed_to_one_system_leaves_the_others_running():
    from harness.commands.run import build_specs
    from harness.identity import system_label

    specs, _ = build_specs(_parsed(["--systems", "torch_reference,tutel_native,deepspeed_moe",
                                    "--option", "tutel_native.overlap_degree=2",
                                    "--variant", "tutel_native:expert_kernel=mm"]))
    labels = [system_label({"system": s.system, "knobs": {"options": s.knobs.options}}) for s in specs]
    assert labels == ["torch_reference", "tutel_native[overlap_degree=2]", "deepspeed_moe",
                      "tutel_native[expert_kernel=mm,overlap_degree=2]"]


def test_an_unqualified_option_goes_to_the_systems_that_declare_it():
    from harness.commands.run import build_specs

    specs, _ = build_specs(_parsed(["--systems", "torch_reference,megatron_core", "--option", "dispatcher=allgather"]))
    assert [(s.system, s.knobs.options) for s in specs] == [("torch_reference", {}),
                                                            ("megatron_core", {"dispatcher": "allgather"})]


def test_round_order_is_a_seeded_permutation_per_round():
    orders = runner.round_orders(4, 6, seed=11)
    assert orders == runner.round_orders(4, 6, seed=11)  # reproducible from its seed
    assert orders != runner.round_orders(4, 6, seed=12)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    first_positions = {o[0] for o in runner.round_orders(4, 40, seed=0)}
    assert first_positions == {0, 1, 2, 3}  # no trial is always first: position is not tied to the system
