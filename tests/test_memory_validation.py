"""Peak-memory validation (harness/perfmodel/memory_validation.py): a synthetic trial record's predicted
and measured peak and its error by hand, the scope rule (the check's copy counted only where the
measurement saw it), and the report section benchmarks/model_validation.py writes."""
from __future__ import annotations

from core.values import LayerShape
from harness.memory_guard import RUNTIME_BYTES, RUNTIME_BYTES_BY_SYSTEM
from harness.perfmodel.memory_validation import checked_peaks, peak_rows, peak_summary
from workloads.spec import ModelShape, Workload

MIB = 1 << 20
STEPS = "system steps (warm-up + timed), after the checksum verification"
WHOLE = "whole process (ru_maxrss): imports, model build, the reference check and the system steps"
# The tiny layer of tests/test_memory_guard.py at ep 2, fp32, by hand: parameters 1824 B, gradients 1824,
# activations 6720, dispatch 3840, inputs 1920; the check's copy 24320.
TENSORS = 2 * 1824 + 6720 + 3840 + 1920  # 16128 bytes
CHECK = 24320


def tiny_workload() -> dict:
    layer = LayerShape(model_dim=8, ffn_dim=12, num_experts=4, top_k=2, activation="gelu", expert_bias=True)
    model = ModelShape(n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50, moe_every=2, norm="layernorm",
                       dense_ffn_dim=16)
    return Workload("tiny", "custom", layer, model, batch_size=2, seq_len=5, capacity_factor=1.5).to_dict()


def trial(system: str, peak: int | None, scope: str | None = STEPS) -> dict:
    """A results-file trial as the runner writes it, reduced to what the comparison reads."""
    return {"id": f"{system}#{scope and scope[:5]}", "system": system, "status": "ok", "level": "layer",
            "mode": "forward_backward", "dtype": "float32", "workload_spec": tiny_workload(),
            "parallel": {"world_size": 2, "ep": 2, "tp": 1, "nnodes": 1, "threads_per_rank": 1, "dp": 1},
            "knobs": {"capacity_factor": 1.5, "dtype": "float32", "device": "cpu", "seed": 0, "options": {}},
            "setup": {"input_pool": 4}, "check": {"passed": True}, "peak_memory_bytes": peak,
            "peak_memory_scope": scope}


def docs() -> list[dict]:
    return [{"trials": [trial("megatron_core", 400 * MIB), trial("torch_reference", 330 * MIB, WHOLE),
                        trial("deepspeed_moe", 300 * MIB, None), trial("tutel_native", None)]}]


def test_a_synthetic_trial_is_predicted_and_its_error_computed_by_hand():
    checked, skipped = checked_peaks(docs())
    megatron, reference = checked
    # Megatron-Core's runtime is its own (460 MiB); the steps' scope leaves the check's copy out.
    assert RUNTIME_BYTES_BY_SYSTEM["megatron_core"] == 460 * MIB
    assert megatron.predicted_bytes == 460 * MIB + TENSORS
    assert megatron.measured_bytes == 400 * MIB
    assert abs(megatron.error - 0.1500385) < 1e-6  # (460 MiB + 16128 B) / 400 MiB - 1
    # A whole-process peak saw the check: its copy is predicted too.
    assert reference.predicted_bytes == RUNTIME_BYTES + TENSORS + CHECK
    assert abs(reference.error - (300 * MIB + 40448) / (330 * MIB) + 1) < 1e-12  # about -9.08%
    assert len(skipped) == 2
    assert "does not say what it covers" in skipped[0] and "no measured peak" in skipped[1]


def test_summary_counts_the_peaks_within_15_percent():
    s = peak_summary(checked_peaks(docs())[0])
    assert s["trials"] == 2 and s["within_goal"] == 1  # +15.004% is just outside, -9.08% inside
    assert abs(s["max_abs_error"] - 0.1500385) < 1e-6
    assert abs(s["median_abs_error"] - (0.1500385 + 0.0908) / 2) < 1e-4


def test_the_report_section_renders_each_trial_and_the_summary():
    from benchmarks.model_validation import peak_memory_section

    text = "\n".join(peak_memory_section(docs()))
    assert text.startswith("## Peak memory\n")
    assert "**2 layer trials; median |error| 12%, max 15%; 1 of 2 within 15% (the goal: all).**" in text
    assert "Left out: 2 without" in text
    assert "| tiny/custom float32 ep2 | megatron_core   | 0.391        | 0.449         | +15%  |" in text
    assert peak_rows(checked_peaks(docs())[0])[1] == ("tiny/custom float32 ep2", "torch_reference", "0.322",
                                                     "0.293", "-9%")
