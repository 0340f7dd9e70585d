"""Testbeds as data (harness/perfmodel/testbed.py, testbeds/*.toml) and `moebench calibrate`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.perfmodel.calibrate import fit_collectives, render_testbed, GemmPoint, CollectivePoint
from harness.perfmodel import testbed as testbed_module
from harness.perfmodel.testbed import KINDS, TESTBED_DIR, available_testbeds, load_testbed

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_testbed_loads_and_every_number_says_what_it_is():
    names = available_testbeds()
    assert {"h100-node", "h200-node", "h100-cluster-4", "h200-cluster-16", "fsmoe-testbed-a",
            "fsmoe-testbed-b"} <= set(names)
    for name in names:
        testbed = load_testbed(name)
        quantities = testbed.quantities()
        assert len(quantities) >= 2 + len(testbed.gemm) + 2 * len(testbed.collectives)
        for label, q in quantities:
            assert q.kind in KINDS and q.source and q.value > 0, (name, label)


def test_fsmoe_testbeds_are_assumed_throughout_and_b_is_a_under_another_name():
    a, b = load_testbed("fsmoe-testbed-a"), load_testbed("fsmoe-testbed-b")
    for testbed in (a, b):
        assert {q.kind for _, q in testbed.quantities()} == {"assumed"}
    assert [q for _, q in a.quantities()] == [q for _, q in b.quantities()]
    assert b.name == "fsmoe-testbed-b" and "Testbed-B" in b.description


def test_fsmoe_testbed_reproduces_its_optimisers_alpha_beta_costs():
    """The optimiser's defaults: B 4, seq 1024, M 4096, H 14336, 3 GEMMs, f 2.4, es 8; a2a work f*b*s*m/es
    elements at alpha 0.23515 ms + beta 1.8543e-6 ms each, GEMM work f*b*s*m*h/es*3 at 0.59194 + 5.6847e-11."""
    testbed = load_testbed("fsmoe-testbed-a")
    f, b, s, m, h, es = 2.4, 4, 1024, 4096, 14336, 8
    a2a_work = f * b * s * m / es
    want_a2a_ms = 0.23515 + 1.8543e-6 * a2a_work
    got_a2a_ms = testbed.collective_seconds("all_to_all", 2 * a2a_work, 8) * 1e3
    assert got_a2a_ms == pytest.approx(want_a2a_ms, rel=1e-3)
    gemm_work = f * b * s * m * h / es * 3  # multiply-adds
    want_gemm_ms = 5.6847e-11 * gemm_work  # the slope; its alpha is a per-call constant
    assert 2 * gemm_work / testbed.gemm_flops("float16") * 1e3 == pytest.approx(want_gemm_ms, rel=1e-3)


def test_h200_extends_h100_with_its_own_memory_and_clusters_cross_nodes_over_infiniband():
    h100, h200, cluster = load_testbed("h100-node"), load_testbed("h200-node"), load_testbed("h200-cluster-4")
    assert h100.memory_capacity.value == 80e9 and h200.memory_capacity.value == 141e9
    assert h200.memory_bandwidth.value == 4.8e12 and h200.memory_bandwidth.kind == "datasheet"
    assert h200.collectives == h100.collectives
    assert cluster.devices == 32 and cluster.memory_capacity.value == 141e9
    # 64 MB per rank all-to-all: inside a node at 370 GB/s bus bandwidth, across nodes at 46 GB/s
    inside = cluster.collective_seconds("all_to_all", 64e6, 8)
    assert inside == pytest.approx(25e-6 + 64e6 * 7 / 8 / 370e9)
    across = cluster.collective_seconds("all_to_all", 64e6, 16)
    assert across == pytest.approx(50e-6 + 64e6 * 15 / 16 / 46e9)
    assert cluster.collective_seconds("all_to_all", 64e6, 1) == 0.0
    with pytest.raises(testbed_module.TestbedError, match="do not fit"):
        h100.collective_seconds("all_to_all", 64e6, 16)


def write(tmp_path: Path, text: str, name: str = "bed.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
[testbed]
name = "t"
devices_per_node = 4
[memory]
capacity_bytes = { value = 1e9, kind = "measured", source = "meminfo" }
bandwidth_bytes_per_s = { value = 1e10, kind = "measured", source = "copy" }
[[gemm]]
dtype = "float32"
threads = 1
flops = { value = 1e10, kind = "measured", source = "mm" }
[[gemm]]
dtype = "float32"
threads = 1
shape = [64, 128, 256]
flops = { value = 2e10, kind = "measured", source = "mm" }
[[gemm]]
dtype = "float32"
threads = 2
flops = { value = 3e10, kind = "measured", source = "mm" }
[[collective]]
op = "all_to_all"
scope = "intra_node"
ranks = 2
latency_s = { value = 1e-4, kind = "measured", source = "gloo" }
bus_bandwidth_bytes_per_s = { value = 1e9, kind = "measured", source = "gloo" }
[[collective]]
op = "all_to_all"
scope = "intra_node"
ranks = 4
latency_s = { value = 2e-4, kind = "measured", source = "gloo" }
bus_bandwidth_bytes_per_s = { value = 5e8, kind = "measured", source = "gloo" }
"""


