"""A testbed as data: what the performance model needs to know about a machine or cluster.

Why data and not code: a paper's table was measured on hardware nobody here
has, and what we know about it ranges from measured to datasheet to plain
assumption. Every number in a testbed file therefore says which it is and
where it comes from, and a prediction can say what it rests on.

A testbed file (TOML, ``testbeds/*.toml``; full description in
docs/testbeds.md)::

    [testbed]
    name = "h100-node"
    description = "one 8 x H100 SXM node, NVLink 4 through NVSwitch"
    extends = "other.toml"          # optional: start from that file, override below
    devices_per_node = 8
    nodes = 1
    shared_cores = 2                # optional, CPU testbeds: the devices are processes on these cores

    [overhead]                       # optional: fixed cost of one op call
    per_call_s = { value = 1e-5, kind = "assumed", source = "..." }

    [memory]                         # per device
    capacity_bytes = { value = 80e9, kind = "datasheet", source = "..." }
    bandwidth_bytes_per_s = { value = 3.35e12, kind = "datasheet", source = "..." }

    [[gemm]]                         # per dtype; `shape = [m, n, k]` where measured at one shape
    dtype = "bfloat16"
    flops = { value = 795e12, kind = "measured", source = "..." }

    [[collective]]                   # per op and scope (intra_node | inter_node); `ranks` where measured at one size
    op = "all_to_all"
    scope = "intra_node"
    latency_s = { value = 2e-5, kind = "assumed", source = "..." }
    bus_bandwidth_bytes_per_s = { value = 370e9, kind = "measured", source = "..." }

A collective's time is ``latency + bytes_per_rank * bus_factor(op, ranks) /
bus_bandwidth``: bus bandwidth in nccl-tests' convention, as `moebench comm`
reports it (harness/comm.py).
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError
from core.names import unknown_name_message
from core.toml_lines import read_utf8, syntax_error_line, syntax_error_text

KINDS = ("measured", "datasheet", "assumed")
SCOPES = ("intra_node", "inter_node")
COLLECTIVE_OPS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TESTBED_DIR = Path(__file__).resolve().parents[2] / "testbeds"

TOP_KEYS = {"testbed", "memory", "overhead", "gemm", "collective"}
TESTBED_KEYS = {"name", "description", "extends", "devices_per_node", "nodes", "fingerprint", "device", "shared_cores"}
MEMORY_KEYS = {"capacity_bytes", "bandwidth_bytes_per_s"}
OVERHEAD_KEYS = {"per_call_s"}
GEMM_KEYS = {"dtype", "shape", "threads", "flops", "peak_flops"}
COLLECTIVE_KEYS = {"op", "scope", "ranks", "latency_s", "bus_bandwidth_bytes_per_s"}
QUANTITY_KEYS = {"value", "kind", "source"}


class TestbedError(InputError):
    """A testbed file that cannot be used; one line naming the file and the key."""


@dataclass(frozen=True)
class Quantity:
    """A number with its provenance: measured here or elsewhere, from a datasheet, or assumed."""

    value: float
    kind: str
    source: str


@dataclass(frozen=True)
class GemmRate:
    dtype: str
    flops: Quantity  # achieved (dense) FLOP/s the model uses
    shape: tuple[int, int, int] | None = None  # (m, n, k) where measured at one shape
    threads: int | None = None  # CPU testbeds: measured with this many threads (a rank's share of the cores)
    peak_flops: Quantity | None = None  # the datasheet's, for reference


@dataclass(frozen=True)
class CollectiveCost:
    op: str
    scope: str
    latency_s: Quantity
    bus_bandwidth_bytes_per_s: Quantity
    ranks: int | None = None  # measured at this world size; None: any

    def seconds(self, bytes_per_rank: float, ranks: int) -> float:
        from harness.comm import bus_factor

        moved = bytes_per_rank * bus_factor(self.op, ranks)
        return self.latency_s.value + moved / self.bus_bandwidth_bytes_per_s.value


@dataclass(frozen=True)
class Testbed:
    name: str
    description: str
    path: Path
    devices_per_node: int
    nodes: int
    memory_capacity: Quantity
    memory_bandwidth: Quantity
    gemm: tuple[GemmRate, ...]
    collectives: tuple[CollectiveCost, ...]
    per_call: Quantity | None = None  # fixed cost of one op call (framework dispatch, kernel launch)
    device: str = ""
    fingerprint: dict | None = None
    shared_cores: int | None = None  # CPU testbeds: the ranks are processes sharing these cores

    @property
    def per_call_s(self) -> float:
        return self.per_call.value if self.per_call else 0.0

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    @property
    def overlaps_communication(self) -> bool:
        """Whether communication can run beside compute. Not where the ranks share cores: loopback
        collectives are copies done by the same cores the GEMMs need."""
        return self.shared_cores is None

    def compute_share(self, ranks_on_node: int, threads_per_rank: int | None) -> float:
        """The share of its measured (uncontended) rates one rank gets: all of them on a device of its
        own; cores / (ranks x threads) when more threads than cores run at once."""
        if self.shared_cores is None:
            return 1.0
        return min(1.0, self.shared_cores / (max(1, ranks_on_node) * max(1, threads_per_rank or 1)))

    def quantities(self) -> list[tuple[str, Quantity]]:
        """Every number with a label, for a listing of what a prediction rests on."""
        out = [("memory capacity", self.memory_capacity), ("memory bandwidth", self.memory_bandwidth)]
        if self.per_call:
            out.append(("per-call overhead", self.per_call))
        for g in self.gemm:
            label = f"gemm {g.dtype}" + (f" {g.shape}" if g.shape else "")
            out.append((label, g.flops))
            if g.peak_flops:
                out.append((label + " peak", g.peak_flops))
        for c in self.collectives:
            label = f"{c.op} {c.scope}" + (f" at {c.ranks} ranks" if c.ranks else "")
            out += [(label + " latency", c.latency_s), (label + " bus bandwidth", c.bus_bandwidth_bytes_per_s)]
        return out

    def gemm_flops(self, dtype: str, shape: tuple[int, int, int] | None = None, threads: int | None = None) -> float:
        """Achieved FLOP/s for a GEMM: the entry at that shape; else the nearest measured shape (by the
        log-distance of m, n, k); else the dtype's shape-free entry. On a CPU testbed, among the entries
        measured with `threads` threads (or the nearest thread count measured)."""
        rates = [g for g in self.gemm if g.dtype == dtype]
        if not rates:
            raise TestbedError(f"testbed {self.name} has no GEMM rate for {dtype} "
                               f"(it has: {', '.join(sorted({g.dtype for g in self.gemm}))})")
        counts = sorted({g.threads for g in rates if g.threads})
        if counts:
            want = threads or counts[-1]
            nearest = min(counts, key=lambda n: abs(math.log(n / want)))
            rates = [g for g in rates if g.threads in (None, nearest)]
        shaped = [g for g in rates if g.shape]
        if shape is not None and shaped:
            return min(shaped, key=lambda g: _log_distance(g.shape, shape)).flops.value
        plain = [g for g in rates if not g.shape]
        return (plain or rates)[0].flops.value

    def collective(self, op: str, ranks: int) -> CollectiveCost:
        """The cost entry for `op` among `ranks` devices: inter-node once the ranks span nodes; an entry
        measured at that world size first, then a size-free entry, then the nearest measured size."""
        scope = "inter_node" if ranks > self.devices_per_node else "intra_node"
        entries = [c for c in self.collectives if c.op == op and c.scope == scope]
        if not entries:
            raise TestbedError(f"testbed {self.name} has no {op} cost for {scope.replace('_', '-')} "
                               f"communication ({ranks} ranks, {self.devices_per_node} per node)")
        exact = [c for c in entries if c.ranks == ranks]
        free = [c for c in entries if c.ranks is None]
        return (exact or free or sorted(entries, key=lambda c: abs(math.log(c.ranks / ranks))))[0]

    def collective_seconds(self, op: str, bytes_per_rank: float, ranks: int) -> float:
        if ranks <= 1:
            return 0.0
        if ranks > self.devices:
            raise TestbedError(f"{ranks} ranks do not fit testbed {self.name} ({self.devices} devices)")
        return self.collective(op, ranks).seconds(bytes_per_rank, ranks)


def _log_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log(x / y)) for x, y in zip(a, b))


# ------------------------------------------------------------------ reading

def testbed_path(name_or_path: str) -> Path:
    """A testbed named by file path, or by name in testbeds/ (with or without .toml)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    named = TESTBED_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if named.exists() and path.parent == Path("."):
        return named
    if path.exists():
        return path
    known = available_testbeds()
    raise TestbedError(unknown_name_message("testbed", str(name_or_path), known) if known
                       else f"testbed {name_or_path!r} not found (no file, and testbeds/ is empty)")


