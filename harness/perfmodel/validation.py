"""The model against what was measured: every layer trial in results files, predicted on this machine's testbed.

Why: a performance model earns trust only where it can be checked. Here we
can check it on the CPU trials the harness measured: per trial the predicted
and measured median step, the relative error, and per comparison (same
workload, dtype and layout) whether the model orders the systems as the
measurements do.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from harness.perfmodel.iteration import Layout, predict_iteration
from harness.perfmodel.layer import SYSTEMS, predict_layer
from harness.perfmodel.testbed import Testbed
from harness.perfmodel.trials import case_from_record, predictable


@dataclass(frozen=True)
class Checked:
    trial_id: str
    system: str
    group: str  # workload/flavor dtype ep: trials the model should order
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_s / self.measured_s - 1


def checked_trials(docs: list[dict], testbed: Testbed) -> tuple[list[Checked], list[str]]:
    """Every ok layer forward+backward trial of a system the model knows; (checked, reasons skipped)."""
    out, skipped = [], []
    for doc in docs:
        for trial in doc.get("trials", []):
            if trial.get("status") != "ok" or trial.get("level") != "layer" or trial.get("mode") != "forward_backward":
                continue
            if not predictable(trial):
                skipped.append(f"{trial['id']}: the model does not cover {trial['system']} in {trial.get('dtype')}")
                continue
            case = case_from_record(trial)
            p = predict_layer(testbed, case)
            spec = trial["workload_spec"]
            group = (f"{spec['name']}/{spec['flavor']} {case.dtype} ep{case.ep} router={trial.get('router') or 'softmax'}"
                     f" cf={case.capacity_factor or 'dropless'}")
            out.append(Checked(trial["id"], trial["system"], group, trial["summary"]["median"], p.total_s))
    return out, skipped


def pairwise_order_agreement(checked: list[Checked]) -> tuple[int, int]:
    """(pairs the model orders as measured, pairs) over every two systems of one group."""
    agree = total = 0
    groups: dict[str, list[Checked]] = {}
    for c in checked:
        groups.setdefault(c.group, []).append(c)
    for members in groups.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                total += 1
                agree += (a.measured_s < b.measured_s) == (a.predicted_s < b.predicted_s)
    return agree, total


def summary(checked: list[Checked]) -> dict:
    errors = [abs(c.error) for c in checked]
    agree, pairs = pairwise_order_agreement(checked)
    return {"trials": len(checked), "median_abs_error": statistics.median(errors) if errors else math.nan,
            "max_abs_error": max(errors) if errors else math.nan, "order_agree": agree, "order_pairs": pairs}


def checked_iterations(docs: list[dict], testbed: Testbed) -> tuple[list[Checked], list[str]]:
    """Every ok model-level train trial of a system the model knows: its measured median step (forward,
    backward, gradient sync, optimizer) against the iteration model (harness/perfmodel/iteration.py) at
    the trial's ranks, EP and threads, one micro-batch of the workload's batch."""
    from harness.perfmodel.memory_validation import workload_from_record

    out, skipped = [], []
    for doc in docs:
        for trial in doc.get("trials", []):
            if trial.get("status") != "ok" or trial.get("level") != "model" or trial.get("mode") != "train":
                continue
            if trial.get("system") not in SYSTEMS or trial.get("dtype") not in ("float32", "bfloat16"):
                skipped.append(f"{trial['id']}: the model does not cover {trial['system']} in {trial.get('dtype')}")
                continue
            workload = workload_from_record(trial)
            knobs, parallel = trial["knobs"], trial["parallel"]
            workload = replace(workload, capacity_factor=knobs.get("capacity_factor"))
            threads = (trial.get("setup") or {}).get("threads_per_rank") or parallel.get("threads_per_rank")
            layout = Layout(world=parallel["world_size"], ep=parallel.get("ep", 1))
            p = predict_iteration(testbed, workload, trial["system"], layout, trial["dtype"],
                                  knobs.get("options") or {}, threads=threads)
            group = (f"{workload.name}/{workload.flavor} {trial['dtype']} ws{layout.world} ep{layout.ep} "
                     f"router={trial.get('router') or 'softmax'} cf={workload.capacity_factor or 'dropless'}")
            out.append(Checked(trial["id"], trial["system"], group, trial["summary"]["median"], p.total_s))
    return out, skipped
