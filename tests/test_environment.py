"""The environment record: torch's math libraries and CPU kernels, CPU flags, and the
threading variables trial children get, parsed from this machine (no fakes of torch)."""
from __future__ import annotations

import torch

from harness import environment, schema
from harness.launch import LaunchConfig, child_env


def test_torch_build_matches_the_backends_torch_reports():
    build = environment.torch_build(torch)
    assert build["mkl_available"] == torch.backends.mkl.is_available()
    assert build["onednn_available"] == torch.backends.mkldnn.is_available()
    assert build["openmp_available"] == torch.backends.openmp.is_available()
    assert build["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if build["onednn_available"]:
        assert build["onednn_version"] and build["onednn_version"][0].isdigit()
    if build["mkl_available"]:
        assert build["mkl_version"] and build["mkl_version"][0].isdigit()


def test_cpu_flags_read_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile\n\nprocessor\t: 1\n")
    flags = environment.cpu_flags(str(cpuinfo))
    assert flags["avx2"] and flags["avx512f"] and flags["amx_tile"]
    assert not flags["avx512_bf16"] and set(flags) == set(environment.CPU_FLAGS)
    assert environment.cpu_flags(str(tmp_path / "missing")) is None


def test_trial_child_env_names_what_the_launcher_sets_and_passes(monkeypatch):
    monkeypatch.setenv("KMP_AFFINITY", "compact")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    record = environment.trial_child_env()
    assert record["set"] == sorted(child_env(LaunchConfig(threads_per_rank=1), base={}))
    assert "OMP_NUM_THREADS" in record["set"]
    assert record["passed"] == {"KMP_AFFINITY": "compact", "MKL_NUM_THREADS": "1"}
    child = child_env(LaunchConfig(threads_per_rank=1))
    assert all(child[k] == v for k, v in record["passed"].items())  # really passed through unchanged


def test_thread_record_measures_this_process():
    record = environment.thread_record()
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["torch_interop_threads"] == torch.get_num_interop_threads()


def test_the_new_keys_keep_results_valid():
    doc = schema.new_document(["moebench", "run"], {"timer": "perf_counter", "warmup": 1, "steps": 1, "rounds": 1,
                                                     "interleaved": True, "calibration": "none", "notes": ""}, [])
    assert {"cpu_flags", "torch_build", "trial_child_env"} <= set(doc["environment"])
    schema.validate(doc)
