"""The gate's parts on their own: suite files, the verdict rule, Holm, the work channel, baselines."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import stats
from harness.baselines import fingerprint, require_same_environment
from harness.errors import UsageError
from harness.gate_verdict import FAIL, PASS, UNDECIDED, decide, paired_evidence
from harness.suite import SuiteError, load_suite
from harness.work_channel import compare_work

ROOT = Path(__file__).resolve().parent.parent
GOOD_SUITE = """\
[suite]
name = "t"
threshold = 0.05

[[benchmark]]
name = "a"
workload = "mixtral-8x7b"
flavor = "debug"
systems = ["tutel_native"]
quartets = 3

[[benchmark]]
name = "b"
workload = "gpt2-xl-moe"
flavor = "debug"
systems = ["tutel_native", "torch_reference"]
threshold = 0.1
[benchmark.overrides]
experts = 4
"""


def write(tmp_path: Path, text: str, name: str = "suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------- suite files

def test_suite_reads_benchmarks_thresholds_and_overrides(tmp_path):
    suite = load_suite(write(tmp_path, GOOD_SUITE))
    assert [(b.name, s) for b, s in suite.items()] == [("a", "tutel_native"), ("b", "tutel_native"),
                                                        ("b", "torch_reference")]
    a, b = suite.benchmarks
    assert (a.threshold, b.threshold) == (0.05, 0.1)
    assert b.resolve_workload().layer.num_experts == 4
    spec = a.trial_spec("tutel_native")
    assert (a.quartets, a.warmup) == (3, 2)
    assert (spec.steps, spec.check, spec.level, spec.mode) == (6, False, "layer", "forward_backward")


@pytest.mark.parametrize("old, new, line, field, words", [
    ("quartets = 3", 'quartets = "three"', 10, "quartets", "must be int"),
    ('systems = ["tutel_native"]', 'systems = ["no_such_system"]', 9, "systems", "unknown system"),
    ('flavor = "debug"\nsystems = ["tutel_native"]', 'flavor = "debug"\ncolour = 1\nsystems = ["tutel_native"]', 9,
     "colour", "unknown field"),
    ("threshold = 0.1", "threshold = 1.5", 17, "threshold", "between 0 and 1"),
    ("experts = 4", "experts = 0", 19, "overrides.experts", "num_experts must be a positive integer"),
    ('name = "b"', 'name = "a"', 13, "name", "given twice"),
])
def test_a_bad_suite_names_the_file_the_line_and_the_field(tmp_path, old, new, line, field, words):
    assert old in GOOD_SUITE
    path = write(tmp_path, GOOD_SUITE.replace(old, new, 1))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert f"field '{field}'" in message and words in message and "\n" not in message


def test_suite_syntax_error_and_missing_file_are_one_line(tmp_path):
    with pytest.raises(SuiteError, match=r"not valid TOML.*line 2"):
        load_suite(write(tmp_path, "[suite]\nname = \n"))
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "nope.toml")
    with pytest.raises(SuiteError, match=r"at least one \[\[benchmark\]\]"):
        load_suite(write(tmp_path, "[suite]\nname = \"x\"\n"))


def test_gate_cli_bad_suite_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, GOOD_SUITE.replace("quartets = 3", "quartets = -1"))
    proc = subprocess.run([sys.executable, "-m", "harness", "gate", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:10:" in lines[0] and "field 'quartets'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------- the verdict rule

def blocks_of(ratios_per_block, base=0.2):
    """(baseline, candidate) rounds whose per-round ratios are the given ones."""
    return [[(base, base * r) for r in ratios] for ratios in ratios_per_block]


def jitter(n, centre, spread, seed):
    rng = np.random.default_rng(seed)
    return list(np.exp(rng.normal(math.log(centre), spread, n)))


def test_a_large_consistent_slowdown_fails():
    evidence = paired_evidence(blocks_of([jitter(8, 1.3, 0.02, 1), jitter(8, 1.3, 0.02, 2)]), 0.95)
    assert evidence.pooled.ratio == pytest.approx(1.3, rel=0.03)
    assert decide(evidence, 0.05, 0.05) == FAIL


def test_no_change_with_low_noise_passes():
    evidence = paired_evidence(blocks_of([jitter(8, 1.0, 0.01, 3), jitter(8, 1.0, 0.01, 4)]), 0.95)
    assert decide(evidence, 0.05, 0.05) == PASS


def test_a_slowdown_below_three_times_the_noise_is_not_a_fail():
    # 10% slower, but rounds scatter by 8%: the fail threshold is 3 x 8% = 24%
    evidence = paired_evidence(blocks_of([jitter(12, 1.1, 0.08, 5), jitter(12, 1.1, 0.08, 6)]), 0.95)
    assert evidence.fail_threshold(0.05) > 0.15
    assert decide(evidence, 0.05, 0.05) == UNDECIDED


def test_one_biased_block_is_not_confirmed():
    # block 0 says 20% slower, block 1 (fresh processes) says no change: no FAIL, no PASS
    evidence = paired_evidence(blocks_of([jitter(8, 1.2, 0.01, 7), jitter(8, 1.0, 0.01, 8)]), 0.95)
    assert evidence.blocks[1].ci_low < 1
    assert decide(evidence, 0.05, 0.05) == UNDECIDED


def test_noise_never_makes_a_pass_easier():
    # a 10% slowdown under heavy noise (rounds at 1.1 x e^(+-15%)): the fail threshold grows to 45%,
    # but PASS still needs the interval below the nominal 5%, so the verdict stays open
    noisy = [1.1 * math.exp(0.15 * (-1) ** i) for i in range(8)]
    evidence = paired_evidence(blocks_of([noisy, noisy[::-1]]), 0.95)
    assert evidence.fail_threshold(0.05) == pytest.approx(0.45, rel=0.1)
    assert evidence.pooled.ci_high > 1.05
    assert decide(evidence, 0.05, 0.05) == UNDECIDED


def test_too_few_rounds_is_undecided():
    evidence = paired_evidence(blocks_of([[1.5, 1.5], [1.5, 1.5]]), 0.95)
    assert decide(evidence, 0.05, 0.05) == UNDECIDED


def test_holm_adjusts_step_down():
    assert stats.holm([0.01, 0.04, None, 0.03]) == [0.03, 0.06, None, 0.06]
    assert stats.holm([]) == []


def test_independent_ratio_finds_a_shift():
    rng = np.random.default_rng(0)
    slow, base = np.exp(rng.normal(0.1, 0.02, 12)), np.exp(rng.normal(0.0, 0.02, 12))
    result = stats.independent_ratio(slow, base)
    assert result.ci_low > 1.05 and result.ratio == pytest.approx(math.exp(0.1), rel=0.03)
    assert result.p_value < 0.001


# ----------------------------------------------------------------- the work channel

def work_record(**changes) -> dict:
    record = {
        "tokens_per_expert": [[10, 6, 8, 8]], "dropped": [2], "expert_rows_computed": [32], "flops": 123456,
        "all_to_all_bytes": 0, "checksums": {"output": [[1.0, 5.0, 0.5]], "layer0.w1_EHM": [[0.1, 2.0, 0.2]]},
        "checksum_tolerance": 1e-4, "peak_memory_bytes": 400 << 20, "notes": [],
    }
    record.update(changes)
    return record


def test_identical_work_has_no_problems():
    assert compare_work(work_record(), work_record()) == []


def test_each_work_metric_is_named_with_both_values():
    base = work_record()
    assert compare_work(base, work_record(tokens_per_expert=[[9, 7, 8, 8]])) == [
        "tokens_per_expert: baseline [[10, 6, 8, 8]], candidate [[9, 7, 8, 8]]"]
    assert compare_work(base, work_record(flops=123457)) == ["flops: baseline 123456, candidate 123457"]
    (output,) = compare_work(base, work_record(checksums={"output": [[1.01, 5.0, 0.5]],
                                                          "layer0.w1_EHM": [[0.1, 2.0, 0.2]]}))
    assert output.startswith("checksum output: deviates by 2.00e-03") and "candidate 1.01" in output
    (memory,) = compare_work(base, work_record(peak_memory_bytes=500 << 20))
    assert memory.startswith("peak_memory_bytes: baseline 400.0 MiB, candidate 500.0 MiB")
    # within the tolerance: a rounding-level checksum change and a few MiB of memory
    assert compare_work(base, work_record(peak_memory_bytes=(400 << 20) + (4 << 20), checksums={
        "output": [[1.00001, 5.0, 0.5]], "layer0.w1_EHM": [[0.1, 2.0, 0.2]]})) == []


# ----------------------------------------------------------------- stored baselines

def test_a_mismatching_fingerprint_is_refused_in_one_line(tmp_path):
    suite = load_suite(write(tmp_path, GOOD_SUITE))
    stored = {"fingerprint": {**fingerprint(suite), "cpu_model": "Some Other CPU"}}
    with pytest.raises(UsageError) as info:
        require_same_environment(stored, suite, tmp_path / "t.json", force=False)
    message = str(info.value)
    assert "different environment: cpu_model 'Some Other CPU' (baseline)" in message and "--force" in message
    assert "\n" not in message
    assert require_same_environment(stored, suite, tmp_path / "t.json", force=True)[0].startswith("cpu_model")
    assert require_same_environment({"fingerprint": fingerprint(suite)}, suite, tmp_path / "t.json", False) == []


def test_gate_cli_refuses_a_baseline_from_elsewhere(tmp_path):
    suite_path = write(tmp_path, GOOD_SUITE)
    suite = load_suite(suite_path)
    baseline = tmp_path / "t.json"
    baseline.write_text(json.dumps({"schema": "moebench-gate-baseline", "schema_version": 1, "items": {},
                                    "created_utc": "x", "normalize": "gemm",
                                    "fingerprint": {**fingerprint(suite), "torch": "0.0.1"}}))
    proc = subprocess.run([sys.executable, "-m", "harness", "gate", str(suite_path), "--baseline", str(baseline)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "different environment: torch '0.0.1'" in proc.stderr, proc.stderr
