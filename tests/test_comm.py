"""Collective micro-benchmarks: size parsing, bandwidth conventions, the alpha-beta fit, and a
real 2-rank gloo run through the CLI into a valid results file."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import schema
from harness.comm import bus_factor, fit_alpha_beta
from harness.commands.comm import parse_size


def test_parse_size_units_and_errors():
    assert parse_size("4K") == 4096
    assert parse_size("16M") == 16 * 2**20
    assert parse_size("512") == 512
    assert parse_size("1mb") == 2**20
    for bad in ("0", "-4K", "4X", "K", ""):
        with pytest.raises(ValueError, match="message size"):
            parse_size(bad)


def test_bus_factor_follows_nccl_tests():
    assert bus_factor("all_reduce", 4) == pytest.approx(1.5)
    assert bus_factor("all_gather", 4) == pytest.approx(0.75)
    assert bus_factor("all_to_all", 2) == pytest.approx(0.5)
    assert bus_factor("reduce_scatter", 1) == 0.0


def test_alpha_beta_fit_recovers_a_line():
    alpha, beta = 50e-6, 1 / 2e9
    points = [(n, alpha + n * beta) for n in (1024, 65536, 2**20, 2**24)]
    fit_alpha, fit_beta = fit_alpha_beta(points)
    assert fit_alpha == pytest.approx(alpha, rel=1e-9)
    assert fit_beta == pytest.approx(beta, rel=1e-9)
    with pytest.raises(ValueError):
        fit_alpha_beta(points[:1])


def _moebench(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_rank_comm_run_writes_schema_results(tmp_path):
    proc = _moebench("comm", "--sizes", "4K,64K", "--iters", "3", "--warmup", "1",
                     "--threads-per-rank", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    files = list(tmp_path.glob("comm-*.json"))
    assert len(files) == 1
    doc = schema.load(files[0])
    assert {t["mode"] for t in doc["trials"]} == {"all_to_all", "all_reduce", "all_gather", "reduce_scatter"}
    assert len(doc["trials"]) == 8
    for t in doc["trials"]:
        assert t["level"] == "comm" and t["parallel"]["world_size"] == 2
        assert len(t["samples_s"]) == 3 and t["throughput"]["algbw_bytes_per_s"] > 0
    assert "alpha-beta fit" in proc.stdout
    json.dumps(doc)


@pytest.mark.parametrize("args,needle", [
    (("--ops", "all_to_all,bogus"), "unknown collective"),
    (("--sizes", "12Q"), "message size"),
    (("--nproc-per-node", "1"), "at least 2 ranks"),
])
def test_bad_input_is_one_line(args, needle):
    proc = _moebench("comm", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
