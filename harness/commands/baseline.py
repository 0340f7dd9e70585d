"""`moebench baseline SUITE.toml`: store the suite's normalised timings and work for later gates."""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from harness import plugin_flag

NAME = "baseline"
HELP = "measure the suite here and store results/baselines/<suite>.json for `moebench gate` without a revision"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", metavar="SUITE.toml")
    parser.add_argument("--out", default="results/baselines", help="directory (default results/baselines)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per block (default 10)")
    plugin_flag.add_argument(parser)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from harness import gate
    from harness.baselines import baseline_path, new_baseline
    from harness.errors import UsageError
    from harness.files import write_json_atomic
    from harness.gate_process import Side, WorkerFailed
    from harness.gate_verdict import geometric_mean
    from harness.suite import load_suite

    suite = load_suite(args.suite, extra_plugins=tuple(args.system_plugin))
    rounds = gate.BASELINE_ROUNDS if args.rounds is None else args.rounds
    if rounds < 3:
        raise UsageError(f"--rounds must be at least 3 (an interval needs them), got {rounds}")
    candidate = Side("candidate", Path.cwd().resolve(), "working tree")
    options = gate.GateOptions(budget_s=suite.budget_s, confidence=suite.confidence, seed=args.seed,
                               workdir=Path(args.out) / "logs")
    items, failed = {}, []
    for bench, system in suite.items():
        key = gate.item_key(bench, system)
        try:
            _, run_ = gate.normalised_rounds(bench, system, suite.system_plugins, candidate, suite.normalize, options,
                                             random.Random(f"{args.seed}:{key}"), rounds=rounds)
        except WorkerFailed as exc:
            failed.append(f"{key}: {exc}")
            print(f"moebench baseline: {key} failed: {exc}", file=sys.stderr)
            continue
        items[key] = {"rounds": run_.rounds, "work": run_.work["candidate"][0],
                      "work_per_block": run_.work["candidate"],
                      "contention_before": run_.contention_before, "contention_after": run_.contention_after,
                      "wall_s": run_.wall_s}
        values = [r["value"] for r in run_.rounds]
        print(f"  {key}: {len(values)} rounds, normalised time {geometric_mean(values):.3f} "
              f"(x {suite.normalize})", file=sys.stderr)
    if failed:
        print(f"moebench baseline: no baseline written: {len(failed)} item(s) failed", file=sys.stderr)
        return 1
    path = write_json_atomic(new_baseline(suite, items, ["moebench", *sys.argv[1:]]),
                             baseline_path(suite, Path(args.out)))
    print(f"baseline: {path}")
    return 0
