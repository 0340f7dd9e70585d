"""`moebench check`: CLI contract (bad input, JSON/--out, exit codes) and the table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.check import CaseResult, any_failed, default_cases, results_table

ROOT = Path(__file__).resolve().parent.parent


def _moebench(*args):
    return subprocess.run([sys.executable, "-m", "harness", "check", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_unknown_system_is_one_line_exit_2():
    proc = _moebench("--systems", "nosuch")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nosuch" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_case_is_one_line_exit_2():
    proc = _moebench("--systems", "torch_reference", "--cases", "top9-nothing")
    assert proc.returncode == 2 and "top9-nothing" in proc.stderr and "Traceback" not in proc.stderr


def test_json_and_out_file(tmp_path):
    out = tmp_path / "sub" / "check.json"
    proc = _moebench("--systems", "torch_reference,tutel", "--cases", "top2-swiglu-cf1-fp32,top1-gelu-dropless-fp64",
                     "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    printed, written = json.loads(proc.stdout), json.loads(out.read_text())
    assert printed == written
    assert written["passed"] is True
    assert [r["case"] for r in written["results"]] == ["top1-gelu-dropless-fp64", "top2-swiglu-cf1-fp32"]
    assert all(r["status"] == "pass" and r["max_rel_err_y"] == 0.0 for r in written["results"])
    assert written["results"][1]["routing"]["dropped"] > 0  # the capacity case really drops
    assert "tutel" in written["unavailable"]
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temporary


def test_failures_and_errors_fail_the_run():
    ok = CaseResult("a", "c1", "pass", 0.0, 0.0, 1e-5)
    na = CaseResult("b", "c1", "n/a", note="no grouped GEMM here")
    bad = CaseResult("c", "c1", "FAIL", 0.2, 0.3, 1e-5, note="tokens per expert differ")
    crashed = CaseResult("d", "c1", "error", note="worker exit 1")
    assert not any_failed([ok, na])
    assert any_failed([ok, bad]) and any_failed([crashed])
    table = results_table([ok, bad, na]).splitlines()
    assert len(table) == 5 and set(table[1]) <= {"-", " "}  # header, rule, one row per result
    assert "FAIL" in table[3] and "2.0e-01" in table[3] and "no grouped GEMM" in table[4]


def test_default_cases_cover_dropless_capacity_and_dtypes():
    cases = default_cases()
    assert {c.capacity_factor for c in cases} == {None, 1.0}
    assert {c.dtype for c in cases} == {"float32", "float64"}
    assert {c.top_k for c in cases} == {1, 2} and len({c.name for c in cases}) == len(cases)


def test_results_table_shows_gradient_and_declared_precision():
    declared = "declared float32 for float64 input: the gate computes in fp32"
    ok = CaseResult("a", "c1", "pass", 1e-8, 2e-8, 1e-5, note=f"{declared} (1e-05 tolerance)",
                    rel_err={"y": 1e-8, "dx": 2e-8, "grad_w2_EHM": 3e-7, "l_aux": 4e-9}, max_rel_err_grad=3e-7,
                    declared_precision=declared)
    bad = CaseResult("b", "c1", "FAIL", 0.0, 0.0, 1e-5, note="over tolerance: grad_w2_EHM 1.0e-03",
                     rel_err={"grad_w2_EHM": 1e-3}, max_rel_err_grad=1e-3)
    lines = results_table([ok, bad]).splitlines()
    assert "grad (worst)" in lines[0] and "l_aux" in lines[0]
    assert "3.0e-07" in lines[2] and "4.0e-09" in lines[2] and "1.0e-03" in lines[3]
    assert lines[-1] == f"a: {declared}"
