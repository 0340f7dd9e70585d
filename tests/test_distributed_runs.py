"""Multi-process trials through torchrun (gloo): a 2-rank EP-2 run, a rank that fails, and a two-"node"
loopback run (two `moebench run` launches, world size 4) that ends with exactly one results file."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from core.values import MoEKnobs, ParallelSpec
from harness import procs, runner, schema
from harness.launch import free_port
from harness.trial_spec import TrialSpec
from workloads.flavors import get_workload

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def two_rank_spec(**changes) -> TrialSpec:
    workload = get_workload("mixtral-8x7b", "debug")
    spec = TrialSpec("torch_reference", workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor),
                     ParallelSpec(world_size=2, ep=2, threads_per_rank=1), warmup=1, steps=STEPS, timeout_s=150)
    return spec.with_changes(**changes)


@pytest.mark.slow
def test_two_rank_ep2_run_writes_one_complete_results_file_and_survives_a_failing_rank(tmp_path):
    specs = [two_rank_spec(fault="raise", fault_rank=1, mode="forward"), two_rank_spec()]
    progress = io.StringIO()
    trials = runner.run_trials(specs, runner.RunOptions(repeats=1, progress=progress))
    failed, ok = trials

    # rank 1 raised: torchrun stopped rank 0, and rank 1's own file says why
    assert failed["status"] == "error"
    assert "fault injected by the trial spec on rank 1" in failed["message"]

    assert ok["status"] == "ok", ok["message"]
    assert ok["parallel"]["world_size"] == 2 and ok["parallel"]["ep"] == 2 and ok["parallel"]["dp"] == 1
    per_rank = ok["per_rank_samples_s"]
    assert len(per_rank) == 2 and all(len(r) == STEPS for r in per_rank)
    assert ok["samples_s"] == [max(a, b) for a, b in zip(*per_rank, strict=True)]  # slowest rank per step
    assert ok["check"]["passed"]  # expert-parallel layer vs the single-process reference
    # FLOPs and tokens count both ranks' tokens (64 each)
    assert ok["throughput"]["tokens_per_s"] == pytest.approx(128 / ok["summary"]["median"])

    path = runner.write_results(trials, runner.method(1, STEPS, 1), ["moebench", "run"], tmp_path)
    assert list(tmp_path.iterdir()) == [path]
    doc = schema.load(path)  # validates the whole document
    assert [t["status"] for t in doc["trials"]] == ["error", "ok"]


@pytest.mark.slow
def test_two_node_loopback_run_has_world_size_4_and_one_results_file(tmp_path):
    port = free_port()
    out0, out1 = tmp_path / "node0", tmp_path / "node1"
    common = ["-m", "harness", "run", "--flavor", "debug", "--systems", "torch_reference", "--repeats", "1",
              "--steps", str(STEPS), "--warmup", "1", "--nproc-per-node", "2", "--ep", "2", "--nnodes", "2",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--threads-per-rank", "1", "--timeout", "150"]
    node1 = procs.start([sys.executable, *common, "--node-rank", "1", "--out", str(out1)], cwd=REPO,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node0 = procs.start([sys.executable, *common, "--node-rank", "0", "--out", str(out0)], cwd=REPO,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done0, done1 = procs.wait(node0, 240), procs.wait(node1, 240)
    finally:
        for node in (node0, node1):
            if node.poll() is None:
                procs.kill_tree(node)
    (out_text0, err0), (out_text1, err1) = (done0.stdout, done0.stderr), (done1.stdout, done1.stderr)
    assert node0.returncode == 0, err0[-2000:]
    assert node1.returncode == 0, err1[-2000:]

    files = list(out0.glob("*.json"))
    assert len(files) == 1 and not out1.exists()  # only node 0 writes
    trial = schema.load(files[0])["trials"][0]
    assert trial["status"] == "ok", trial["message"]
    assert trial["parallel"]["world_size"] == 4 and trial["parallel"]["nnodes"] == 2
    assert len(trial["per_rank_samples_s"]) == 4 and all(len(r) == STEPS for r in trial["per_rank_samples_s"])
    assert trial["check"]["passed"]
    assert "ws4-ep2" in trial["id"]
    assert "torch_reference" in out_text0 and "speedup" in out_text0  # node 0 prints the table
    assert "node 1 done" in err1 and out_text1 == ""