def test_lookups_pick_the_measured_thread_count_shape_and_world_size(tmp_path):
    testbed = load_testbed(write(tmp_path, GOOD))
    assert testbed.gemm_flops("float32", threads=1) == 1e10
    assert testbed.gemm_flops("float32", (60, 130, 250), threads=1) == 2e10  # nearest measured shape
    assert testbed.gemm_flops("float32", threads=2) == 3e10
    assert testbed.gemm_flops("float32", threads=3) == 3e10  # nearest thread count
    assert testbed.collective_seconds("all_to_all", 1e6, 2) == pytest.approx(1e-4 + 1e6 * 0.5 / 1e9)
    assert testbed.collective_seconds("all_to_all", 1e6, 4) == pytest.approx(2e-4 + 1e6 * 0.75 / 5e8)
    assert testbed.collective_seconds("all_to_all", 1e6, 3) == pytest.approx(2e-4 + 1e6 * 2 / 3 / 5e8)
    with pytest.raises(testbed_module.TestbedError, match="no all_reduce cost"):
        testbed.collective_seconds("all_reduce", 1e6, 2)
    with pytest.raises(testbed_module.TestbedError, match="no GEMM rate for bfloat16"):
        testbed.gemm_flops("bfloat16")


@pytest.mark.parametrize("old,new,message", [
    ('source = "copy"', 'source = ""', "source: every number says where it comes from"),
    ('kind = "measured", source = "copy"', 'kind = "guessed", source = "copy"', "kind"),
    ('value = 1e10, kind = "measured", source = "copy"', 'value = -1, kind = "measured", source = "copy"',
     "value: must be a positive finite number"),
])
def test_a_number_without_provenance_is_refused_naming_file_and_key(tmp_path, old, new, message):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(testbed_module.TestbedError) as info:
        load_testbed(path)
    text = str(info.value)
    assert text.startswith(f"{path}: memory.bandwidth_bytes_per_s") and message in text and "\n" not in text


def test_structure_errors_are_one_line(tmp_path):
    cases = {
        "unknown key": (GOOD.replace("devices_per_node = 4", "devices_per_node = 4\ngpus = 8"), "testbed.gpus"),
        "unknown table": (GOOD + "\n[network]\nx = 1\n", "unknown table 'network'"),
        "bad op": (GOOD.replace('op = "all_to_all"', 'op = "alltoall"', 1), "collective[0].op"),
        "bad shape": (GOOD.replace("shape = [64, 128, 256]", "shape = [64, 128]"), "gemm[1].shape"),
        "no gemm": (GOOD.split("[[gemm]]")[0], "at least one [[gemm]]"),
        "syntax": (GOOD.replace("name = \"t\"", "name = "), "not valid TOML"),
    }
    for what, (text, expected) in cases.items():
        path = write(tmp_path, text, f"{what.replace(' ', '_')}.toml")
        with pytest.raises(testbed_module.TestbedError) as info:
            load_testbed(path)
        assert expected in str(info.value) and "\n" not in str(info.value), what


