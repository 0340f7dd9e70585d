"""`moebench check`: every available system against torch_reference (equivalence before speed).

The table shows, per system and case, the relative errors of the output, the input gradient, the
worst weight gradient (canonical layout) and l_aux, the tolerance applied, and under it the
lower internal precision each system declares (harness/equivalence.py)."""
from __future__ import annotations

import argparse
import json

from core.names import unknown_name_message
from harness import plugin_flag
from harness.errors import UsageError, input_errors

NAME = "check"
HELP = "check each available MoE system against torch_reference on small shapes (exit 1 on any failure)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--systems", help="comma-separated systems to check (default: all registered, plugins "
                                          "included)")
    plugin_flag.add_argument(parser)
    parser.add_argument("--cases", help="comma-separated case names (default: all; see the table)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", metavar="FILE", help="also write the results JSON to FILE (atomically)")


def _names(text: str, known: list[str], kind: str) -> list[str]:
    """The comma-separated names in `text`; UsageError naming the first unknown one and its closest."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen:
        raise UsageError(f"no {kind} given in {text!r}; choose from {', '.join(known)}")
    for name in chosen:
        if name not in known:
            raise UsageError(unknown_name_message(kind, name, known))
    return chosen


def run(args: argparse.Namespace) -> int:
    from harness.check import any_failed, default_cases, results_table, run_system_in_subprocess
    from harness.files import write_json_atomic
    from systems import availability, system_names

    with input_errors("--system-plugin: "):
        plugin_flag.register(args)
    names = system_names()
    chosen = names if not args.systems else _names(args.systems, names, "system")
    cases = default_cases()
    if args.cases:
        wanted = _names(args.cases, [c.name for c in cases], "case")
        cases = [c for c in cases if c.name in wanted]

    results, unavailable = [], {}
    for name in chosen:
        avail = availability(name)
        if not avail.ok:
            unavailable[name] = avail.reason
            continue
        results.extend(run_system_in_subprocess(name, cases))

    payload = {
        "results": [r.__dict__ for r in results],
        "unavailable": unavailable,
        "passed": not any_failed(results),
    }
    if args.out:
        write_json_atomic(payload, args.out, indent=2)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(results_table(results))
        for name, reason in unavailable.items():
            print(f"{name}: unavailable ({reason})")
        print("all available systems pass" if payload["passed"] else "FAILED: see the rows above")
    return 1 if any_failed(results) else 0
