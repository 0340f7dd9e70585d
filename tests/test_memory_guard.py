"""The memory guard (harness/memory_guard.py): its estimate term by term on a tiny shape, the
decision against given available bytes, a full-size model refused as too_large while the run goes
on, and the estimate against the peaks trials actually measured."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.values import LayerShape, MoEKnobs, ParallelSpec
from harness import memory_guard, runner
from harness.memory_guard import RUNTIME_BYTES, decide, estimate_peak
from harness.trial_spec import TrialSpec
from workloads.flavors import get_workload
from workloads.spec import ModelShape, Workload

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def tiny_workload() -> Workload:
    """M 8, H 12, E 4, top-2 GELU with biases, cf 1.5; 2 x 5 tokens; 2 GPT-2-style blocks, the second MoE."""
    layer = LayerShape(model_dim=8, ffn_dim=12, num_experts=4, top_k=2, activation="gelu", expert_bias=True)
    model = ModelShape(n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50, moe_every=2, norm="layernorm",
                       dense_ffn_dim=16)
    return Workload("tiny", "custom", layer, model, batch_size=2, seq_len=5, capacity_factor=1.5)


def spec_for(workload: Workload, level: str = "layer", mode: str = "forward_backward", dtype: str = "float32",
             parallel: ParallelSpec | None = None, check: bool = True, system: str = "torch_reference",
             **changes) -> TrialSpec:
    return TrialSpec(system, workload, level, mode, "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor, dtype=dtype),
                     parallel or ParallelSpec(threads_per_rank=1), check=check, **changes)


def test_layer_estimate_term_by_term():
    """fp32 (4 bytes), 2 ranks of ep 2, check on. T = 10 tokens, R = T k cf = 10 x 2 x 1.5 = 30 rows."""
    spec = spec_for(tiny_workload(), parallel=ParallelSpec(world_size=2, ep=2, threads_per_rank=1))
    expert = 2 * 12 * 8 + 12 + 8  # w1, w2 (H x M each) and the two biases: 212
    params = 4 * 8 + 4 * expert / 2  # the gate (E x M) and this rank's 2 of 4 experts: 456
    activations = 30 * 12 * 2 + 30 * 12 * 2 + 2 * 10 * 8 + 2 * 10 * 4  # saved hidden, their grads, x/y, logits/probs
    estimate = estimate_peak(spec)
    assert estimate.terms == {
        "runtime": RUNTIME_BYTES,
        "parameters": params * 4,  # 1824
        "gradients": params * 4,
        "optimizer": 0,  # layer level: SGD without state, and only in train mode
        "activations": activations * 4,  # 1680 elements
        "dispatch": 4 * 30 * 8 * 4,  # dispatch and combine, each also received under ep 2: 3840
        "inputs": (4 + 2) * 10 * 8 * 4,  # the pool of 4 inputs, one input gradient, the upstream gradient
        "check": (5 * (4 * 8 + 4 * expert) + activations) * 4,  # all 4 experts: 5 x 880 + 1680 = 6080 elements
    }
    assert estimate.ranks_here == 2
    assert estimate.total == 2 * (RUNTIME_BYTES + 2 * 1824 + 6720 + 3840 + 1920 + 24320)


def test_model_estimate_term_by_term():
    """fp64 (8 bytes), one rank, train (AdamW), no check."""
    spec = spec_for(tiny_workload(), level="model", mode="train", dtype="float64", check=False)
    attention = 2 * 8 * 8 + 8 * 8 + (2 * 8 + 8)  # q and out (M x M), kv (M x 2 x 1 head x 4), their biases: 216
    norms = 2 * 2 * 8  # two LayerNorms of weight and bias per block
    dense_ffn = 2 * 8 * 16 + 16 + 8  # block 0's GELU FFN of width 16 with biases: 280
    embeddings = 50 * 8 + 5 * 8  # tokens and learned positions
    final = 2 * 8 + 50 * 8  # final LayerNorm and the LM head
    moe = 4 * 8 + 4 * (2 * 12 * 8 + 12 + 8)  # block 1: gate and all 4 experts: 880
    params = embeddings + 2 * (attention + norms) + dense_ffn + final + moe  # 2512
    moe_acts = 30 * 12 * 2 + 30 * 12 * 2 + 2 * 10 * 8 + 2 * 10 * 4  # as at layer level: 1680
    block_acts = 10 * (8 * 8 + 8) + 2 * 2 * 5 * 5  # T (8 M + kv) and B heads S S attention weights: 820
    dense_acts = 10 * 16 * 2  # the dense FFN's pre-activation and activation
    estimate = estimate_peak(spec)
    assert estimate.terms == {
        "runtime": RUNTIME_BYTES,
        "parameters": params * 8,
        "gradients": params * 8,
        "optimizer": 2 * params * 8,  # AdamW's exp_avg and exp_avg_sq, in the parameters' dtype
        "activations": (moe_acts + 2 * block_acts + dense_acts) * 8 + 10 * 50 * (8 + 4 + 4),  # + logits
        "dispatch": 2 * 30 * 8 * 8,  # one MoE layer, one rank: dispatch and combine
        "inputs": 4 * 2 * 2 * 5 * 8,  # 4 pool batches of int64 tokens and targets
        "check": 0,
    }
    assert estimate.ranks_here == 1


def test_forward_mode_has_no_gradients_and_dropless_counts_every_choice():
    workload = tiny_workload()
    forward = estimate_peak(spec_for(workload, mode="forward", check=False)).terms
    assert forward["gradients"] == 0
    assert forward["activations"] == (30 * 12 * 2 + 2 * 10 * 8 + 2 * 10 * 4) * 4  # no hidden gradients
    dropless = spec_for(workload, check=False).with_changes(knobs=MoEKnobs(capacity_factor=None))
    assert estimate_peak(dropless).terms["dispatch"] == 2 * (10 * 2) * 8 * 4  # R = T k


def test_decision_against_given_available_memory():
    spec = spec_for(tiny_workload(), check=False)
    total = estimate_peak(spec).total
    fits = decide(spec, available=int(total / 0.9) + 1)
    assert fits.fits is True and "fits in 90% of the" in fits.message
    refused = decide(spec, available=int(total))  # 90% of exactly the estimate is too little
    assert refused.fits is False
    assert refused.message.startswith("estimated peak 0.3 GiB (runtime 0.3, parameters 0.0")
    assert refused.message.endswith(f"exceeds 90% of the {total / GIB:.1f} GiB available")
    skipped = decide(spec.with_changes(knobs=MoEKnobs(device="cuda")), available=None)
    assert skipped.fits is None and skipped.message.startswith("memory guard skipped on cuda")
    assert memory_guard.available_bytes("cuda") is None
    assert memory_guard.available_bytes("cpu") > 0


def test_full_size_model_is_refused_as_too_large_and_the_run_goes_on():
    """mixtral-8x22b, model level, train: about 2.4 TiB estimated, on a machine of 24 GiB."""
    full = spec_for(get_workload("mixtral-8x22b", "full"), level="model", mode="train", warmup=0, steps=1)
    debug = spec_for(get_workload("mixtral-8x7b", "debug"), check=False, warmup=0, steps=1, timeout_s=120)
    seed = next(s for s in range(20) if runner.round_orders(2, 1, s)[0][0] == 0)  # the refused trial first
    trials = runner.run_trials([full, debug], runner.RunOptions(repeats=1, order_seed=seed, progress=io.StringIO()))
    refused, ran = trials
    assert refused["status"] == "too_large"
    message = refused["message"]
    assert message.startswith("estimated peak ") and "exceeds 90% of the" in message, message
    for term in ("parameters", "gradients", "optimizer", "activations", "dispatch", "check"):
        assert f" {term} " in message
    assert refused["rounds"][0]["wall_s"] == 0.0 and refused["samples_s"] == []
    assert ran["status"] == "ok", ran["message"]
    assert len(ran["samples_s"]) == 1 and ran["rounds"][0]["position"] == 1


# Measured on this machine (2026-12-02, one thread, warm-up 0, 1 step, no check), peak MiB vs the estimate:
# mixtral-8x7b proxy layer (tutel_native) 570 vs 594; gpt2-xl-moe proxy model train (torch_reference) 540
# vs 623. Also, not run here: mixtral-8x7b proxy layer (torch_reference) 593 vs 594, mixtral-8x7b proxy model
# train (tutel_native) 1272 vs 1373, and debug trials (272-332 vs 302: their tensors are kilobytes, the
# runtime term is all). Each within 1.2x.
MEASURED_CASES = [
    ("tutel_native", "mixtral-8x7b", "proxy", "layer", "forward_backward"),
    ("torch_reference", "gpt2-xl-moe", "proxy", "model", "train"),
]


def test_estimate_is_within_2x_of_the_measured_peak(tmp_path):
    """Each trial in a fresh child, all at once; the figure is part 1's: the system's own steps."""
    specs, procs = [], []
    for i, (system, name, flavor, level, mode) in enumerate(MEASURED_CASES):
        spec = spec_for(get_workload(name, flavor), level=level, mode=mode, check=False, system=system,
                        warmup=0, steps=1, timeout_s=120)
        (tmp_path / f"{i}.spec.json").write_text(spec.to_json())
        argv = [sys.executable, "-m", "harness.trial", str(tmp_path / f"{i}.spec.json"), str(tmp_path / f"{i}.json")]
        specs.append(spec)
        procs.append(subprocess.Popen(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for proc in procs:
        assert proc.wait(timeout=180) == 0
    for i, spec in enumerate(specs):
        result = json.loads((tmp_path / f"{i}.json").read_text())
        measured, estimated = result["peak_memory_bytes"], estimate_peak(spec).total
        assert result["peak_memory_scope"].startswith("system steps")
        assert 0.5 <= estimated / measured <= 2.0, (MEASURED_CASES[i], measured / 2**20, estimated / 2**20)


# The end of torchrun's stderr (torch 2.13) when a worker died of SIGKILL; torchrun itself exits 1.
TORCHRUN_SIGKILL_REPORT = """\
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_03:47:42
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 18633)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 18633
======================================================"""


@pytest.mark.parametrize(("rc", "stderr", "killed"), [
    (-9, "", True),
    (1, TORCHRUN_SIGKILL_REPORT, True),
    (1, "RuntimeError: boom", False),
    (None, "", False),  # a timeout: the runner killed it
    (0, "", False),
])
def test_sigkill_is_recognised_with_and_without_torchrun(rc, stderr, killed):
    assert memory_guard.killed_by_sigkill(rc, stderr) is killed


def test_a_spec_the_estimate_cannot_read_is_launched_for_the_child_to_report():
    verdict = memory_guard.guard(spec_for(tiny_workload()).with_changes(knobs=MoEKnobs(dtype="fp8")))
    assert verdict.fits is None and "unknown dtype 'fp8'" in verdict.message
