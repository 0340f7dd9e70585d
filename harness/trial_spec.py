"""One trial round, as the runner hands it to a fresh child process.

A trial is system x workload x level x mode x routing x knobs x parallel
spec; the runner writes a TrialSpec as JSON and starts
``python -m harness.trial SPEC.json OUT.json`` (under torchrun when the
parallel spec has more than one rank). JSON, not pickle, so a spec file can
be read, edited and rerun by hand.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from core.values import LayerShape, MoEKnobs, ParallelSpec
from harness.host_memory import MALLOC_MODES
from workloads.spec import LEVELS, ModelShape, Workload

MODES = ("forward", "forward_backward", "train")
# Distinct input batches each trial cycles through (timed step i uses entry i mod INPUT_POOL), the same
# for every system: routing changes from step to step as in training, and no input-keyed cache helps.
INPUT_POOL = 4
# Test hook (not a user option): make the child fail on purpose so the
# runner's failure handling can be tested on real processes.
FAULTS = ("raise", "hang", "nonfinite")


@dataclass(frozen=True)
class TrialSpec:
    system: str
    workload: Workload
    level: str  # "layer" | "model"
    mode: str  # "forward" | "forward_backward" | "train"
    routing: str  # "learned" | "balanced" | "zipf"
    knobs: MoEKnobs
    parallel: ParallelSpec
    warmup: int = 2
    steps: int = 5
    timeout_s: float = 300.0
    check: bool = True
    # Rounds after the first: the checksums round 0 verified against the reference
    # (harness/equivalence.py); this round recomputes them and must agree.
    verify: dict | None = None
    input_pool: int = INPUT_POOL  # distinct seeded batches the steps cycle through
    malloc: str = "reuse"  # host allocator policy, harness/host_memory.py MALLOC_MODES
    # Which runner launched this copy (multi-node: every node's runner writes
    # its own spec file). Local rank 0 of node 0's launch writes the result.
    launcher_node_rank: int = 0
    fault: str | None = None  # test hook, see FAULTS
    fault_rank: int | None = None  # rank the fault hits; None: every rank
    # Absolute plugin references (systems/plugins.py) the child registers before it looks up
    # `system`: (the plugin's reference,) for a plugin system, () for a built-in or an entry point.
    plugins: tuple[str, ...] | list = ()

    def __post_init__(self) -> None:
        if isinstance(self.plugins, list):  # from JSON
            object.__setattr__(self, "plugins", tuple(self.plugins))

    def validate(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s!r}")
        if not isinstance(self.input_pool, int) or self.input_pool < 1:
            raise ValueError(f"input_pool must be a positive integer, got {self.input_pool!r}")
        if self.malloc not in MALLOC_MODES:
            raise ValueError(f"malloc must be one of {', '.join(MALLOC_MODES)}, got {self.malloc!r}")
        if not isinstance(self.plugins, tuple) or not all(isinstance(p, str) and p for p in self.plugins):
            raise ValueError(f"plugins must be a list of plugin references, got {self.plugins!r}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)} or None, got {self.fault!r}")
        self.workload.validate()
        self.knobs.validate()
        self.parallel.validate(self.workload.layer.num_experts)

    def with_changes(self, **changes) -> TrialSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> TrialSpec:
        data = dict(data)
        workload = dict(data["workload"])
        workload["layer"] = LayerShape(**workload["layer"])
        workload["model"] = ModelShape(**workload["model"])
        data["workload"] = Workload(**workload)
        data["knobs"] = MoEKnobs(**data["knobs"])
        data["parallel"] = ParallelSpec(**data["parallel"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrialSpec:
        return cls.from_dict(json.loads(text))
