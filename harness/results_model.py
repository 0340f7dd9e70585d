"""The one definition of a results document (schema "moebench.results", version 1), as pydantic models.

Why models: the same definition validates documents (`validate`) and publishes
the JSON Schema that other tools check against (`json_schema`, committed as
docs/results.schema.json), so the two cannot drift apart. Types are strict (a
bool is not an int, a string is not a number); unknown extra keys are allowed
everywhere, since newer writers may add fields. Errors name the exact path
first, in the harness's style (``trials[2].status: 'bogus' is not one of ok,
skipped, ...``), not in pydantic's.

Trial key note: the shared contract uses "routing" both for the routing mode
("learned"|"balanced"|"zipf", part of the trial id) and for the router's
statistics. A JSON object cannot hold both, so the mode keeps "routing" and the
statistics (RoutingStats.to_dict(), optional) go under "routing_stats".

After changing a model, run ``python -m harness.results_model --write``.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

SCHEMA_NAME = "moebench.results"
SCHEMA_VERSION = 1

# Level "comm" records collective micro-benchmarks (`moebench comm`): mode is the collective, routing "none".
LEVELS = ("layer", "model", "comm")
COLLECTIVES = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter")  # level "comm" modes (harness/comm.py)
MODES = ("forward", "forward_backward", "train", *COLLECTIVES)
ROUTINGS = ("learned", "balanced", "zipf", "none")
# "too_large": the memory guard refused to launch the trial (it would not fit).
STATUSES = ("ok", "skipped", "error", "timeout", "oom", "nonfinite", "too_large")

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "results.schema.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DOCUMENT_DESCRIPTION = (
    "One moebench run (schema \"moebench.results\"): where and how it ran (git state, command line, environment, "
    "timing method) and one entry per trial (a system on one workload, level, mode, routing and parallel layout) "
    "with its status, timed samples in seconds, their summary, throughput, FLOPs and equivalence check. Written "
    "by `moebench run` and `moebench comm` into results/; read by `moebench report` and `moebench convert`. "
    "Unknown keys are allowed (newer writers may add fields). Two rules this schema cannot express: a trial's "
    "summary.n equals the number of its samples_s, and trial ids are unique within the document. "
    "Described in docs/results-schema.md."
)


class SchemaError(Exception):
    """A results document does not follow the schema; the message names the path.

    Not a ValueError: a document the harness itself built that fails here is an internal error, not bad input."""


class NewerVersionError(SchemaError):
    """The document was written by a newer harness; it may be fine, this one cannot read it."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ---------------------------------------------------------------- models

# Dict keys are left unchecked (Any): JSON keys are strings anyway, and the harness never checked them.
Sample = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a time in seconds: finite and positive")]
Duration = Annotated[float, Field(ge=0, allow_inf_nan=False, description="a duration in seconds: finite, >= 0")]


class _Open(BaseModel):
    """Strict types, extra keys kept: a newer writer's additions must not make a document invalid."""

    model_config = ConfigDict(strict=True, extra="allow")


def _rule(at: str, message: str) -> PydanticCustomError:
    """A cross-field rule's failure; `at` is the path below the model that failed, for the message."""
    return PydanticCustomError("moebench_rule", "{message}", {"at": at, "message": message})


class Git(_Open):
    """The code that ran; null where the harness ran outside a git checkout."""

    commit: str | None
    dirty: bool | None = Field(description="tracked files differed from the commit")


class Environment(_Open):
    """The machine and software the trials ran on, so a reader can judge whether runs compare."""

    python: str
    torch: str
    packages: dict[Any, str | None] = Field(description="package name -> installed version, null if absent")
    platform: str
    hostname: str
    cpu_model: str
    cpu_count: int
    torch_threads: int
    gpu: dict[Any, Any] | None


class Method(_Open):
    """How the samples were taken."""

    timer: str
    warmup: int = Field(description="untimed steps before timing")
    steps: int = Field(description="timed steps per round")
    rounds: int
    interleaved: bool = Field(description="systems alternate across rounds, so drift hits all alike")
    calibration: str
    notes: str


class Parallel(_Open):
    """The trial's parallel layout (other sizes such as tp and dp may be present)."""

    world_size: int
    ep: int = Field(description="expert-parallel size")


class Round(_Open):
    """One round of a trial: a fresh process timing `steps` steps."""

    round: int
    status: str
    median_s: float | None
    calibration_before_s: float | None = Field(description="the calibration matmul's time before the round")
    calibration_after_s: float | None
    wall_s: float
    exposed_comm_median_s: float | None = Field(None, description="median of the round's exposed communication")


