"""Stored gate baselines: ``results/baselines/<suite>.json``, with the environment they hold for.

A stored baseline has no partner process to pair with, so its times are
normalised by a reference measured next to them in the same process
(the suite's ``normalize``: a GEMM of the benchmark's own size, or
torch_reference on the same work). A normalised time only transfers to a
machine that runs the same kernels at the same relative speeds, hence the
fingerprint: CPU model and capability flags, cores, torch version and build,
threads, and hashes of the suite's benchmark definitions and resolved
workloads. Gating against a baseline whose fingerprint differs is refused
(``--force`` overrides) with one line naming what differs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from harness.errors import UsageError
from harness.identity import stable_hash

BASELINE_SCHEMA = "moebench-gate-baseline"
BASELINE_VERSION = 1
DEFAULT_DIR = Path("results") / "baselines"


def benchmark_definition(bench) -> dict:
    """What a benchmark measures (thresholds and file positions excluded: they do not change the times)."""
    data = dataclasses.asdict(bench)
    for key in ("threshold", "line"):
        data.pop(key)
    return data


def fingerprint(suite) -> dict:
    import torch

    from harness.environment import cpu_flags, cpu_model, torch_build

    build = torch_build(torch)
    workloads = {b.name: stable_hash(dataclasses.asdict(b.resolve_workload())) for b in suite.benchmarks}
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": build["cpu_capability"],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_build": {k: build[k] for k in ("blas", "mkl_version", "onednn_version", "parallel_backend")},
        "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "suite": stable_hash([benchmark_definition(b) for b in suite.benchmarks] + [suite.normalize]),
        "workloads": workloads,
    }


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
    return [f"{key} {stored.get(key)!r} (baseline) vs {current.get(key)!r} (here)"
            for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]


def baseline_path(suite, directory: Path | None = None) -> Path:
    return (directory or DEFAULT_DIR) / f"{suite.name}.json"


def new_baseline(suite, items: dict, command_line: list[str]) -> dict:
    from harness.environment import git_info
    from harness.gate_process import MOEBENCH_ROOT
    from harness.schema import utc_stamp

    return {
        "schema": BASELINE_SCHEMA, "schema_version": BASELINE_VERSION,
        "created_utc": utc_stamp(),
        "suite": suite.name, "suite_file": str(suite.path), "normalize": suite.normalize,
        "git": git_info(MOEBENCH_ROOT), "command_line": command_line,
        "fingerprint": fingerprint(suite), "items": items,
    }


def load_baseline(path: Path) -> dict:
    """A stored baseline, or a one-line UsageError naming the file and the problem."""
    from harness.files import read_json

    if not path.exists():
        raise UsageError(f"no stored baseline {path}; write one with `moebench baseline SUITE.toml`, "
                         "or gate against a revision with --baseline-ref REV")
    doc = read_json(path, "stored baseline")
    if not isinstance(doc, dict) or doc.get("schema") != BASELINE_SCHEMA or not isinstance(doc.get("items"), dict):
        raise UsageError(f"{path} is not a moebench gate baseline")
    if doc.get("schema_version") != BASELINE_VERSION:
        raise UsageError(f"{path} has baseline schema version {doc.get('schema_version')!r}; "
                         f"this moebench reads version {BASELINE_VERSION}")
    return doc


def require_same_environment(doc: dict, suite, path: Path, force: bool) -> list[str]:
    """The fingerprint differences (empty when equal); refuses unless `force`."""
    differences = fingerprint_differences(doc.get("fingerprint") or {}, fingerprint(suite))
    if differences and not force:
        raise UsageError(f"stored baseline {path} was measured in a different environment: {differences[0]}"
                         f"{f' (and {len(differences) - 1} more)' if len(differences) > 1 else ''}; "
                         "rerun `moebench baseline` here, or pass --force")
    return differences
