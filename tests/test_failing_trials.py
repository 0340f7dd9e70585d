"""Failing trials in one `moebench run`: a forward that raises, NaN outputs, an allocation past the
machine's memory and a rank that hangs are each recorded with their status and message, and the
healthy system in the same run still completes. Plus a child killed by SIGKILL (the kernel's OOM
killer) read as oom.

The run is 2 ranks (the hang is rank 1's), so it takes about 45 s, 20 of them the hanging trial's
timeout; it starts in the background when this module's first test starts, and the SIGKILL test
runs meanwhile. (A 2-rank SIGKILL, which torchrun reports in its own words, is read the same way:
tests/test_memory_guard.py checks those words; a 2-rank run of SigkillSystem recorded oom.)"""
from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

from core.values import MoEKnobs, ParallelSpec
from harness import runner, schema
from harness.trial_spec import TrialSpec
from workloads.flavors import get_workload

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tests" / "plugins" / "faulty_systems.py"
TIMEOUT_S = 20  # the healthy 2-rank trial took 6-16 s here (quiet to loaded); the hanging one is killed after this
FAULTY = {"faulty_raise": "RaisingSystem", "faulty_nan": "NaNSystem", "faulty_oom": "OOMSystem",
          "faulty_hang": "HangOnRank1System"}


@pytest.fixture(scope="module", autouse=True)
def started_run(tmp_path_factory):
    """The one run, started before this module's first test and collected by `results`."""
    out = tmp_path_factory.mktemp("failing")
    plugins = [arg for name, cls in FAULTY.items() for arg in ("--system-plugin", f"{PLUGIN}:{cls}")]
    argv = [sys.executable, "-m", "harness", "run", "--workload", "mixtral-8x7b", "--flavor", "debug",
            "--systems", ",".join(["torch_reference", *FAULTY]), *plugins, "--repeats", "1", "--steps", "1",
            "--warmup", "0", "--nproc-per-node", "2", "--ep", "2", "--timeout", str(TIMEOUT_S), "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def results(started_run) -> dict[str, dict]:
    """system -> its trial record, from the run's validated results file."""
    proc, out = started_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    (path,) = glob.glob(str(out / "*.json"))
    return {t["system"]: t for t in schema.load(path)["trials"]}


def test_a_child_killed_by_sigkill_is_oom_and_says_why(tmp_path):
    """One rank, no torchrun: the child's exit status is -9 and no timeout killed it."""
    workload = get_workload("mixtral-8x7b", "debug")
    spec = TrialSpec("faulty_sigkill", workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor), ParallelSpec(threads_per_rank=1),
                     warmup=0, steps=1, timeout_s=60, plugins=(f"{PLUGIN}:SigkillSystem",))
    result = runner.run_round(spec, tmp_path, 0, runner.RunOptions())
    assert result["status"] == "oom", result["message"]
    assert result["exit_code"] == -9
    assert "killed by signal 9" in result["message"] and "out-of-memory killer" in result["message"]


def test_the_healthy_trial_completes_with_samples(results):
    healthy = results["torch_reference"]
    assert healthy["status"] == "ok", healthy["message"]
    assert len(healthy["samples_s"]) == 1 and healthy["samples_s"][0] > 0
    assert healthy["check"]["passed"]


@pytest.mark.parametrize(("system", "status", "message"), [
    ("faulty_raise", "error", "RuntimeError: forward failed on purpose on rank 0 (faulty_raise test plugin)"),
    ("faulty_nan", "nonfinite", "NonFiniteError: non-finite values in a step's output"),
    ("faulty_oom", "oom", "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1125899906842624 bytes"),
    ("faulty_hang", "timeout", f"no result after {TIMEOUT_S} s; process tree killed"),
])
def test_each_failure_has_its_status_and_message(results, system, status, message):
    trial = results[system]
    assert trial["status"] == status, trial["message"]
    assert message in trial["message"]
    assert trial["samples_s"] == [] and trial["summary"] is None
    assert [r["status"] for r in trial["rounds"]] == [status]
