"""Fuzzed workload and suite files: each loads, or is refused with one InputError line -- nothing else.

Whatever a user writes into a ``--config`` workload file or a gate suite,
``resolve_workload`` and ``load_suite`` either accept it or raise InputError
(UsageError and SuiteError are InputErrors) whose message is one line. Any
other exception is a bug, and hypothesis shrinks it to a small file.

Inputs: TOML-ish text built from the tokens these files are made of, and
mutations of valid files (keys dropped, values of the wrong type, huge,
negative, NaN or infinite numbers, unknown keys, truncation, lost lines).
Derandomized and without hypothesis' database, so every run tries the same
files.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InputError
from harness.suite import load_suite
from workloads.resolve import resolve_workload

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

WORKLOAD = """\
name = "fuzz"
batch_size = 2
seq_len = 16
capacity_factor = 1.25
notes = "fuzzed"

[layer]
model_dim = 16
ffn_dim = 32
num_experts = 4
top_k = 2
activation = "gelu"
expert_bias = true

[model]
n_layers = 2
n_heads = 2
n_kv_heads = 1
vocab_size = 64
moe_every = 1
norm = "layernorm"
"""
WORKLOAD_ON_BASE = 'base = "mixtral-8x7b"\nflavor = "debug"\ncapacity_factor = "dropless"\n[layer]\ntop_k = 1\n'
SUITE = """\
[suite]
name = "fuzz"
threshold = 0.05
confidence = 0.95
budget_s = 60
normalize = "gemm"

[[benchmark]]
name = "a"
workload = "mixtral-8x7b"
flavor = "debug"
level = "layer"
mode = "forward"
routing = "balanced"
systems = ["tutel_native", "torch_reference"]
dtype = "float32"
capacity_factor = 1.5
seed = 3
warmup = 1
quartets = 2
input_pool = 2
threshold = 0.1
[benchmark.options]
tutel_native = { expert_kernel = "mm" }
[benchmark.overrides]
experts = 4

[[benchmark]]
name = "b"
workload = "custom"
config = "workload.toml"
level = "model"
"""
KEYS = ["name", "base", "flavor", "notes", "batch_size", "seq_len", "capacity_factor", "model_dim", "ffn_dim",
        "num_experts", "top_k", "activation", "expert_bias", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
        "moe_every", "norm", "dense_ffn_dim", "threshold", "confidence", "budget_s", "system_plugins", "normalize",
        "workload", "config", "level", "mode", "routing", "systems", "dtype", "seed", "warmup", "quartets",
        "input_pool", "options", "overrides", "experts", "tutel_native"]
TABLES = ["layer", "model", "suite", "benchmark", "benchmark.options", "benchmark.overrides", "optimizer"]
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.fixture(scope="module")
def directory():
    """One directory for the whole module (hypothesis re-runs the test body; a per-test tmp_path would not
    be fresh per example anyway). The suite's config = "workload.toml" finds a valid file there."""
    with tempfile.TemporaryDirectory(prefix="moebench-fuzz-") as name:
        path = Path(name)
        (path / "workload.toml").write_text(WORKLOAD)
        yield path


# ----------------------------------------------------------------- values and a small TOML writer

numbers = st.one_of(
    st.integers(min_value=-3, max_value=70),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324]),
)
words = st.sampled_from(["gelu", "swiglu", "relu", "tanh", "layer", "model", "forward", "train", "zipf", "learned",
                         "dropless", "float32", "bfloat16", "fp8", "proxy", "debug", "full", "custom",
                         "mixtral-8x7b", "gpt2-xl-moe", "tutel_native", "torch_reference", "no_such", "gemm",
                         "workload.toml", "nope.toml", "", "a/b", "x.py"])
# No ':' in strings: a plugin reference "module:Class" would import whatever module the fuzzer names.
strings = st.one_of(words, st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=["Cs"]),
                                   max_size=12))
