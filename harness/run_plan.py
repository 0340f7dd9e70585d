"""A run as data: its plan, carrying it out round by round into a journal, and the results file.

`moebench run` makes a plan (every trial spec, the method settings, the
systems that cannot run here), writes it as the first line of a journal
(harness/journal.py) and runs it; `moebench run --resume RUN_ID` reads the
plan back and runs only the rounds the journal lacks. Either way the results
file is assembled from the journal, so an interrupted and resumed run ends
with the same trials as an uninterrupted one. The plan also records the
machine and code it started on: a resume elsewhere would mix measurements
from two machines into one paired comparison, so it is refused.
"""
from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import journal as journals
from harness import runner
from harness.errors import UsageError
from harness.trial_spec import TrialSpec


@dataclass
class Outcome:
    """How carrying out a plan ended: the results file, or why there is none (and the exit code)."""

    exit_code: int
    results_path: Path | None = None
    trials: list[dict] | None = None


def fingerprint() -> dict:
    """What must not change between a run's start and its resume."""
    from harness import schema
    from harness.environment import collect_environment, git_info

    env = collect_environment()
    keys = ("hostname", "cpu_model", "cpu_count", "python", "torch")
    return {**{key: env.get(key) for key in keys}, "git_commit": git_info(schema.REPO_DIR)["commit"]}


def new_plan(specs: list[TrialSpec], unavailable: dict[str, str], *, repeats: int, order_seed: int, warmup: int,
             steps: int, malloc: str, node_rank: int, rdzv_endpoint: str | None, command_line: list[str]) -> dict:
    from harness import schema

    now = dt.datetime.now(dt.UTC)
    return {
        "run_id": schema.new_run_id(now),
        "created_utc": schema.utc_stamp(now),
        "command_line": [str(a) for a in command_line],
        "specs": [spec.to_dict() for spec in specs], "unavailable": dict(unavailable),
        "repeats": repeats, "order_seed": order_seed, "warmup": warmup, "steps": steps, "malloc": malloc,
        "node_rank": node_rank, "rdzv_endpoint": rdzv_endpoint, "fingerprint": fingerprint(),
    }


def specs_of(plan: dict) -> list[TrialSpec]:
    return [TrialSpec.from_dict(d) for d in plan["specs"]]


def launched_specs(plan: dict) -> list[TrialSpec]:
    """The trials that run (journal entries index this list); the rest are recorded as skipped."""
    return [s for s in specs_of(plan) if s.system not in plan["unavailable"]]


def open_for_resume(out_dir, run_id: str) -> journals.Journal:
    """The journal of `run_id` (a run id, or a journal's path), checked to be resumable here."""
    given = Path(run_id)
    path = given if given.name.endswith(journals.SUFFIX) else journals.journal_path(out_dir, run_id)
    if not path.exists():
        done = path.with_name(path.name[: -len(journals.SUFFIX)] + ".json")
        if done.exists():
            raise UsageError(f"run {run_id} is complete already: {done}")
        raise UsageError(f"no run {run_id!r} to resume: {path} does not exist")
    journal = journals.read(path)
    plan = journal.plan
    if plan.get("node_rank", 0) != 0 or any(s["parallel"]["nnodes"] > 1 for s in plan["specs"]):
        raise UsageError(f"run {journal.run_id} spans several nodes; --resume handles single-node runs only")
    here, then = fingerprint(), plan["fingerprint"]
    changed = [key for key in then if then[key] != here.get(key)]
    if changed:
        key = changed[0]
        raise UsageError(f"run {journal.run_id} started with {key} {then[key]!r}, this is {here.get(key)!r}: "
                         "resuming would mix two setups in one comparison (start a new run instead)")
    return journal


def carry_out(plan: dict, journal: journals.Journal | None, out_dir, progress=None) -> Outcome:
    """Run what the journal lacks, then write the results file from the journal.

    Ctrl-C or SIGTERM stops the run (the running round's process tree is killed) and keeps every
    finished round; the exit code is the shell's 128 + signal number."""
    from harness import procs

    progress = progress or sys.stderr
    specs, launched = specs_of(plan), launched_specs(plan)
    options = runner.RunOptions(repeats=plan["repeats"], node_rank=plan["node_rank"],
                                rdzv_endpoint=plan["rdzv_endpoint"], order_seed=plan["order_seed"],
                                progress=progress, journal=journal)
    try:
        with procs.interruptible():
            records = runner.run_trials(launched, options)
    except procs.Interrupted as stop:
        _say_interrupted(stop, journal, plan, out_dir, len(launched))
        return Outcome(stop.exit_code)
    if plan["node_rank"] != 0:
        print(f"moebench run: node {plan['node_rank']} done; node 0 writes the results", file=sys.stderr)
        return Outcome(0)
    by_index = iter(records)
    trials = [runner.skipped_record(s, plan["unavailable"][s.system]) if s.system in plan["unavailable"]
              else next(by_index) for s in specs]
    return write_from_plan(plan, journal, trials, records, out_dir)


def write_from_plan(plan: dict, journal, trials: list[dict], records: list[dict], out_dir) -> Outcome:
    """The results file, validated; a document that fails validation keeps the journal (exit 1)."""
    from harness.schema import SchemaError

    timer = next((t["timer"] for t in trials if t.get("timer")), "perf_counter")
    orders = [[records[i]["id"] for i in order]
              for order in runner.round_orders(len(records), plan["repeats"], plan["order_seed"])]
    method = runner.method(plan["warmup"], plan["steps"], plan["repeats"], timer, malloc=plan["malloc"],
                           order_seed=plan["order_seed"], orders=orders)
    resumes = [e for e in journal.events if e["event"] == "resumed"] if journal else []
    if resumes:
        method["resumed"] = [{k: v for k, v in e.items() if k != "event"} for e in resumes]
    try:
        path = runner.write_results(trials, method, plan["command_line"], Path(out_dir), run_id=plan["run_id"],
                                    created_utc=plan["created_utc"])
    except SchemaError as exc:
        kept = f"every finished round is kept in {journal.path}" if journal else "no journal was kept"
        print(f"moebench run: internal error (a bug in moebench): the results document failed validation: {exc}; "
              f"{kept}; once the cause is fixed, `moebench run --resume {plan['run_id']}` writes the file "
              "without running anything again", file=sys.stderr)
        return Outcome(1)
    if journal is not None:
        journals.remove(journal)
    return Outcome(0, path, trials)


def _say_interrupted(stop, journal, plan: dict, out_dir, n_launched: int) -> None:
    total = n_launched * plan["repeats"]
    if journal is None:
        print(f"moebench run: interrupted ({stop}); this node keeps no journal", file=sys.stderr)
        return
    print(f"moebench run: interrupted ({stop}): {len(journal.rounds)} of {total} planned rounds are kept in "
          f"{journal.path}; resume with: ./moebench run --resume {plan['run_id']} --out {out_dir}", file=sys.stderr)
