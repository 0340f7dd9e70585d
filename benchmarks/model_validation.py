"""The performance model, calibrated on this machine only, against the layer trials measured here.

For every ok layer forward+backward trial in the results files that ran on this
machine's CPU (same CPU model as the testbed's fingerprint) and whose system the
model knows: predicted vs measured median step, the relative error, the median
and largest error, and whether the model orders the systems of each comparison
as measured (pairwise). Trials from other machines are left out and counted.
Then peak memory: each trial's measured per-rank peak against the memory guard's
estimate over the same scope (harness/perfmodel/memory_validation.py).

It reads stored results only: it runs no trial (benchmarks/model_validation_runs.sh
runs them).

Run: .venv/bin/python benchmarks/model_validation.py [RESULTS ...] [--testbed FILE]
  (default: results/ recursively; the testbed is this machine's calibrated file,
  `./moebench calibrate` writes it). Writes reports/model_validation.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.files import write_text_atomic  # noqa: E402
from harness.perfmodel.calibrate import local_testbed_path  # noqa: E402
from harness.perfmodel.memory_validation import checked_peaks, peak_rows, peak_summary  # noqa: E402
from harness.perfmodel.testbed import load_testbed  # noqa: E402
from harness.perfmodel.validation import checked_iterations, checked_trials, summary  # noqa: E402
from harness.tables import markdown_table  # noqa: E402


def results_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    return [f for f in files if not f.name.startswith(("comm-", "gate-")) and f.suffix == ".json"]


def by_workload(checked) -> list[tuple]:
    groups: dict[str, list] = {}
    for c in checked:
        groups.setdefault(c.group.split()[0], []).append(c)
    rows = []
    for name, items in sorted(groups.items()):
        s = summary(items)
        rows.append((name, s["trials"], f"{s['median_abs_error']:.0%}", f"{s['max_abs_error']:.0%}",
                     f"{s['order_agree']} of {s['order_pairs']}"))
    return rows


def peak_memory_section(docs: list[dict]) -> list[str]:
    """The report's "Peak memory" lines: the summary, what is compared, and one row per trial."""
    checked, skipped = checked_peaks(docs)
    s = peak_summary(checked)
    return [
        "## Peak memory", "",
        f"**{s['trials']} layer trials; median |error| {s['median_abs_error']:.0%}, max {s['max_abs_error']:.0%}; "
        f"{s['within_goal']} of {s['trials']} within {s['goal']:.0%} (the goal: all).** Left out: {len(skipped)} "
        "without a measured peak of known scope.", "",
        "Measured: `peak_memory_bytes`, the resident-set high-water mark of the system's own steps per rank "
        "(reset after the build and the equivalence check; harness/trial.py). Predicted: the memory guard's "
        "estimate (harness/memory_guard.py, as `moebench predict` prints it) over the same scope: runtime "
        "(interpreter and libraries), parameters, gradients, activations, dispatch buffers and the input pool; "
        "not the check's reference copy, which is freed before the steps.", "",
        markdown_table(("comparison", "system", "measured GiB", "predicted GiB", "error"), peak_rows(checked)), ""]


def model_level_section(docs: list[dict], testbed) -> list[str]:
    """The report's "Model level" lines: whole train steps against the iteration model."""
    checked, skipped = checked_iterations(docs, testbed)
    if not checked:
        return ["## Model level", "", "No model-level train trials measured on this machine.", ""]
    s = summary(checked)
    rows = [(c.group, c.system, f"{c.measured_s * 1e3:.2f}", f"{c.predicted_s * 1e3:.2f}", f"{c.error:+.0%}")
            for c in sorted(checked, key=lambda c: (c.group, c.system))]
    return [
        "## Model level", "",
        f"**{s['trials']} model-level train trials; median |error| {s['median_abs_error']:.0%}, max "
        f"{s['max_abs_error']:.0%}; the model orders {s['order_agree']} of {s['order_pairs']} system pairs as "
        f"measured.** Left out: {len(skipped)} of systems or dtypes the model does not cover.", "",
        "Measured: the median train step (forward, backward, data-parallel gradient all-reduce, AdamW step) of "
        "the harness's transformer (harness/model.py). Predicted: harness/perfmodel/iteration.py at the trial's "
        "ranks, EP and threads, one micro-batch of the workload's batch, gradient all-reduce as each system "
        "places it (no overlap on shared cores).", "",
        markdown_table(("comparison", "system", "measured ms", "predicted ms", "error"), rows), ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["results"])
    parser.add_argument("--testbed", default=None)
    parser.add_argument("--out", default="reports/model_validation.md")
    args = parser.parse_args()
    testbed = load_testbed(args.testbed or local_testbed_path())
    cpu = (testbed.fingerprint or {}).get("cpu_model")
    docs, other_machine = [], 0
    for path in results_files(args.paths):
        doc = json.loads(path.read_text())
        if "trials" not in doc or "environment" not in doc:
            continue
        if doc["environment"].get("cpu_model") != cpu:
            other_machine += len(doc["trials"])
            continue
        docs.append(doc)
    checked, skipped = checked_trials(docs, testbed)
    s = summary(checked)
    rows = [(c.group, c.system, f"{c.measured_s * 1e3:.2f}", f"{c.predicted_s * 1e3:.2f}", f"{c.error:+.0%}")
            for c in sorted(checked, key=lambda c: (c.group, c.system))]
    command = "python benchmarks/model_validation.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Performance model validation", "",
        f"Command: `{command.strip()}`. Testbed: `{testbed.path.relative_to(ROOT) if testbed.path.is_relative_to(ROOT) else testbed.path}` "
        f"({testbed.description}), every figure measured on this machine by `moebench calibrate`. Model: "
        "harness/perfmodel/layer.py (first-order per-op costs, each system's rows, calls and schedule).", "",
        f"**{s['trials']} layer trials; median |error| {s['median_abs_error']:.0%}, max {s['max_abs_error']:.0%}; "
        f"the model orders {s['order_agree']} of {s['order_pairs']} system pairs as measured.** "
        f"Left out: {other_machine} trials measured on other machines, {len(skipped)} of systems the model does "
        "not know.", "",
        "By workload (the first word of each comparison):", "",
        markdown_table(("workload", "trials", "median abs error", "max abs error", "pairs ordered as measured"),
                       by_workload(checked)), "",
        markdown_table(("comparison", "system", "measured ms", "predicted ms", "error"), rows), "",
        *peak_memory_section(docs), *model_level_section(docs, testbed)])
    write_text_atomic(text, ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
