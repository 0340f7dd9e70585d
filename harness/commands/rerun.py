"""`moebench rerun RESULTS_FILE TRIAL_ID`: reproduce one trial from what its results file records.

The trial spec is rebuilt from the record alone (workload spec, level, mode,
routing, knobs, parallel layout, warm-up, steps, allocator policy, input
pool, plugin reference), so the rerun's trial id equals the original's
exactly when the same experiment ran again. The rerun writes a results file
of its own and prints it beside the original: time, check, and whether the
routing statistics and the verified checksums came out identical (they do on
the same machine with the same seed; harness/equivalence.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys

from core.names import either
from harness.errors import UsageError, input_errors

NAME = "rerun"
HELP = "reproduce one trial of a results file from what the file records, and compare it with the original"

DEFAULT_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS_FILE", help="a moebench results file")
    parser.add_argument("trial", metavar="TRIAL_ID", help="the trial's id, or an unambiguous part of it")
    parser.add_argument("--repeats", type=int, help="rounds (default: as many as the original had)")
    parser.add_argument("--timeout", type=float, help="seconds per round (default: the original run's --timeout, "
                                                      f"else {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--out", default="results", help="results directory (default results/)")


def find_trial(doc: dict, wanted: str) -> dict:
    """The trial whose id is `wanted`, else the one trial whose id contains it."""
    trials = doc["trials"]
    exact = [t for t in trials if t["id"] == wanted]
    matches = exact or [t for t in trials if wanted in t["id"]]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"trial {wanted!r} matches {len(matches)} trials ({', '.join(t['id'] for t in matches[:3])}"
                         f"{', ...' if len(matches) > 3 else ''}); give more of the id")
    close = difflib.get_close_matches(wanted, [t["id"] for t in trials], n=3, cutoff=0.3)
    hint = f"; did you mean {either(close)}?" if close else ""
    raise UsageError(f"no trial {wanted!r} in {doc['run_id']}{hint}")


def spec_from_record(trial: dict, timeout_s: float):
    """The TrialSpec a results record describes (the inverse of harness/runner.py trial_record)."""
    from core.values import ParallelSpec
    from harness.trial_spec import TrialSpec

    if trial["level"] not in ("layer", "model"):
        raise UsageError(f"trial {trial['id']} is a {trial['level']} measurement; rerun takes layer and model "
                         "trials (collectives come from `moebench comm`)")
    setup = trial.get("setup")
    if not setup:
        raise UsageError(f"trial {trial['id']} records no setup (an older results file): it cannot be rebuilt")
    parallel_fields = {f.name for f in dataclasses.fields(ParallelSpec)}
    data = {
        "system": trial["system"], "workload": trial["workload_spec"], "level": trial["level"],
        "mode": trial["mode"], "routing": trial["routing"], "knobs": trial["knobs"],
        "parallel": {k: v for k, v in trial["parallel"].items() if k in parallel_fields},
        "warmup": setup["warmup"], "steps": setup["steps"], "malloc": setup["malloc"],
        "input_pool": setup["input_pool"], "timeout_s": timeout_s, "plugins": trial.get("plugins") or (),
    }
    try:
        spec = TrialSpec.from_dict(data)
        spec.validate()
    except (TypeError, KeyError, ValueError) as exc:
        raise UsageError(f"trial {trial['id']} cannot be rebuilt from its record: {exc}") from None
    return spec


def _recorded_timeout(command_line: list[str]) -> float:
    for i, arg in enumerate(command_line):
        value = arg.partition("=")[2] if arg.startswith("--timeout=") else None
        if arg == "--timeout" and i + 1 < len(command_line):
            value = command_line[i + 1]
        if value is not None:
            try:
                return float(value)
            except ValueError:
                break
    return DEFAULT_TIMEOUT_S


def comparison(original: dict, again: dict) -> list[tuple[str, str, str]]:
    """(what, original, rerun) rows saying how far the rerun reproduced the original."""
    def median_ms(t):
        return "-" if not t["summary"] else f"{t['summary']['median'] * 1e3:.2f} ms"

    def check(t):
        return "-" if t["check"] is None else ("pass" if t["check"]["passed"] else "FAIL")

    def same(key, pick):
        a, b = pick(original), pick(again)
        return "identical" if a == b and a is not None else ("not recorded" if a is None or b is None else "differ")

    threads = (original.get("setup") or {}).get("threads_per_rank"), (again.get("setup") or {}).get("threads_per_rank")
    return [
        ("trial id", original["id"], "same" if again["id"] == original["id"] else again["id"]),
        ("status", original["status"], again["status"]),
        ("median step", median_ms(original), median_ms(again)),
        ("equivalence check", check(original), check(again)),
        ("threads per rank", str(threads[0]), str(threads[1])),
        ("routing statistics", "", same("routing_stats", lambda t: t.get("routing_stats"))),
        ("verified checksums", "", same("checksum", lambda t: (t.get("check") or {}).get("checksum"))),
    ]


def run(args: argparse.Namespace) -> int:
    from harness import journal as journals
    from harness import run_plan, schema
    from harness.tables import text_table
    from systems.plugins import register_plugins

    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite positive number of seconds, got {args.timeout}")
    doc = schema.load(args.results)
    original = find_trial(doc, args.trial)
    spec = spec_from_record(original, args.timeout or _recorded_timeout(doc["command_line"]))
    with input_errors("the trial's plugin: "):
        register_plugins(spec.plugins)
    repeats = args.repeats or max(1, len(original["rounds"]))
    plan = run_plan.new_plan([spec], {}, repeats=repeats, order_seed=0, warmup=spec.warmup, steps=spec.steps,
                             malloc=spec.malloc, node_rank=0, rdzv_endpoint=None,
                             command_line=["moebench", "rerun", str(args.results), original["id"]])
    journal = journals.create(journals.journal_path(args.out, plan["run_id"]), plan)
    outcome = run_plan.carry_out(plan, journal, args.out)
    if outcome.results_path is None:
        return outcome.exit_code
    (again,) = outcome.trials
    print(text_table(("", f"original ({doc['run_id']})", f"rerun ({plan['run_id']})"), comparison(original, again)))
    print(f"results: {outcome.results_path}", file=sys.stdout)
    return 0 if again["status"] == "ok" else 1