def available_testbeds() -> list[str]:
    return sorted(p.stem for p in TESTBED_DIR.glob("*.toml")) if TESTBED_DIR.is_dir() else []


def load_testbed(name_or_path: str | Path) -> Testbed:
    path = testbed_path(str(name_or_path))
    return _build(path, _merged(path, seen=()))


def _read_toml(path: Path) -> dict:
    text = read_utf8(path, "testbed file", TestbedError)
    try:
        return tomllib.loads(text)
    except ValueError as exc:
        line = syntax_error_line(exc)
        raise TestbedError(f"{path}{f':{line}' if line else ''}: not valid TOML: {syntax_error_text(exc)}") from None


def _merged(path: Path, seen: tuple[Path, ...]) -> dict:
    """The file's tables over those of the file it extends: [testbed] and [memory] key by key; each
    [[gemm]] replaces the parent's entry of the same (dtype, shape), each [[collective]] that of the
    same (op, scope, ranks)."""
    if path.resolve() in seen:
        raise TestbedError(f"{path}: 'extends' loops back to {path.name}")
    data = _read_toml(path)
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise TestbedError(f"{path}: unknown table {sorted(unknown)[0]!r} (expected {', '.join(sorted(TOP_KEYS))})")
    parent_name = data.get("testbed", {}).get("extends")
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise TestbedError(f"{path}: testbed.extends must be a file name, got {parent_name!r}")
    parent_path = path.parent / parent_name
    if not parent_path.exists():
        raise TestbedError(f"{path}: testbed.extends names {parent_name!r}, which is not in {path.parent}")
    parent = _merged(parent_path, seen + (path.resolve(),))
    merged = dict(parent)
    for table in ("testbed", "memory", "overhead"):
        merged[table] = {**parent.get(table, {}), **data.get(table, {})}
    merged["testbed"].pop("extends", None)
    for table, key in (("gemm", ("dtype", "shape", "threads")), ("collective", ("op", "scope", "ranks"))):
        mine = data.get(table, [])
        if not isinstance(mine, list):
            continue  # _build names the problem
        mine_keys = {tuple(repr(e.get(k)) for k in key) for e in mine if isinstance(e, dict)}
        kept = [e for e in parent.get(table, []) if tuple(repr(e.get(k)) for k in key) not in mine_keys]
        merged[table] = kept + mine
    return merged


