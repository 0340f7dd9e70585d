"""`moebench gate` end to end: real worker processes, real git worktrees, real injected changes.

A scratch repository holds a plugin (tests/plugins/slowed_tutel.py: tutel_native
plus an injected slowdown or output change), as a project adopting moebench
would. Timing verdicts are not performance goals here: an unchanged system
must not FAIL, a 30% slowdown must, an output change must FAIL by the work
channel whatever the timing. The workload is shrunk so a step takes tens of ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.scratch_repo import make_repo, set_working_tree, suite_text

ROOT = Path(__file__).resolve().parent.parent
SMALL = "[benchmark.overrides]\nmodel_dim = 256\nffn_dim = 768\n"
BUDGET_S = 40
QUARTETS = 4  # ABBA quartets of single steps per round


def gate(repo: Path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple[int, dict, str]:
    """(exit code, the gate's results document, stdout+stderr) of `moebench gate` run inside `repo`."""
    out = repo / "gate-out"
    proc = subprocess.run([sys.executable, "-m", "harness", "gate", "suite.toml", "--out", str(out), *args],
                          cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    docs = sorted(out.glob("gate-*.json"))
    doc = json.loads(docs[-1].read_text()) if docs else {}
    for path in docs:
        path.unlink()
    return proc.returncode, doc, proc.stdout + proc.stderr


def verdict_of(doc: dict) -> dict:
    (verdict,) = doc["verdicts"]
    return verdict


@pytest.fixture
def suite(tmp_path):
    return suite_text(BUDGET_S, quartets=QUARTETS, extra=SMALL)


def test_unchanged_code_passes(tmp_path, suite):
    """One A/A run: it must not FAIL. (How often A/A runs pass, quiet and loaded, is the calibration's
    question: benchmarks/gate_calibration.py, 40 runs, reports/gate_calibration.md.)"""
    repo = tmp_path / "project"
    make_repo(repo, suite, [{}])
    code, doc, output = gate(repo, "--baseline-ref", "HEAD")
    verdict = verdict_of(doc)
    assert code == 0, output
    assert verdict["verdict"] in ("PASS", "INCONCLUSIVE") and not verdict["work_problems"], output
    assert doc["runs"][0]["rounds"], "timed rounds ran"
    summary = (repo / "gate-out" / "summary.md").read_text()
    assert "| layer/slowed_tutel |" in summary and "_Method:_" in summary


def test_a_30_percent_slowdown_fails(tmp_path, suite):
    repo = tmp_path / "project"
    make_repo(repo, suite, [{}, {"slowdown": 0.3}])
    code, doc, output = gate(repo, "--baseline-ref", "HEAD~1")
    verdict = verdict_of(doc)
    assert code == 1 and verdict["verdict"] == "FAIL", output
    assert not verdict["work_problems"], "the injected work is invisible to the work channel"
    pooled = verdict["evidence"]["pooled"]
    assert pooled["ratio"] > 1.15 and pooled["ci_low"] > 1, pooled
    assert "FAIL         layer/slowed_tutel: ratio" in output


def test_an_output_change_fails_with_no_slowdown(tmp_path, suite):
    repo = tmp_path / "project"
    make_repo(repo, suite, [{}])
    set_working_tree(repo, output_change=1e-3)  # the candidate is the uncommitted working tree
    code, doc, output = gate(repo, "--baseline-ref", "HEAD")
    verdict = verdict_of(doc)
    assert code == 1 and verdict["verdict"] == "FAIL", output
    assert any(p.startswith("checksum output: deviates by 1.00e-03") for p in verdict["work_problems"]), output
    assert "work: checksum output" in output


def test_a_stored_baseline_gates_the_same_tree_and_refuses_another_machine(tmp_path, suite):
    repo = tmp_path / "project"
    make_repo(repo, suite, [{}])
    baseline = subprocess.run([sys.executable, "-m", "harness", "baseline", "suite.toml", "--rounds", "4",
                               "--out", str(repo / "baselines")], cwd=repo, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert baseline.returncode == 0, baseline.stderr
    stored_path = repo / "baselines" / "plugin-gate.json"
    stored = json.loads(stored_path.read_text())
    item = stored["items"]["layer/slowed_tutel"]
    assert len(item["rounds"]) == 8 and all(r["value"] > 0 for r in item["rounds"])
    code, doc, output = gate(repo, "--baseline", str(stored_path), "--budget", "15")
    assert code == 0 and verdict_of(doc)["verdict"] in ("PASS", "INCONCLUSIVE"), output

    stored["fingerprint"]["cpu_model"] = "A Different CPU"
    stored_path.write_text(json.dumps(stored))
    code, _, output = gate(repo, "--baseline", str(stored_path))
    assert code == 2 and "different environment: cpu_model 'A Different CPU'" in output


def test_a_plugin_from_an_entry_point_is_gated(tmp_path):
    """No system_plugins in the suite: the system comes from a `moebench.systems` entry point, and each
    side imports the plugin module from its own tree (the side's root is first on its import path)."""
    repo = tmp_path / "project"
    suite = suite_text(BUDGET_S, quartets=QUARTETS, extra=SMALL).replace('system_plugins = ["slowed_tutel.py"]\n', "")
    # This test is about loading, not power: the candidate's plugin computes something else, which
    # only the candidate side's own import of its tree can show (the work channel fails it).
    make_repo(repo, suite, [{}, {"output_change": 1e-3}])
    dist = tmp_path / "site" / "slowed_tutel_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: slowed-tutel-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[moebench.systems]\nslowed_tutel = slowed_tutel:SlowedTutelNative\n")
    code, doc, output = gate(repo, "--baseline-ref", "HEAD~1",
                             env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "site")])})
    verdict = verdict_of(doc)
    assert code == 1 and verdict["verdict"] == "FAIL", output
    assert any(p.startswith("checksum output: deviates by 1.00e-03") for p in verdict["work_problems"]), output


