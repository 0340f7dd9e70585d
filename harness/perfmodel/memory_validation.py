"""The predicted per-rank peak memory against the peak each layer trial measured.

Why: the model's peak (`moebench predict`'s "peak GiB/rank") is the memory
guard's estimate, which also decides which trials may run; it earns trust only
where a measured peak checks it. The comparison must cover what the
measurement covers. A trial's `peak_memory_bytes` (harness/trial.py) is the
high-water mark of the system's own steps: it is reset after the build and the
equivalence check, so it includes what is resident then (on a CPU: the
interpreter and libraries, the parameters, the input pool) and what the steps
add (gradients, activations, dispatch buffers), and excludes the check's
reference copy. The prediction is therefore the estimate without its `check`
term. A peak measured over the whole process (scope "whole process", no
/proc/self/clear_refs) includes the check, so the prediction does too.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from core.values import LayerShape, ParallelSpec
from harness.perfmodel.trials import layer_peak_bytes, predictable
from workloads.spec import ModelShape, Workload

GIB = float(1 << 30)
GOAL = 0.15  # the goal: every peak within 15%
STEPS_SCOPE = "system steps"  # harness/trial.py steps_scope(): the check is excluded
PROCESS_SCOPE = "whole process"  # harness/trial.py PROCESS_SCOPE: the check is included


@dataclass(frozen=True)
class CheckedPeak:
    trial_id: str
    system: str
    group: str  # workload/flavor and ep, as in the time table
    measured_bytes: float
    predicted_bytes: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_bytes / self.measured_bytes - 1


def workload_from_record(trial: dict) -> Workload:
    """The trial's workload as the runner recorded it (workload_spec)."""
    spec = dict(trial["workload_spec"])
    spec["layer"] = LayerShape(**spec["layer"])
    spec["model"] = ModelShape(**spec["model"])
    return Workload(**spec)


def parallel_from_record(trial: dict) -> ParallelSpec:
    """The trial's layout; the record adds derived fields (dp) that ParallelSpec does not take."""
    names = {f.name for f in dataclasses.fields(ParallelSpec)}
    return ParallelSpec(**{k: v for k, v in trial["parallel"].items() if k in names})


def check_included(scope: str | None) -> bool | None:
    """Whether the measured peak includes the check's copy; None where its scope does not say."""
    if scope and scope.startswith(STEPS_SCOPE):
        return False
    if scope and scope.startswith(PROCESS_SCOPE):
        return True
    return None


def predicted_peak(trial: dict) -> float:
    """The estimate for this trial record, over the scope its measurement covers."""
    knobs = trial["knobs"]
    with_check = bool(check_included(trial.get("peak_memory_scope"))) and trial.get("check") is not None
    return layer_peak_bytes(trial["system"], workload_from_record(trial), knobs.get("capacity_factor"),
                            knobs.get("dtype", trial.get("dtype", "float32")), parallel_from_record(trial),
                            knobs.get("device", "cpu"), knobs.get("options"),
                            (trial.get("setup") or {}).get("input_pool"), check=with_check)


def skip_reason(trial: dict) -> str | None:
    """Why a trial's peak cannot be checked, or None."""
    if not trial.get("peak_memory_bytes"):
        return "no measured peak"
    if not predictable(trial):
        return f"the model does not cover {trial['system']} in {trial.get('dtype')}"
    if check_included(trial.get("peak_memory_scope")) is None:
        return f"peak scope {trial.get('peak_memory_scope')!r} does not say what it covers"
    return None


def checked_peaks(docs: list[dict]) -> tuple[list[CheckedPeak], list[str]]:
    """Every ok layer forward+backward trial with a measured peak; (checked, reasons skipped)."""
    out, skipped = [], []
    for doc in docs:
        for trial in doc.get("trials", []):
            if trial.get("status") != "ok" or trial.get("level") != "layer" or trial.get("mode") != "forward_backward":
                continue
            reason = skip_reason(trial)
            if reason:
                skipped.append(f"{trial['id']}: {reason}")
                continue
            spec = trial["workload_spec"]
            group = f"{spec['name']}/{spec['flavor']} {trial.get('dtype')} ep{trial['parallel'].get('ep', 1)}"
            out.append(CheckedPeak(trial["id"], trial["system"], group, float(trial["peak_memory_bytes"]),
                                   predicted_peak(trial)))
    return out, skipped


def peak_summary(checked: list[CheckedPeak], goal: float = GOAL) -> dict:
    """Median and largest |error|, and how many peaks are within `goal`."""
    errors = [abs(c.error) for c in checked]
    return {"trials": len(checked), "median_abs_error": statistics.median(errors) if errors else math.nan,
            "max_abs_error": max(errors) if errors else math.nan,
            "within_goal": sum(e <= goal for e in errors), "goal": goal}


def peak_rows(checked: list[CheckedPeak]) -> list[tuple]:
    """Report rows: comparison, system, measured and predicted GiB, signed error."""
    return [(c.group, c.system, f"{c.measured_bytes / GIB:.3f}", f"{c.predicted_bytes / GIB:.3f}", f"{c.error:+.0%}")
            for c in sorted(checked, key=lambda c: (c.group, c.system))]
