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
for keys, so :func:`_line_of` finds them in the text.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

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
    pattern = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
    for i in range(start, min(end, len(lines))):
        if pattern.match(lines[i]):
            return i + 1
    return start + 1


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

    def fail(self, key: str, message: str):
        line = _line_of(self.lines, key, *self.span)
        raise SuiteError(f"{self.path}:{line}: {self.what} field '{key}': {message}")

    def get(self, key: str, kind, default):
        if key not in self.table:
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            self.fail(key, f"must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def unknown(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, f"unknown field (known: {', '.join(sorted(allowed))})")


def _positive(reader: _Reader, key: str, value, minimum=0, strict=True):
    if value is not None and (value <= minimum if strict else value < minimum):
        reader.fail(key, f"must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return value


def _fraction(reader: _Reader, key: str, value):
    if value is not None and not 0 < value < 1:
        reader.fail(key, f"must be between 0 and 1, got {value!r}")
    return value


def _read_benchmark(reader: _Reader, suite_threshold: float, base_dir: Path) -> Benchmark:
    from core.values import DTYPES
    from harness.trial_spec import MODES
    from workloads.routing import ROUTINGS
    from workloads.spec import LEVELS

    reader.unknown(BENCHMARK_KEYS)
    name = reader.get("name", str, None)
    if name is None:
        reader.fail("name", "is required")
    if not NAME_PATTERN.match(name):
        reader.fail("name", f"must be letters, digits and ._+- (it names results), got {name!r}")
    reader.what = f"benchmark '{name}'"
    workload = reader.get("workload", str, None)
    config = reader.get("config", str, None)
    if workload is None and config is None:
        reader.fail("workload", "is required (a preset name, or \"custom\" with config = FILE)")
    if config is not None:
        config_path = (base_dir / config).resolve()
        if not config_path.is_file():
            reader.fail("config", f"file {config_path} does not exist")
        config = str(config_path)
    level = reader.get("level", str, "layer")
    if level not in LEVELS:
        reader.fail("level", f"must be one of {', '.join(LEVELS)}, got {level!r}")
    mode = reader.get("mode", str, None)
    if mode is not None and mode not in MODES:
        reader.fail("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    routing = reader.get("routing", str, "learned")
    if routing not in ROUTINGS:
        reader.fail("routing", f"must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    dtype = reader.get("dtype", str, "float32")
    if dtype not in DTYPES:
        reader.fail("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    systems = reader.get("systems", list, ["tutel_native"])
    if not systems or not all(isinstance(s, str) for s in systems) or len(set(systems)) != len(systems):
        reader.fail("systems", f"must be a non-empty list of distinct system names, got {systems!r}")
    cf = reader.table.get("capacity_factor")
    if cf is not None and cf != "dropless" and (isinstance(cf, bool) or not isinstance(cf, int | float) or cf <= 0):
        reader.fail("capacity_factor", f"must be a positive number or \"dropless\", got {cf!r}")
    options = reader.get("options", dict, {})
    for system, knobs in options.items():
        if system not in systems or not isinstance(knobs, dict):
            reader.fail("options", f"must map systems of this benchmark to tables of knobs, got {system} = {knobs!r}")
    overrides = reader.get("overrides", dict, {})
    return Benchmark(
        name=name, workload=workload or "custom", flavor=reader.get("flavor", str, "proxy"), config=config,
        level=level, mode=mode, routing=routing, systems=tuple(systems), dtype=dtype, capacity_factor=cf,
        seed=reader.get("seed", int, 0), warmup=_positive(reader, "warmup", reader.get("warmup", int, 2), 0, False),
        quartets=_positive(reader, "quartets", reader.get("quartets", int, 3), 0),
        input_pool=_positive(reader, "input_pool", reader.get("input_pool", int, 4), 0),
        threshold=_fraction(reader, "threshold", reader.get("threshold", float, suite_threshold)),
        options=options, overrides=overrides, line=reader.span[0] + 1,
    )


def load_suite(path: str | Path, extra_plugins: tuple[str, ...] = ()) -> Suite:
    """Parse and validate a suite file; registers its plugins (and `extra_plugins`, relative to the
    current directory) so their systems can be named. Suite.system_plugins holds them absolute."""
    import systems as system_registry
    from systems.plugins import register_plugins, resolve

    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist or is not a file")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    lines = text.splitlines()
    suite_span, bench_spans = _table_spans(lines)
    for key in data:
        if key not in ("suite", "benchmark"):
            raise SuiteError(f"{path}:{_line_of(lines, key, 0, len(lines))}: unknown table or field '{key}' "
                             "(a suite has [suite] and [[benchmark]] tables)")
    suite_table = data.get("suite", {})
    reader = _Reader(path, lines, suite_table, suite_span, "[suite]")
    reader.unknown(SUITE_KEYS)
    name = reader.get("name", str, path.stem)
    if not NAME_PATTERN.match(name):
        reader.fail("name", f"must be letters, digits and ._+- (it names the baseline file), got {name!r}")
    threshold = _fraction(reader, "threshold", reader.get("threshold", float, DEFAULT_THRESHOLD))
    confidence = _fraction(reader, "confidence", reader.get("confidence", float, DEFAULT_CONFIDENCE))
    budget = _positive(reader, "budget_s", reader.get("budget_s", float, DEFAULT_BUDGET_S))
    normalize = reader.get("normalize", str, "gemm")
    if normalize not in NORMALIZERS:
        reader.fail("normalize", f"must be one of {', '.join(NORMALIZERS)}, got {normalize!r}")
    plugins = reader.get("system_plugins", list, [])
    if not all(isinstance(ref, str) for ref in plugins):
        reader.fail("system_plugins", f"must be a list of plugin references, got {plugins!r}")
    try:
        refs = [resolve(ref, base_dir=path.parent)[0] for ref in plugins]
        register_plugins(refs)
    except ValueError as exc:
        reader.fail("system_plugins", str(exc))
    try:
        extra = [resolve(ref)[0] for ref in extra_plugins]
        register_plugins(extra)
    except ValueError as exc:
        raise SuiteError(f"--system-plugin: {exc}") from None
    refs += extra

    tables = data.get("benchmark", [])
    if not isinstance(tables, list) or not tables:
        raise SuiteError(f"{path}: a suite needs at least one [[benchmark]] table")
    benchmarks = []
    known = set(system_registry.system_names())
    for i, table in enumerate(tables):
        span = bench_spans[i] if i < len(bench_spans) else (0, len(lines))
        bench_reader = _Reader(path, lines, table, span, f"benchmark #{i + 1}")
        bench = _read_benchmark(bench_reader, threshold, path.parent)
        for system in bench.systems:
            if system not in known:
                bench_reader.fail("systems", f"unknown system {system!r}; choose from {', '.join(sorted(known))}")
        try:
            for system in bench.systems:
                bench.trial_spec(system)
        except ValueError as exc:
            bench_reader.fail("workload", str(exc))
        benchmarks.append(bench)
    names = [b.name for b in benchmarks]
    for i, bench in enumerate(benchmarks):
        if names.index(bench.name) != i:
            line = _line_of(lines, "name", *bench_spans[i])
            raise SuiteError(f"{path}:{line}: benchmark '{bench.name}' field 'name': given twice")
    return Suite(path=path.resolve(), name=name, benchmarks=tuple(benchmarks), threshold=threshold,
                 confidence=confidence, budget_s=budget, system_plugins=tuple(refs),
                 normalize=normalize)