def test_a_revision_that_is_not_a_commit_is_one_line(tmp_path, suite):
    repo = tmp_path / "project"
    make_repo(repo, suite, [{}])
    code, _, output = gate(repo, "--baseline-ref", "no-such-branch")
    assert code == 2 and output.strip().splitlines()[-1].endswith("is not a commit of " + str(repo.resolve()))


def test_a_worker_measures_a_model_and_records_every_moe_layer(tmp_path):
    """The gate's measuring process at model level: one work record per MoE layer, then timed steps."""
    from harness.gate_process import MOEBENCH_ROOT, Side, WorkerProcess
    from harness.suite import Benchmark

    bench = Benchmark(name="model", workload="mixtral-8x7b", flavor="debug", level="model", quartets=1, warmup=0,
                      overrides={"layers": 2})
    worker = WorkerProcess(Side("candidate", MOEBENCH_ROOT, "working tree"), 1, tmp_path / "worker.log")
    try:
        setup = worker.request({"op": "setup", "spec": bench.trial_spec("torch_reference").to_dict()})
        work = setup["work"]
        assert len(work["tokens_per_expert"]) == 2 and all(sum(c) == 64 * 2 for c in work["tokens_per_expert"])
        assert work["flops"] > 0 and work["all_to_all_bytes"] == 0
        assert "output_after_update" in work["checksums"], "train mode checks the optimizer's update too"
        measured = worker.request({"op": "measure", "what": "system", "warmup": 0, "steps": 2})
        assert len(measured["samples_s"]) == 2 and all(s > 0 for s in measured["samples_s"])
        gemm = worker.request({"op": "measure", "what": "gemm", "warmup": 1, "steps": 3})
        assert len(gemm["samples_s"]) == 3
    finally:
        worker.close()
    assert worker.proc.returncode == 0