scalars = st.one_of(numbers, strings, st.booleans())
containers = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                          max_leaves=6)
values = st.one_of(numbers, strings, st.booleans(), containers)  # mostly scalars: the wrong number, not the wrong shape


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes, but astral characters as themselves (TOML has no surrogate
    pairs) and DEL escaped (JSON leaves it, TOML refuses it raw)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return key if BARE_KEY.match(key) else toml_string(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(data: dict, prefix: str = "") -> str:
    """TOML text for `data`: scalars and inline values first, then sub-tables and arrays of tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value in tables:
        name = f"{prefix}{toml_key(key)}"
        for table in value if isinstance(value, list) else [value]:
            header = f"[[{name}]]" if isinstance(value, list) else f"[{name}]"
            lines += ["", header, to_toml(table, f"{name}.")]
    return "\n".join(lines)


# ----------------------------------------------------------------- mutations of a valid file

def _tables(data: dict) -> list[dict]:
    """Every table in `data`, itself included (mutations pick one)."""
    found = [data]
    for value in data.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                found += _tables(item)
    return found


@st.composite
def mutated(draw, text: str) -> str:
    """`text` (a valid file) with 1-4 mutations of its data, then maybe one of its text."""
    data = tomllib.loads(text)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        tables = _tables(data)  # the whole file first: drop and replace mostly leave its tables standing
        table = draw(st.sampled_from(tables if action == "add" or len(tables) == 1 else tables[1:]))
        if action == "drop" and table:
            table.pop(draw(st.sampled_from(sorted(table))))
        elif action == "replace" and table:
            table[draw(st.sampled_from(sorted(table)))] = draw(values)
        else:
            table[draw(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8)))] = draw(values)
    out = to_toml(data)
    edit = draw(st.sampled_from(["none"] * 3 + ["truncate", "drop line", "repeat line"]))
    lines = out.splitlines(keepends=True)
    if edit == "truncate":
        out = out[: draw(st.integers(0, len(out)))]
    elif edit != "none" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        out = "".join(lines[:i] + ([lines[i]] * 2 if edit == "repeat line" else []) + lines[i + 1:])
    return out


# ----------------------------------------------------------------- TOML-ish text from tokens

lines_of_toml = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS), st.one_of(values.map(toml_value), strings)),
    st.builds(lambda t: f"[{t}]", st.sampled_from(TABLES)),
    st.builds(lambda t: f"[[{t}]]", st.sampled_from(TABLES)),
    st.sampled_from(["", "# comment", "=", "[", "]]", "key =", "a = [1,", "b = {c = ", '"q" = 1', "x.y = 2",
                     "top_k = " + "9" * 5000]),  # beyond int()'s digit limit: tomllib raises a plain ValueError
    st.text(alphabet="[]=\"'{},.#abz019 _-\n\t", max_size=20),
)
toml_ish = st.lists(lines_of_toml, max_size=14).map("\n".join)


# ----------------------------------------------------------------- the property

def assert_loads_or_input_error(load) -> None:
    try:
        load()
    except InputError as exc:
        message = str(exc)
        assert message and len(message.splitlines()) == 1, repr(message)


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_valid_files_load(directory):
    """The mutations start from files that load (else they would test nothing)."""
    assert resolve_workload(None, "proxy", {}, str(_write(directory, "w.toml", WORKLOAD))).name == "fuzz"
    assert resolve_workload(None, "proxy", {}, str(_write(directory, "w.toml", WORKLOAD_ON_BASE))).layer.top_k == 1
    assert [b.name for b in load_suite(_write(directory, "s.toml", SUITE)).benchmarks] == ["a", "b"]


@FUZZ
@given(text=st.one_of(mutated(WORKLOAD), mutated(WORKLOAD_ON_BASE)))
def test_mutated_workload_files(directory, text):
    path = _write(directory, "w.toml", text)
    assert_loads_or_input_error(lambda: resolve_workload(None, "proxy", {}, str(path)))


@FUZZ
@given(text=mutated(SUITE))
def test_mutated_suite_files(directory, text):
    path = _write(directory, "s.toml", text)
    assert_loads_or_input_error(lambda: load_suite(path))


@FUZZ
@given(text=toml_ish)
def test_toml_ish_text(directory, text):
    workload, suite = _write(directory, "w.toml", text), _write(directory, "s.toml", text)
    assert_loads_or_input_error(lambda: resolve_workload(None, "proxy", {}, str(workload)))
    assert_loads_or_input_error(lambda: load_suite(suite))