class Prediction(_Open):
    """The performance model's figures for this trial (`run --predict`), beside what was measured."""

    testbed: str = Field(description="the testbed file's name (testbeds/*.toml)")
    model: str = Field(description="which model made it (harness/perfmodel/...)")
    step_s: float = Field(description="predicted step time, seconds")
    exposed_comm_s: float
    phases_s: dict[Any, float]
    degrees: dict[Any, int]


class Summary(_Open):
    """Statistics of samples_s (numpy linear quantiles; outliers beyond 1.5 IQR)."""

    n: int = Field(description="equals the number of samples_s")
    median: float
    mean: float
    stdev: float | None = Field(description="null with a single sample")
    min: float
    max: float
    q1: float
    q3: float
    iqr: float
    outliers_low: int
    outliers_high: int


SUMMARY_KEYS = tuple(Summary.model_fields)


class Flops(_Open):
    """Floating-point operations per step: executed (including padding and dropped work) and useful."""

    executed: float | None
    useful: float | None


class Check(_Open):
    """The equivalence check against the reference; the errors and tolerance sit beside `passed`."""

    passed: bool


# In JSON Schema terms, the rule Trial._ok_means_measured enforces for status "ok".
_OK_NEEDS_SAMPLES = {
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {"properties": {"samples_s": {"minItems": 1}, "summary": {"not": {"type": "null"}}}},
}


class Trial(_Open):
    """One system on one piece of work: identity, setup, outcome and measurements."""

    model_config = ConfigDict(json_schema_extra=_OK_NEEDS_SAMPLES)

    id: str = Field(description="readable dimensions plus a digest of the full work; unique in the document")
    system: str
    workload: str
    flavor: str
    level: Literal[LEVELS]
    mode: Literal[MODES]
    routing: Literal[ROUTINGS] = Field(description="the routing regime of the inputs (not the router's statistics)")
    workload_spec: dict[Any, Any]
    parallel: Parallel
    knobs: dict[Any, Any]
    dtype: str
    seed: int
    status: Literal[STATUSES] = Field(description="ok needs samples and a summary; any other status says why not")
    message: str
    samples_s: list[Sample] = Field(description="every timed step of the successful rounds, seconds (pooled to "
                                                "describe the trial; comparisons pair the rounds' medians)")
    per_rank_samples_s: list[list[Sample]] | None
    exposed_comm_s: list[Duration] | None = Field(
        None, description="per timed step, beside samples_s: seconds the step's thread spent blocked in "
                          "torch.distributed collectives and their waits (communication no compute overlapped); "
                          "null for one rank or on a GPU")
    rounds: list[Round]
    summary: Summary | None
    throughput: dict[Any, float | None] | None
    flops: Flops | None
    routing_stats: dict[Any, Any] | None = Field(None, description="the router's statistics, when recorded")
    phase_times_s: dict[Any, float] | None
    check: Check | None
    peak_memory_bytes: int | None = Field(description="peak memory per rank of the system's own steps, bytes")
    peak_memory_scope: str | None = Field(None, description="what peak_memory_bytes covers")
    process_peak_memory_bytes: int | None = Field(
        None, description="the whole trial process's peak, the reference check included, bytes")
    memory_guard: str | None = Field(None, description="the memory guard's estimate before launch, and its verdict")
    work_key: str | None = Field(None, description="digest of the work without the system: equal keys, same work")
    setup: dict[Any, Any] | None = Field(None, description="method settings that change what a trial measures")
    plugins: list[str] | None = Field(None, description="the plugin reference a plugin system was loaded from")
    prediction: Prediction | None = Field(None, description="the performance model's prediction (run --predict)")

    @model_validator(mode="after")
    def _ok_means_measured(self) -> Trial:
        if self.status == "ok" and not self.samples_s:
            raise _rule("samples_s", "status is ok but there are no samples")
        if self.status == "ok" and self.summary is None:
            raise _rule("summary", "status is ok but summary is null")
        if self.summary is not None and self.summary.n != len(self.samples_s):
            raise _rule("summary.n", f"{self.summary.n} does not match the {len(self.samples_s)} samples in samples_s")
        return self


class ResultsDocument(_Open):
    """One run's results document."""

    schema_name: Literal[SCHEMA_NAME] = Field(alias="schema")
    schema_version: Literal[SCHEMA_VERSION] = Field(description="a reader refuses versions it does not know")
    run_id: str = Field(description="UTC time to the second plus 6 hex digits, e.g. 20261129T003000Z-a1b2c3")
    created_utc: str
    git: Git
    command_line: list[str]
    environment: Environment
    method: Method
    trials: list[Trial]

    @model_validator(mode="after")
    def _trial_ids_unique(self) -> ResultsDocument:
        first: dict[str, int] = {}
        for i, trial in enumerate(self.trials):
            if trial.id in first:
                raise _rule(f"trials[{i}].id", f"{trial.id!r} repeats trials[{first[trial.id]}]")
            first[trial.id] = i
        return self


