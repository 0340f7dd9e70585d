"""The results file (schema "moebench.results", version 1): build, write atomically, load.

The document's one definition, its validation and its published JSON Schema
live in harness/results_model.py (pydantic models); this module re-exports what
callers use, so `schema.validate`, `schema.SchemaError` and the constants stay
where they always were.
"""
from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

from harness.errors import UsageError
from harness.results_model import (
    LEVELS,
    MODES,
    ROUTINGS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    STATUSES,
    SUMMARY_KEYS,
    NewerVersionError,
    SchemaError,
    is_int,
    is_num,
    validate,
)

__all__ = ["LEVELS", "MODES", "ROUTINGS", "SCHEMA_NAME", "SCHEMA_VERSION", "STATUSES", "SUMMARY_KEYS",
           "NewerVersionError", "SchemaError", "is_int", "is_num", "validate", "new_run_id", "new_document",
           "write_atomic", "load"]

REPO_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- building

def new_run_id(now: dt.datetime | None = None) -> str:
    """UTC time to the second plus 6 random hex digits, e.g. 20261129T003000Z-a1b2c3 (sorts by time)."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def utc_stamp(when: dt.datetime | None = None) -> str:
    """UTC time to the second as the harness writes it, e.g. 2026-11-29T00:30:00Z."""
    return (when or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_document(command_line, method: dict, trials: list[dict], run_id: str | None = None,
                 created_utc: str | None = None) -> dict:
    """A results document for this process: run_id, UTC time, git state and environment filled in
    (a run that planned itself earlier passes its own id and start time)."""
    from harness.environment import collect_environment, git_info

    now = dt.datetime.now(dt.UTC)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id or new_run_id(now),
        "created_utc": created_utc or utc_stamp(now),
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
    except NewerVersionError as exc:
        raise UsageError(f"{path} was written by a newer moebench: {exc}") from None
    except SchemaError as exc:
        raise UsageError(f"{path} is not a valid moebench results file: {exc}") from None
    return doc