class _Reader:
    """Field access that fails with the file and the key's dotted path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str):
        raise TestbedError(f"{self.path}: {where}: {problem}")

    def table(self, data: dict, key: str, where: str, allowed: set[str]) -> dict:
        value = data.get(key)
        if not isinstance(value, dict):
            self.fail(where, "missing table" if value is None else f"must be a table, got {value!r}")
        self.no_unknown(value, where, allowed)
        return value

    def no_unknown(self, table: dict, where: str, allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            self.fail(f"{where}.{unknown[0]}", unknown_name_message("key", unknown[0], sorted(allowed)))

    def integer(self, table: dict, key: str, where: str, default: int | None = None) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(f"{where}.{key}", f"must be a positive integer, got {value!r}")
        return value

    def choice(self, table: dict, key: str, where: str, choices: tuple[str, ...]) -> str:
        value = table.get(key)
        if value not in choices:
            self.fail(f"{where}.{key}", unknown_name_message(key, str(value), choices) if isinstance(value, str)
                      else f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def quantity(self, table: dict, key: str, where: str) -> Quantity:
        q = table.get(key)
        where = f"{where}.{key}"
        if not isinstance(q, dict):
            self.fail(where, "missing" if q is None else f"must be {{ value = ..., kind = ..., source = ... }}, "
                      f"got {q!r}")
        self.no_unknown(q, where, QUANTITY_KEYS)
        value = q.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.fail(f"{where}.value", f"must be a positive finite number, got {value!r}")
        kind = self.choice(q, "kind", where, KINDS)
        source = q.get("source")
        if not isinstance(source, str) or not source.strip():
            self.fail(f"{where}.source", "every number says where it comes from: a non-empty string")
        return Quantity(float(value), kind, source.strip())


def _build(path: Path, data: dict) -> Testbed:
    r = _Reader(path)
    head = r.table(data, "testbed", "testbed", TESTBED_KEYS)
    name = head.get("name")
    if not isinstance(name, str) or not name.strip():
        r.fail("testbed.name", "must be a non-empty string")
    memory = r.table(data, "memory", "memory", MEMORY_KEYS)
    overhead = r.table(data, "overhead", "overhead", OVERHEAD_KEYS) if data.get("overhead") else None
    gemm = data.get("gemm")
    if not isinstance(gemm, list) or not gemm:
        r.fail("gemm", "at least one [[gemm]] entry is needed")
    rates = []
    for i, entry in enumerate(gemm):
        where = f"gemm[{i}]"
        if not isinstance(entry, dict):
            r.fail(where, "must be a table")
        r.no_unknown(entry, where, GEMM_KEYS)
        shape = entry.get("shape")
        if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                      and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in shape)):
            r.fail(f"{where}.shape", f"must be [m, n, k], three positive integers, got {shape!r}")
        rates.append(GemmRate(dtype=r.choice(entry, "dtype", where, DTYPES), flops=r.quantity(entry, "flops", where),
                              shape=tuple(shape) if shape else None,
                              threads=r.integer(entry, "threads", where) if "threads" in entry else None,
                              peak_flops=r.quantity(entry, "peak_flops", where) if "peak_flops" in entry else None))
    collectives = []
    for i, entry in enumerate(data.get("collective", [])):
        where = f"collective[{i}]"
        if not isinstance(entry, dict):
            r.fail(where, "must be a table")
        r.no_unknown(entry, where, COLLECTIVE_KEYS)
        collectives.append(CollectiveCost(
            op=r.choice(entry, "op", where, COLLECTIVE_OPS), scope=r.choice(entry, "scope", where, SCOPES),
            latency_s=r.quantity(entry, "latency_s", where),
            bus_bandwidth_bytes_per_s=r.quantity(entry, "bus_bandwidth_bytes_per_s", where),
            ranks=r.integer(entry, "ranks", where) if "ranks" in entry else None))
    fingerprint = head.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        r.fail("testbed.fingerprint", "must be a table")
    return Testbed(name=name.strip(), description=str(head.get("description", "")), path=path,
                   devices_per_node=r.integer(head, "devices_per_node", "testbed"),
                   nodes=r.integer(head, "nodes", "testbed", default=1),
                   memory_capacity=r.quantity(memory, "capacity_bytes", "memory"),
                   memory_bandwidth=r.quantity(memory, "bandwidth_bytes_per_s", "memory"),
                   gemm=tuple(rates), collectives=tuple(collectives), device=str(head.get("device", "")),
                   per_call=r.quantity(overhead, "per_call_s", "overhead") if overhead else None,
                   fingerprint=fingerprint,
                   shared_cores=r.integer(head, "shared_cores", "testbed") if "shared_cores" in head else None)
