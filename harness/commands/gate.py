"""`moebench gate SUITE.toml`: fail CI when an MoE layer got slower or computes something else.

Exit codes: 0 pass; 1 a regression (timing or work); 2 usage error;
3 inconclusive (with --strict; otherwise a warning and 0). The method is in
harness/gate.py and docs/gate.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path

from harness import plugin_flag

NAME = "gate"
HELP = "regression gate: the suite's benchmarks against a baseline revision (--baseline-ref) or a stored baseline"

EXIT_PASS, EXIT_REGRESSION, EXIT_INCONCLUSIVE = 0, 1, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", metavar="SUITE.toml", help="the suite file (see harness/suite.py)")
    parser.add_argument("--baseline-ref", metavar="REV",
                        help="paired: check REV out into a scratch worktree and interleave it with this tree")
    parser.add_argument("--baseline", metavar="FILE", help="stored baseline (default results/baselines/<suite>.json)")
    parser.add_argument("--budget", type=float, metavar="SECONDS", help="time for the whole suite (default: the "
                        "suite's budget_s, 300)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a benchmark is inconclusive")
    parser.add_argument("--force", action="store_true", help="gate against a stored baseline from another environment")
    parser.add_argument("--summary", metavar="FILE.md", help="Markdown summary for CI (default <out>/summary.md)")
    parser.add_argument("--out", default="results/gate", help="directory for the gate's results (default results/gate)")
    plugin_flag.add_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the ABBA orders (default 0; recorded)")


def _exit_code(verdicts, strict: bool) -> int:
    words = {v.verdict for v in verdicts}
    if "FAIL" in words:
        return EXIT_REGRESSION
    if "INCONCLUSIVE" in words:
        return EXIT_INCONCLUSIVE if strict else EXIT_PASS
    return EXIT_PASS


def run(args: argparse.Namespace) -> int:
    from harness import gate, gate_report
    from harness.baselines import baseline_path, load_baseline, require_same_environment
    from harness.errors import UsageError
    from harness.gate_process import Side, repository_root, scratch_worktree
    from harness.suite import load_suite

    suite = load_suite(args.suite, extra_plugins=tuple(args.system_plugin))
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise UsageError(f"--budget must be a finite positive number of seconds, got {args.budget:g}")
    if args.baseline_ref and args.baseline:
        raise UsageError("give either --baseline-ref REV (paired) or --baseline FILE (stored), not both")
    out = Path(args.out)
    options = gate.GateOptions(budget_s=args.budget or suite.budget_s, confidence=suite.confidence, seed=args.seed,
                               workdir=out / "logs")
    notes = []
    started = dt.datetime.now(dt.UTC)

    def progress(text: str) -> None:
        print(text, file=sys.stderr)

    banner = f"moebench gate: {suite.path.name}: {len(suite.items())} item(s), budget {options.budget_s:g} s"
    if args.baseline_ref:
        repo = repository_root(suite.path)
        with scratch_worktree(repo, args.baseline_ref) as (tree, commit):
            sides = {"baseline": Side("baseline", tree, commit), "candidate": Side("candidate", repo, "working tree")}
            baseline_text = f"paired, {args.baseline_ref} ({commit[:12]}) in a scratch worktree"
            progress(f"{banner}; baseline {baseline_text}")
            verdicts, runs = gate.run_gate(suite, sides, options, progress=progress)
    else:
        path = Path(args.baseline) if args.baseline else baseline_path(suite)
        stored = load_baseline(path)
        differences = require_same_environment(stored, suite, path, args.force)
        if differences:
            notes.append(f"--force: the stored baseline's environment differs: {'; '.join(differences)}")
        sides = {"candidate": Side("candidate", Path.cwd().resolve(), "working tree")}
        baseline_text = f"stored, {path} ({stored['created_utc']}, normalised by {stored['normalize']})"
        progress(f"{banner}; baseline {baseline_text}")
        verdicts, runs = gate.run_gate(suite, sides, options, stored=stored, progress=progress)
    code = _exit_code(verdicts, args.strict)
    for line in gate_report.lines(verdicts, runs):
        print(line)
    if any(v.verdict == "INCONCLUSIVE" for v in verdicts) and not args.strict:
        print("moebench gate: warning: inconclusive benchmark(s); exit 0 (use --strict to fail)", file=sys.stderr)
    summary = Path(args.summary) if args.summary else out / "summary.md"
    record = gate.gate_record(suite, verdicts, runs, baseline_text, code, started, ["moebench", *sys.argv[1:]])
    written = gate.write_gate_results(record, out, summary,
                                      gate_report.markdown(verdicts, runs, suite.name, baseline_text, code, notes))
    print(f"results: {written}; summary: {summary}")
    return code
