"""A gate suite: the benchmarks a CI job gates, read from one TOML file.

Example (``benchmarks/gate_suite.toml`` is the project's own)::

    [suite]
    name = "ci"                    # the stored baseline is results/baselines/<name>.json
    threshold = 0.05               # smallest slowdown worth failing for (5%)
    confidence = 0.95              # of every interval (Holm-corrected across the suite)
    budget_s = 300                 # time for the whole suite before INCONCLUSIVE
    system_plugins = ["my_moe.py"] # plugin references, paths relative to this file

    [[benchmark]]
    name = "mixtral-proxy"
    workload = "mixtral-8x7b"      # a preset, or "custom" with config = "file.toml"
    flavor = "proxy"
    level = "layer"                # layer | model
    systems = ["tutel_native"]     # each is gated on its own
    quartets = 3                   # ABBA quartets of single steps per round
    threshold = 0.10               # this benchmark only
    [benchmark.options]            # system knobs: {system = {key = value}}
    tutel_native = { expert_kernel = "mm" }
    [benchmark.overrides]          # workload fields, as `moebench run`'s flags
    experts = 16

Every error is one line: the file, the line and the field (``gate.toml:12:
benchmark 'mixtral-proxy' field 'systems': ...``). tomllib gives no positions
for keys, so :func:`_line_of` finds them in the text (core/toml_lines.py).
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError
from core.names import unknown_name_message
from core.toml_lines import line_of_key, syntax_error_line, syntax_error_text, top_level_line
from harness.errors import UsageError

DEFAULT_THRESHOLD = 0.05
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BUDGET_S = 300.0
NORMALIZERS = ("gemm", "torch_reference")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

SUITE_KEYS = {"name", "threshold", "confidence", "budget_s", "system_plugins", "normalize"}
BENCHMARK_KEYS = {"name", "workload", "flavor", "config", "level", "mode", "routing", "systems", "dtype",
                  "capacity_factor", "seed", "warmup", "quartets", "input_pool", "threshold", "options", "overrides"}


class SuiteError(UsageError):
    """A suite file problem, as one line naming the file, the line and the field."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    workload: str
    flavor: str = "proxy"
    config: str | None = None  # absolute path of a custom workload's TOML
    level: str = "layer"
    mode: str | None = None  # None: forward_backward for layer, train for model
    routing: str = "learned"
    systems: tuple[str, ...] = ("tutel_native",)
    dtype: str = "float32"
    capacity_factor: float | str | None = None  # None: the workload's; "dropless"
    seed: int = 0
    warmup: int = 2  # untimed steps after the worker's set-up
    quartets: int = 3  # ABBA quartets of single timed steps per round (each side times 2 per quartet)
    input_pool: int = 4
    threshold: float = DEFAULT_THRESHOLD
    options: dict = field(default_factory=dict)  # system -> {knob: value}
    overrides: dict = field(default_factory=dict)  # run-flag name -> value
    line: int = 0  # line of its [[benchmark]] header

    def resolve_workload(self):
        from harness.commands.run import OVERRIDES
        from workloads.resolve import resolve_workload

        fields = {OVERRIDES[k]: v for k, v in self.overrides.items()}
        if self.capacity_factor is not None:
            fields["capacity_factor"] = self.capacity_factor
        return resolve_workload(self.workload, self.flavor, fields, self.config)

    def trial_spec(self, system: str, plugins: tuple[str, ...] = ()):
        """The TrialSpec of one gated system (one process, no reference check: the gate's
        work channel compares the two sides with each other instead)."""
        from core.values import MoEKnobs, ParallelSpec
        from harness.commands.run import DEFAULT_MODE
        from harness.trial_spec import TrialSpec

        workload = self.resolve_workload()
        knobs = MoEKnobs(capacity_factor=workload.capacity_factor, dtype=self.dtype, seed=self.seed,
                         options=dict(self.options.get(system, {})))
        spec = TrialSpec(system, workload, self.level, self.mode or DEFAULT_MODE[self.level], self.routing, knobs,
                         ParallelSpec(), warmup=self.warmup, steps=2 * self.quartets, check=False,
                         input_pool=self.input_pool, plugins=tuple(plugins))
        spec.validate()
        return spec


@dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    benchmarks: tuple[Benchmark, ...]
    threshold: float = DEFAULT_THRESHOLD
    confidence: float = DEFAULT_CONFIDENCE
    budget_s: float = DEFAULT_BUDGET_S
    system_plugins: tuple[str, ...] = ()
    normalize: str = "gemm"  # what a stored baseline divides times by

    def items(self) -> list[tuple[Benchmark, str]]:
        """(benchmark, system) pairs: each is gated and reported on its own."""
        return [(b, s) for b in self.benchmarks for s in b.systems]


def _line_of(lines: list[str], key: str, start: int, end: int) -> int:
    """1-based line of `key = ...` between lines start..end (0-based, end exclusive); else start + 1."""
    return line_of_key(lines, key, start, end) or start + 1


def _table_spans(lines: list[str]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(span of [suite], spans of each [[benchmark]] including its sub-tables), 0-based line ranges."""
    headers = [(i, line.strip()) for i, line in enumerate(lines) if re.match(r"^\s*\[", line)]
    suite_span, bench_spans = (0, 0), []
    for n, (i, header) in enumerate(headers):
        end = headers[n + 1][0] if n + 1 < len(headers) else len(lines)
        if header.startswith("[[benchmark]]"):
            bench_spans.append((i, end))
        elif header.startswith("[benchmark.") and bench_spans:
            bench_spans[-1] = (bench_spans[-1][0], end)
        elif header.startswith("[suite]"):
            suite_span = (i, end)
    return suite_span, bench_spans


class _Reader:
    """Typed field access that fails with file:line and the field's name."""

    def __init__(self, path: Path, lines: list[str], table: dict, span: tuple[int, int], what: str):
        self.path, self.lines, self.table, self.span, self.what = path, lines, table, span, what

    def fail(self, key: str, message: str, line_key: str | None = None):
        """SuiteError naming field `key`, at the line that sets `line_key` (default: `key`)."""
        line = _line_of(self.lines, line_key or key, *self.span)
        raise SuiteError(f"{self.path}:{line}: {self.what} field '{key}': {message}", key)

    def get(self, key: str, kind, default):
        if key not in self.table:
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2**1000 else math.inf  # no OverflowError for 10**400
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            self.fail(key, f"must be {getattr(kind, '__name__', kind)}, got {value!r}")
        if kind is float and not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {self.table[key]!r}")
        return value

    def choice(self, key: str, kind: str, choices, default):
        """A string field that must be one of `choices`; the closest ones are named when it is not."""
        value = self.get(key, str, default)
        if value is not None and value not in choices:
            self.fail(key, unknown_name_message(kind, value, choices))
        return value

    def unknown(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, unknown_name_message("field", key, sorted(allowed)))


def _positive(reader: _Reader, key: str, value, minimum=0, strict=True):
    if value is not None and (value <= minimum if strict else value < minimum):
        reader.fail(key, f"must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return value


def _fraction(reader: _Reader, key: str, value):
    if value is not None and not 0 < value < 1:
        reader.fail(key, f"must be between 0 and 1, got {value!r}")
    return value


def _capacity_factor(reader: _Reader):
    from core.values import is_finite_positive

    cf = reader.table.get("capacity_factor")
    if cf is not None and cf != "dropless" and not is_finite_positive(cf):
        reader.fail("capacity_factor", f"must be a positive number or \"dropless\", got {cf!r}")
    return cf


def _config(reader: _Reader, base_dir: Path) -> str | None:
    """The custom workload file, absolute; it must exist (its contents are read with the workload)."""
    config = reader.get("config", str, None)
    if config is None:
        return None
    try:
        config_path = (base_dir / config).resolve()
        exists = config_path.is_file()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long: the path itself is bad
        reader.fail("config", f"is not a usable path: {exc}")
    if not exists:
        reader.fail("config", f"file {config_path} does not exist")
    return str(config_path)


def _systems(reader: _Reader) -> list[str]:
    systems = reader.get("systems", list, ["tutel_native"])
    if not systems or not all(isinstance(s, str) for s in systems) or len(set(systems)) != len(systems):
        reader.fail("systems", f"must be a non-empty list of distinct system names, got {systems!r}")
    return systems


def _options(reader: _Reader, systems: list[str]) -> dict:
    options = reader.get("options", dict, {})
    for system, knobs in options.items():
        if system not in systems or not isinstance(knobs, dict):
            reader.fail("options", f"must map systems of this benchmark to tables of knobs, got {system} = {knobs!r}")
    return options


def _overrides(reader: _Reader) -> dict:
    """Workload fields by `moebench run`'s flag names (experts = 16); unknown names are refused here."""
    from harness.commands.run import OVERRIDES

    overrides = reader.get("overrides", dict, {})
    for key in overrides:
        if key not in OVERRIDES:
            reader.fail(f"overrides.{key}", unknown_name_message("override", key, OVERRIDES), line_key=key)
    return overrides


def _read_benchmark(reader: _Reader, suite_threshold: float, base_dir: Path) -> Benchmark:
    from core.values import DTYPES
    from harness.trial_spec import MODES
    from workloads.routing import ROUTINGS
    from workloads.spec import LEVELS

    name = reader.table.get("name")
    if isinstance(name, str) and NAME_PATTERN.match(name):
        reader.what = f"benchmark '{name}'"  # a misspelt field is then named with its benchmark
    reader.unknown(BENCHMARK_KEYS)
    name = reader.get("name", str, None)
    if name is None:
        reader.fail("name", "is required")
    if not NAME_PATTERN.match(name):
        reader.fail("name", f"must be letters, digits and ._+- (it names results), got {name!r}")
    workload = reader.get("workload", str, None)
    config = _config(reader, base_dir)
    if workload is None and config is None:
        reader.fail("workload", "is required (a preset name, or \"custom\" with config = FILE)")
    level = reader.choice("level", "level", LEVELS, "layer")
    mode = reader.choice("mode", "mode", MODES, None)
    routing = reader.choice("routing", "routing", ROUTINGS, "learned")
    if level == "model" and routing != "learned":
        reader.fail("routing", f"{routing} applies at layer level only: the model level routes every MoE layer "
                               "with its learned gate (use level = \"layer\", or leave routing at learned)")
    dtype = reader.choice("dtype", "dtype", tuple(DTYPES), "float32")
    systems = _systems(reader)
    return Benchmark(
        name=name, workload=workload or "custom", flavor=reader.get("flavor", str, "proxy"), config=config,
        level=level, mode=mode, routing=routing, systems=tuple(systems), dtype=dtype,
        capacity_factor=_capacity_factor(reader),
        seed=reader.get("seed", int, 0), warmup=_positive(reader, "warmup", reader.get("warmup", int, 2), 0, False),
        quartets=_positive(reader, "quartets", reader.get("quartets", int, 3), 0),
        input_pool=_positive(reader, "input_pool", reader.get("input_pool", int, 4), 0),
        threshold=_fraction(reader, "threshold", reader.get("threshold", float, suite_threshold)),
        options=_options(reader, systems), overrides=_overrides(reader), line=reader.span[0] + 1,
    )


# A workload or trial field a benchmark's own field sets (TrialSpec calls the quartets' steps "steps").
BENCHMARK_FIELD_OF = {"flavor": "flavor", "workload": "workload", "capacity_factor": "capacity_factor",
                      "seed": "seed", "dtype": "dtype", "level": "level", "mode": "mode", "routing": "routing",
                      "warmup": "warmup", "input_pool": "input_pool", "steps": "quartets"}


def _fail_trial_spec(reader: _Reader, bench: Benchmark, exc: InputError):
    """A benchmark whose workload or trial is refused: named by the field that set the bad value
    (an override, the config file, or the benchmark's own field), else 'workload'."""
    from harness.commands.run import OVERRIDES

    flags = {OVERRIDES[k]: k for k in bench.overrides}
    if exc.field in flags:
        reader.fail(f"overrides.{flags[exc.field]}", str(exc), line_key=flags[exc.field])
    if bench.config and str(exc).startswith(bench.config):
        reader.fail("config", str(exc))
    field_name = BENCHMARK_FIELD_OF.get(exc.field, "workload")
    if field_name == "capacity_factor" and bench.capacity_factor is None:
        field_name = "workload"  # the workload's own value
    reader.fail(field_name, str(exc))


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist or is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SuiteError(f"cannot read suite file {path}: {reason}") from None


def _parse(path: Path, text: str) -> dict:
    try:
        return tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or int()'s digit limit on a 5000-digit number
        line = syntax_error_line(exc)
        raise SuiteError(f"{path}{f':{line}' if line else ''}: not valid TOML: {syntax_error_text(exc)}") from None


def _plugins(reader: _Reader, base_dir: Path, extra_plugins: tuple[str, ...]) -> list[str]:
    """Register the suite's plugins (relative to its file) and the command line's; their absolute references."""
    from systems.plugins import register_plugins, resolve

    plugins = reader.get("system_plugins", list, [])
    if not all(isinstance(ref, str) for ref in plugins):
        reader.fail("system_plugins", f"must be a list of plugin references, got {plugins!r}")
    try:
        refs = [resolve(ref, base_dir=base_dir)[0] for ref in plugins]
        register_plugins(refs)
    except ValueError as exc:
        reader.fail("system_plugins", str(exc))
    try:
        extra = [resolve(ref)[0] for ref in extra_plugins]
        register_plugins(extra)
    except ValueError as exc:
        raise SuiteError(f"--system-plugin: {exc}") from None
    return refs + extra


def _check_benchmark(reader: _Reader, bench: Benchmark, known: set[str]) -> None:
    for system in bench.systems:
        if system not in known:
            reader.fail("systems", unknown_name_message("system", system, sorted(known)))
    try:
        for system in bench.systems:
            bench.trial_spec(system)
    except InputError as exc:
        _fail_trial_spec(reader, bench, exc)


def load_suite(path: str | Path, extra_plugins: tuple[str, ...] = ()) -> Suite:
    """Parse and validate a suite file; registers its plugins (and `extra_plugins`, relative to the
    current directory) so their systems can be named. Suite.system_plugins holds them absolute."""
    import systems as system_registry

    path = Path(path)
    text = _read_text(path)
    data = _parse(path, text)
    lines = text.splitlines()
    suite_span, bench_spans = _table_spans(lines)
    for key in data:
        if key not in ("suite", "benchmark"):
            raise SuiteError(f"{path}:{top_level_line(lines, key) or 1}: "
                             f"{unknown_name_message('table or field', key, ('suite', 'benchmark'))} "
                             "(a suite has [suite] and [[benchmark]] tables)", key)
    suite_table = data.get("suite", {})
    if not isinstance(suite_table, dict):
        raise SuiteError(f"{path}:{top_level_line(lines, 'suite') or 1}: 'suite' must be a table ([suite]), "
                         f"got {suite_table!r}", "suite")
    reader = _Reader(path, lines, suite_table, suite_span, "[suite]")
    reader.unknown(SUITE_KEYS)
    name = reader.get("name", str, path.stem)
    if not NAME_PATTERN.match(name):
        reader.fail("name", f"must be letters, digits and ._+- (it names the baseline file), got {name!r}")
    threshold = _fraction(reader, "threshold", reader.get("threshold", float, DEFAULT_THRESHOLD))
    confidence = _fraction(reader, "confidence", reader.get("confidence", float, DEFAULT_CONFIDENCE))
    budget = _positive(reader, "budget_s", reader.get("budget_s", float, DEFAULT_BUDGET_S))
    normalize = reader.choice("normalize", "normalizer", NORMALIZERS, "gemm")
    refs = _plugins(reader, path.parent, extra_plugins)

    tables = data.get("benchmark", [])
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise SuiteError(f"{path}: a suite needs at least one [[benchmark]] table (and nothing else under "
                         "'benchmark')", "benchmark")
    benchmarks, readers = [], []
    known = set(system_registry.system_names())
    for i, table in enumerate(tables):
        span = bench_spans[i] if i < len(bench_spans) else (0, len(lines))
        bench_reader = _Reader(path, lines, table, span, f"benchmark #{i + 1}")
        bench = _read_benchmark(bench_reader, threshold, path.parent)
        _check_benchmark(bench_reader, bench, known)
        benchmarks.append(bench)
        readers.append(bench_reader)
    names = [b.name for b in benchmarks]
    for i, bench in enumerate(benchmarks):
        if names.index(bench.name) != i:
            readers[i].fail("name", "given twice")
    return Suite(path=path.resolve(), name=name, benchmarks=tuple(benchmarks), threshold=threshold,
                 confidence=confidence, budget_s=budget, system_plugins=tuple(refs),
                 normalize=normalize)