# ---------------------------------------------------------------- validation

def validate(doc) -> None:
    """Raise SchemaError naming the first offending path ("trials[2].status: ...")."""
    _check_identity(doc)
    try:
        ResultsDocument.model_validate(doc)
    except ValidationError as exc:
        raise SchemaError(_describe(exc.errors(include_url=False)[0])) from None


def _check_identity(doc) -> None:
    """Name and version first: a newer or foreign document gets that reason, not its first odd field."""
    if not isinstance(doc, dict):
        raise SchemaError(f"document: expected dict, got {_kind(doc)} {doc!r:.60}")
    if doc.get("schema") != SCHEMA_NAME:
        raise SchemaError(f"schema: expected {SCHEMA_NAME!r}, got {doc.get('schema')!r}")
    if "schema_version" not in doc:
        raise SchemaError("document: missing required key 'schema_version'")
    version = doc["schema_version"]
    if is_int(version) and version > SCHEMA_VERSION:
        raise NewerVersionError(f"schema_version {version} is newer than this harness reads ({SCHEMA_VERSION})")
    if not is_int(version) or version != SCHEMA_VERSION:
        raise SchemaError(f"schema_version: unsupported version {version!r} (this harness reads {SCHEMA_VERSION})")


_EXPECTED = {"int_type": "int", "string_type": "str", "bool_type": "bool", "float_type": "number",
             "list_type": "list", "dict_type": "dict", "model_type": "dict", "model_attributes_type": "dict"}


def _describe(error: dict) -> str:
    """One pydantic error as "path: what is wrong", in the words the harness has always used."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    if kind == "missing":
        return f"{_path(loc[:-1])}: missing required key {loc[-1]!r}"
    if kind == "moebench_rule":
        at = error["ctx"]["at"]
        return f"{_join(loc, at)}: {error['ctx']['message']}"
    annotation = _annotation_at(loc)
    nullable, annotation = _split_optional(annotation)
    if annotation == Sample:
        return f"{_value_path(loc)}: sample must be a finite positive number, got {value!r}"
    if kind == "literal_error":
        return f"{_value_path(loc)}: {_not_one_of(value, typing.get_args(annotation), nullable)}"
    if kind in _EXPECTED:
        return f"{_value_path(loc)}: {_expected(_EXPECTED[kind], value, nullable)}"
    return f"{_value_path(loc)}: {error['msg']}"


def _not_one_of(value, choices: tuple, nullable: bool) -> str:
    if not isinstance(value, str):  # a wrong type is named as such, as for any other field
        return _expected("str", value, nullable)
    return f"{value!r} is not one of {', '.join(choices)}"


def _expected(kind: str, value, nullable: bool) -> str:
    if value is None:
        return f"expected {kind}, got null"
    return f"expected {kind}{' or null' if nullable else ''}, got {_kind(value)} {value!r:.60}"


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _path(loc: tuple) -> str:
    """("trials", 2, "status") -> "trials[2].status"; the document itself is "document"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "document"


def _value_path(loc: tuple) -> str:
    """Where a wrong value sits: a top-level key reads "document.trials", a nested one "git.dirty"."""
    return f"document.{loc[0]}" if len(loc) == 1 else _path(loc)


def _join(loc: tuple, below: str) -> str:
    """The path of `below` inside the model at `loc` (a document-level rule names its own full path)."""
    return f"{_path(loc)}.{below}" if loc else below


def _annotation_at(loc: tuple):
    """The declared type at `loc`, or None where the path leaves the models (an extra key, an Any)."""
    annotation: Any = ResultsDocument
    for part in loc:
        _, annotation = _split_optional(annotation)
        annotation = _step(annotation, part)
        if annotation is None:
            return None
    return annotation


def _step(annotation, part):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = {field.alias or name: field for name, field in annotation.model_fields.items()}
        return fields[part].annotation if part in fields else None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _split_optional(annotation) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False, annotation
    rest = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(rest) != 1:  # the models use no other unions
        return False, annotation
    return True, rest[0]


# ---------------------------------------------------------------- JSON Schema

def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a results document, as the models define it."""
    generated = ResultsDocument.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, **generated, "title": "moebench results document",
            "description": DOCUMENT_DESCRIPTION}


def json_schema_text() -> str:
    """json_schema() as committed: indented, keys sorted, so regenerating it changes nothing unless a model did."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.results_model",
                                     description="print the results document's JSON Schema, or rewrite "
                                                 f"{SCHEMA_FILE.relative_to(SCHEMA_FILE.parents[1])}")
    parser.add_argument("--write", action="store_true", help="rewrite the committed schema file")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(json_schema_text())
        return 0
    from harness.files import write_text_atomic

    print(f"wrote {write_text_atomic(json_schema_text(), SCHEMA_FILE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
