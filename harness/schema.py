"""The results file (schema "moebench.results", version 1): build, validate, write atomically, load.

Why a hand-written validator: the harness must not depend on a schema package,
and each error should name the exact place, e.g.
``trials[2].status: 'bogus' is not one of ok, skipped, ...``. Unknown extra
keys are allowed (newer writers may add fields); missing or mistyped ones are not.

Trial key note: the shared contract uses "routing" both for the routing mode
("learned"|"balanced"|"zipf", part of the trial id) and for the router's
statistics. A JSON object cannot hold both, so the mode keeps "routing" and the
statistics (RoutingStats.to_dict(), optional) go under "routing_stats".
"""
from __future__ import annotations

import datetime as dt
import math
import secrets
from pathlib import Path

from harness.errors import UsageError

SCHEMA_NAME = "moebench.results"
SCHEMA_VERSION = 1

# Level "comm" records collective micro-benchmarks (`moebench comm`): mode is the collective,
# routing "none".
LEVELS = ("layer", "model", "comm")
MODES = ("forward", "forward_backward", "train", "all_to_all", "all_reduce", "all_gather", "reduce_scatter")
ROUTINGS = ("learned", "balanced", "zipf", "none")
STATUSES = ("ok", "skipped", "error", "timeout", "oom", "nonfinite")
SUMMARY_KEYS = ("n", "median", "mean", "stdev", "min", "max", "q1", "q3", "iqr", "outliers_low", "outliers_high")

REPO_DIR = Path(__file__).resolve().parents[1]


class SchemaError(ValueError):
    """A results document does not follow the schema; the message names the path."""


# ---------------------------------------------------------------- type checks

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _fail(path: str, message: str):
    raise SchemaError(f"{path}: {message}")


def _need(obj: dict, key: str, path: str):
    if key not in obj:
        _fail(path, f"missing required key {key!r}")
    return obj[key]


def _check_type(value, path: str, kind: str, nullable: bool = False):
    if value is None:
        if not nullable:
            _fail(path, f"expected {kind}, got null")
        return
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": is_int,
        "number": is_num,
        "bool": lambda v: isinstance(v, bool),
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
    }[kind](value)
    if not ok:
        _fail(path, f"expected {kind}{' or null' if nullable else ''}, got {_kind(value)} {value!r:.60}")


def _fields(obj: dict, path: str, spec: dict[str, tuple[str, bool]]) -> None:
    """spec: key -> (kind, nullable); every key is required."""
    for key, (kind, nullable) in spec.items():
        _check_type(_need(obj, key, path), f"{path}.{key}", kind, nullable)


