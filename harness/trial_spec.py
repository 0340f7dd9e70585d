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

from core.errors import InputError
from core.names import unknown_name_message
from core.values import LayerShape, MoEKnobs, ParallelSpec, is_finite_positive
from harness.host_memory import MALLOC_MODES
from workloads.routing import ROUTINGS, check_synthetic_fits
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
        """InputError naming the first field a user could have got wrong (a spec file is edited by hand too)."""
        self._check_choice("level", LEVELS)
        self._check_choice("mode", MODES)
        self._check_choice("routing", ROUTINGS)
        if self.level == "model" and self.routing != "learned":
            raise InputError(f"routing {self.routing} applies at layer level only: the model level routes every "
                             "MoE layer with its learned gate", "routing")
        self._check_counts()
        self._check_choice("malloc", MALLOC_MODES)
        if not isinstance(self.plugins, tuple) or not all(isinstance(p, str) and p for p in self.plugins):
            raise InputError(f"plugins must be a list of plugin references, got {self.plugins!r}", "plugins")
        if self.fault is not None and self.fault not in FAULTS:
            raise InputError(f"fault must be one of {', '.join(FAULTS)} or None, got {self.fault!r}", "fault")
        self.workload.validate()
        self.knobs.validate()
        self.parallel.validate(self.workload.layer.num_experts)
        check_synthetic_fits(self.workload.layer, self.routing)

    def _check_counts(self) -> None:
        for name, minimum in (("steps", 1), ("warmup", 0), ("input_pool", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}", name)
        if not is_finite_positive(self.timeout_s):
            raise InputError(f"timeout must be a finite positive number of seconds, got {self.timeout_s!r}",
                             "timeout_s")

    def _check_choice(self, name: str, choices) -> None:
        value = getattr(self, name)
        if not isinstance(value, str) or value not in choices:
            raise InputError(unknown_name_message(name, value, choices), name)

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