def test_extends_overrides_by_key_and_refuses_a_loop(tmp_path):
    write(tmp_path, GOOD, "base.toml")
    child = write(tmp_path, '[testbed]\nextends = "base.toml"\nname = "child"\nnodes = 2\n'
                  '[[collective]]\nop = "all_to_all"\nscope = "intra_node"\nranks = 2\n'
                  'latency_s = { value = 9e-4, kind = "assumed", source = "a guess" }\n'
                  'bus_bandwidth_bytes_per_s = { value = 1e9, kind = "assumed", source = "a guess" }\n', "child.toml")
    testbed = load_testbed(child)
    assert testbed.name == "child" and testbed.devices == 8 and testbed.memory_capacity.value == 1e9
    at_two = [c for c in testbed.collectives if c.ranks == 2]
    assert len(at_two) == 1 and at_two[0].latency_s.value == 9e-4  # replaced, not duplicated
    write(tmp_path, '[testbed]\nextends = "b.toml"\nname = "a"\n', "a.toml")
    write(tmp_path, '[testbed]\nextends = "a.toml"\nname = "b"\n', "b.toml")
    with pytest.raises(testbed_module.TestbedError, match="loops back"):
        load_testbed(tmp_path / "a.toml")


def test_collective_fit_recovers_latency_and_bandwidth():
    alpha, busbw, ranks = 150e-6, 2e9, 4
    factor = (ranks - 1) / ranks
    sizes = [4096, 65536, 1 << 20, 4 << 20]
    raw = {"results": [{"op": "all_gather", "bytes": n, "world_size": ranks,
                        "samples_s": [alpha + n * factor / busbw * scale for scale in (0.99, 1.0, 1.01)]}
                       for n in sizes]}
    (point,) = fit_collectives(raw)
    assert point.ranks == 4 and point.op == "all_gather"
    assert point.latency_s == pytest.approx(alpha, rel=1e-6)
    assert point.bus_bandwidth_bytes_per_s == pytest.approx(busbw, rel=1e-6)


def test_a_calibrated_file_reads_back_with_every_figure_measured(tmp_path):
    text = render_testbed("local-x", "2026-12-04T00:00:00Z", "./moebench calibrate",
                        {"cpu_model": 'A "quoted" CPU', "cores": 2, "cpu_flags": ["avx2"]}, 4, 8 << 30, 2e10,
                        [GemmPoint("float32", 1, None, 5e10), GemmPoint("float32", 1, (32, 96, 256), 2e10)],
                        [CollectivePoint("all_to_all", 2, 1e-4, 1e9, (4096, 65536))], 5e-6)
    testbed = load_testbed(write(tmp_path, text))
    assert {q.kind for _, q in testbed.quantities()} == {"measured"}
    assert testbed.fingerprint["cpu_model"] == 'A "quoted" CPU' and testbed.devices == 4
    assert testbed.gemm_flops("float32", (32, 96, 256), threads=1) == 2e10
    assert testbed.per_call_s == 5e-6


def moebench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_calibrate_measures_this_machine_into_a_valid_testbed(tmp_path):
    out = tmp_path / "here.toml"
    proc = moebench("calibrate", "--workloads", "mixtral-8x7b", "--dtypes", "float32", "--threads", "1",
                    "--ranks", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    testbed = load_testbed(out)
    assert {q.kind for _, q in testbed.quantities()} == {"measured"}
    assert testbed.gemm_flops("float32", threads=1) > 1e8  # any CPU core does 0.1 GFLOP/s
    assert {c.op for c in testbed.collectives} == {"all_to_all", "all_gather", "reduce_scatter", "all_reduce"}
    assert all(c.ranks == 2 for c in testbed.collectives)
    assert testbed.fingerprint["cores"] >= 1 and testbed.fingerprint["torch"]
    assert testbed.shared_cores == testbed.fingerprint["cores"] and not testbed.overlaps_communication
    assert "all_to_all at 2 ranks" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (("--ranks", "1"), "at least 2 ranks"),
    (("--threads", "two"), "--threads takes positive integers"),
    (("--workloads", "mixtral"), "unknown workload"),
])
def test_calibrate_bad_flags_are_one_line_exit_2(args, message):
    proc = moebench("calibrate", *args, "--out", "/nonexistent/never.toml")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr


def test_testbed_directory_is_the_repositorys():
    assert TESTBED_DIR == ROOT / "testbeds"