def _enum(value, path: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(path, f"{value!r} is not one of {', '.join(choices)}")


def _samples(values, path: str) -> None:
    _check_type(values, path, "list")
    for i, v in enumerate(values):
        if not is_num(v) or not math.isfinite(v) or v <= 0:
            _fail(f"{path}[{i}]", f"sample must be a finite positive number, got {v!r}")


def _number_dict(obj, path: str, nullable_values: bool = False) -> None:
    for key, value in obj.items():
        _check_type(value, f"{path}.{key}", "number", nullable_values)


# ---------------------------------------------------------------- validation

_TOP = {
    "run_id": ("str", False), "created_utc": ("str", False), "git": ("dict", False),
    "command_line": ("list", False), "environment": ("dict", False), "method": ("dict", False),
    "trials": ("list", False),
}
_ENV = {
    "python": ("str", False), "torch": ("str", False), "packages": ("dict", False), "platform": ("str", False),
    "hostname": ("str", False), "cpu_model": ("str", False), "cpu_count": ("int", False),
    "torch_threads": ("int", False), "gpu": ("dict", True),
}
_METHOD = {
    "timer": ("str", False), "warmup": ("int", False), "steps": ("int", False), "rounds": ("int", False),
    "interleaved": ("bool", False), "calibration": ("str", False), "notes": ("str", False),
}
_TRIAL = {
    "id": ("str", False), "system": ("str", False), "workload": ("str", False), "flavor": ("str", False),
    "level": ("str", False), "mode": ("str", False), "routing": ("str", False),
    "workload_spec": ("dict", False), "parallel": ("dict", False), "knobs": ("dict", False),
    "dtype": ("str", False), "seed": ("int", False), "status": ("str", False), "message": ("str", False),
    "samples_s": ("list", False), "per_rank_samples_s": ("list", True), "rounds": ("list", False),
    "summary": ("dict", True), "throughput": ("dict", True), "flops": ("dict", True),
    "phase_times_s": ("dict", True), "check": ("dict", True), "peak_memory_bytes": ("int", True),
}
_ROUND = {
    "round": ("int", False), "status": ("str", False), "median_s": ("number", True),
    "calibration_before_s": ("number", True), "calibration_after_s": ("number", True), "wall_s": ("number", False),
}


def _validate_summary(summary: dict, path: str, n_samples: int) -> None:
    for key in SUMMARY_KEYS:
        value = _need(summary, key, path)
        if key in ("n", "outliers_low", "outliers_high"):
            _check_type(value, f"{path}.{key}", "int")
        else:
            _check_type(value, f"{path}.{key}", "number", nullable=(key == "stdev"))
    if summary["n"] != n_samples:
        _fail(f"{path}.n", f"{summary['n']} does not match the {n_samples} samples in samples_s")


def _validate_trial(trial, path: str) -> None:
    _check_type(trial, path, "dict")
    _fields(trial, path, _TRIAL)
    _enum(trial["level"], f"{path}.level", LEVELS)
    _enum(trial["mode"], f"{path}.mode", MODES)
    _enum(trial["routing"], f"{path}.routing", ROUTINGS)
    _enum(trial["status"], f"{path}.status", STATUSES)
    _samples(trial["samples_s"], f"{path}.samples_s")
    if trial["per_rank_samples_s"] is not None:
        for r, rank_samples in enumerate(trial["per_rank_samples_s"]):
            _samples(rank_samples, f"{path}.per_rank_samples_s[{r}]")
    for i, rnd in enumerate(trial["rounds"]):
        _check_type(rnd, f"{path}.rounds[{i}]", "dict")
        _fields(rnd, f"{path}.rounds[{i}]", _ROUND)
    parallel = trial["parallel"]
    for key in ("world_size", "ep"):
        _check_type(_need(parallel, key, f"{path}.parallel"), f"{path}.parallel.{key}", "int")
    if trial["status"] == "ok":
        if not trial["samples_s"]:
            _fail(f"{path}.samples_s", "status is ok but there are no samples")
        if trial["summary"] is None:
            _fail(f"{path}.summary", "status is ok but summary is null")
    if trial["summary"] is not None:
        _validate_summary(trial["summary"], f"{path}.summary", len(trial["samples_s"]))
    if trial["throughput"] is not None:
        _number_dict(trial["throughput"], f"{path}.throughput", nullable_values=True)
    if trial["flops"] is not None:
        for key in ("executed", "useful"):
            _check_type(_need(trial["flops"], key, f"{path}.flops"), f"{path}.flops.{key}", "number", True)
    # The contract names both the routing mode and the router's statistics "routing"; the mode
    # (a string, part of the trial id) keeps that key and the statistics live under "routing_stats".
    if "routing_stats" in trial:
        _check_type(trial["routing_stats"], f"{path}.routing_stats", "dict", nullable=True)
    if trial["phase_times_s"] is not None:
        _number_dict(trial["phase_times_s"], f"{path}.phase_times_s")
    if trial["check"] is not None:
        _check_type(_need(trial["check"], "passed", f"{path}.check"), f"{path}.check.passed", "bool")


def validate(doc) -> None:
    """Raise SchemaError naming the first offending path ("trials[2].status: ...")."""
    _check_type(doc, "document", "dict")
    if doc.get("schema") != SCHEMA_NAME:
        _fail("schema", f"expected {SCHEMA_NAME!r}, got {doc.get('schema')!r}")
    version = _need(doc, "schema_version", "document")
    if version != SCHEMA_VERSION:
        _fail("schema_version", f"unsupported version {version!r} (this harness reads {SCHEMA_VERSION})")
    _fields(doc, "document", _TOP)
    _fields(doc["git"], "git", {"commit": ("str", True), "dirty": ("bool", True)})
    for i, arg in enumerate(doc["command_line"]):
        _check_type(arg, f"command_line[{i}]", "str")
    _fields(doc["environment"], "environment", _ENV)
    for name, version_str in doc["environment"]["packages"].items():
        _check_type(version_str, f"environment.packages.{name}", "str", nullable=True)
    _fields(doc["method"], "method", _METHOD)
    seen: dict[str, int] = {}
    for i, trial in enumerate(doc["trials"]):
        _validate_trial(trial, f"trials[{i}]")
        if trial["id"] in seen:
            _fail(f"trials[{i}].id", f"{trial['id']!r} repeats trials[{seen[trial['id']]}]")
        seen[trial["id"]] = i


# ---------------------------------------------------------------- building

def new_run_id(now: dt.datetime | None = None) -> str:
    """UTC time to the second plus 6 random hex digits, e.g. 20261129T003000Z-a1b2c3 (sorts by time)."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def new_document(command_line, method: dict, trials: list[dict]) -> dict:
    """A results document for this process: run_id, UTC time, git state and environment filled in."""
    from harness.environment import collect_environment, git_info

    now = dt.datetime.now(dt.UTC)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "run_id": new_run_id(now),
        "created_utc": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "git": git_info(REPO_DIR),
        "command_line": [str(a) for a in command_line],
        "environment": collect_environment(),
        "method": dict(method),
        "trials": list(trials),
    }


# ---------------------------------------------------------------- files

def write_atomic(doc: dict, path) -> Path:
    """Validate, then write atomically (harness/files.py): an invalid document never reaches disk."""
    from harness.files import write_json_atomic

    validate(doc)
    return write_json_atomic(doc, path, indent=1)


def load(path) -> dict:
    """Read and validate a results file; any problem is a UsageError with one line naming the file."""
    from harness.files import read_json

    doc = read_json(path, "results file")
    try:
        validate(doc)
    except SchemaError as exc:
        raise UsageError(f"{path} is not a valid moebench results file: {exc}") from None
    return doc
