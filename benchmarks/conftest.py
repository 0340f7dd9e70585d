"""pytest options and pytest-benchmark hooks for benchmarks/.

* ``--moebench-suite FILE``: the gate suite whose benchmarks
  ``benchmarks/test_gate_suite.py`` runs (default: benchmarks/gate_suite.toml).
* Saved files (``--benchmark-autosave``, ``--benchmark-save``, ``--benchmark-json``)
  get this machine's moebench environment record in ``machine_info`` and, for
  the gate suite's benchmarks, their raw samples in ``stats.data`` even without
  ``--benchmark-save-data`` (a few dozen numbers each), so ``moebench convert``
  can turn them into a results document with samples (harness/convert.py).
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--moebench-suite", metavar="FILE", default=None,
                     help="gate suite file for benchmarks/test_gate_suite.py (default: benchmarks/gate_suite.toml)")


def pytest_configure(config):
    path = config.getoption("moebench_suite")
    if path:  # a bad suite file is one usage line, before anything is collected
        from harness.errors import UsageError
        from harness.suite import load_suite

        try:
            load_suite(path)
        except UsageError as exc:
            raise pytest.UsageError(f"--moebench-suite: {exc}") from None


def pytest_benchmark_update_machine_info(config, machine_info):
    from harness.convert import ENV_KEY
    from harness.environment import collect_environment

    machine_info[ENV_KEY] = collect_environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from harness.convert import SPEC_KEY

    samples = {bench.fullname: list(bench.stats.data) for bench in benchmarks if bench}
    for entry in output_json.get("benchmarks", []):
        if SPEC_KEY in (entry.get("extra_info") or {}) and "data" not in entry["stats"]:
            if entry["fullname"] in samples:
                entry["stats"]["data"] = samples[entry["fullname"]]
