"""Calibrate `moebench gate` on this machine: false FAILs, detection power, wall time.

    .venv/bin/python -m benchmarks.gate_calibration [--aa 40] [--budget 45] [--out reports/gate_calibration.md]

Not part of the default suite (about an hour on 2 cores). Nothing else may run
on the machine meanwhile: it measures the gate's behaviour under the load it
starts itself, and other work would be an unrecorded second load.

What it runs, in one seeded random order so a slow spell hits every scenario alike:

* A/A: a scratch project repository (tests/plugins/scratch_repo.py) whose
  candidate working tree equals its baseline commit; half of these runs with a
  bounded background CPU load (one busy-loop process spinning in 50 ms bursts
  half of the time, started before the gate and killed after it);
* injected slowdowns of 5%, 10% and 30% (tests/plugins/slowed_tutel.py: extra
  elementwise compute, invisible to the work channel), quiet, and 10% loaded;
* an injected output change of 1e-3 with no slowdown.

Each gate run is one item with the budget given (default 45 s, a 3-item
suite's share of 135 s). Separately, the repository's own three-benchmark
suite (benchmarks/gate_suite.toml) is gated A/A against HEAD with its default
budget, to measure the wall time of a real gate run. Writes the report and
a JSON file of every run's verdict, ratio, interval and wall time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.plugins.scratch_repo import make_repo, set_working_tree, suite_text

ROOT = Path(__file__).resolve().parent.parent
SMALL = "[benchmark.overrides]\nmodel_dim = 256\nffn_dim = 768\n"
# The background load: a busy loop that spins in 50 ms bursts half of the time (a noisy neighbour that
# keeps one of the two cores half busy). A load that never sleeps stalls every OpenMP barrier of a
# 2-thread step and made one loaded gate run take over 3 minutes, too long for 20 of them here.
BUSY_LOOP = ("import time\nwhile True:\n    end = time.perf_counter() + 0.05\n"
             "    while time.perf_counter() < end:\n        pass\n    time.sleep(0.05)\n")


def scenarios(aa: int) -> list[tuple[str, dict, bool]]:
    """(name, plugin variant, loaded) per gate run."""
    runs = [("A/A", {}, False)] * (aa - aa // 2) + [("A/A", {}, True)] * (aa // 2)
    runs += [("5% slower", {"slowdown": 0.05}, False)] * 6
    runs += [("10% slower", {"slowdown": 0.10}, False)] * 6
    runs += [("10% slower", {"slowdown": 0.10}, True)] * 4
    runs += [("30% slower", {"slowdown": 0.30}, False)] * 3
    runs += [("output changed 1e-3", {"output_change": 1e-3}, False)] * 3
    return runs


def gate_once(repo: Path, out: Path, loaded: bool, extra_args: list[str], cwd: Path | None = None) -> dict:
    """One `moebench gate` run; its verdicts, exit code and wall time."""
    load = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if loaded else None
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "harness", "gate", *extra_args, "--out", str(out)],
                              cwd=cwd or repo, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        if load is not None:
            load.kill()
            load.wait()
    wall = time.monotonic() - started
    docs = sorted(out.glob("gate-*.json"), key=lambda p: p.stat().st_mtime)
    doc = json.loads(docs[-1].read_text()) if docs else {"verdicts": []}
    for path in docs:
        path.unlink()
    items = []
    for verdict, run in zip(doc["verdicts"], doc.get("runs", []), strict=True):
        pooled = (verdict.get("evidence") or {}).get("pooled") or {}
        items.append({"verdict": verdict["verdict"], "ratio": pooled.get("ratio"), "ci_low": pooled.get("ci_low"),
                      "ci_high": pooled.get("ci_high"), "noise": pooled.get("noise"),
                      "fail_threshold": verdict.get("fail_threshold"), "work_problems": verdict["work_problems"],
                      "rounds_per_block": len(run["rounds"]) // 2, "contention": run["contention_after"]})
    return {"exit_code": proc.returncode, "wall_s": wall, "items": items,
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode not in (0, 1, 3) else []}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def summarise(records: list[dict]) -> list[list[str]]:
    rows = []
    keys = []
    for r in records:
        if (r["scenario"], r["loaded"]) not in keys:
            keys.append((r["scenario"], r["loaded"]))
    for scenario, loaded in keys:
        group = [r for r in records if r["scenario"] == scenario and r["loaded"] == loaded]
        verdicts = [r["items"][0]["verdict"] if r["items"] else "ERROR" for r in group]
        ratios = [r["items"][0]["ratio"] for r in group if r["items"] and r["items"][0]["ratio"]]
        noises = [r["items"][0]["noise"] for r in group if r["items"] and r["items"][0]["noise"]]
        by_work = sum(bool(r["items"] and r["items"][0]["work_problems"]) for r in group)
        rows.append([scenario, "loaded" if loaded else "quiet", str(len(group)),
                     str(verdicts.count("FAIL")), str(verdicts.count("PASS")), str(verdicts.count("INCONCLUSIVE")),
                     str(verdicts.count("ERROR")), str(by_work),
                     f"{statistics.median(ratios):.3f}" if ratios else "-",
                     _pct(statistics.median(noises)) if noises else "-",
                     f"{statistics.median(r['wall_s'] for r in group):.0f}"])
    return rows


HEADER = ["scenario", "machine", "runs", "FAIL", "PASS", "INCONCLUSIVE", "error", "FAIL by work channel",
          "median ratio", "median noise", "median wall s"]


def wall_quantiles(walls: list[float]) -> tuple[float, float]:
    ordered = sorted(walls)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * (len(ordered) - 1))))]
    return statistics.median(ordered), p95


def write_report(path: Path, records: list[dict], suite_runs: list[dict], args, started: str, command: str) -> None:
    from harness.environment import cpu_model
    from harness.tables import markdown_table

    single_median, single_p95 = wall_quantiles([r["wall_s"] for r in records])
    lines = [
        "# Gate calibration", "",
        f"Command: `{command}`. Started {started} on {cpu_model()} ({len(os.sched_getaffinity(0))} cores), "
        f"nothing else running. Every gate run is one item (mixtral-8x7b proxy layer shrunk to model_dim 256, "
        f"ffn_dim 768, tutel_native wrapped by tests/plugins/slowed_tutel.py, rounds of 4 ABBA quartets of "
        "single steps) "
        f"with a budget of {args.budget:g} s, gated paired against the scratch project's HEAD. Loaded runs "
        "have one busy-loop process (spinning half of the time, in 50 ms bursts) on the machine for the whole "
        "gate run. Runs were made in one seeded random "
        "order across scenarios.", "",
        markdown_table(HEADER, summarise(records)), "",
        f"Wall time of a one-item gate run: median {single_median:.0f} s, 95th percentile {single_p95:.0f} s "
        f"(all {len(records)} runs).",
    ]
    if suite_runs:
        walls = [r["wall_s"] for r in suite_runs]
        verdicts = [i["verdict"] for r in suite_runs for i in r["items"]]
        median, p95 = wall_quantiles(walls)
        lines += ["", f"The repository's three-benchmark suite (benchmarks/gate_suite.toml, default budget), gated "
                  f"A/A against HEAD {len(suite_runs)} times: wall time median {median:.0f} s, 95th percentile "
                  f"{p95:.0f} s; verdicts {', '.join(f'{v} x{verdicts.count(v)}' for v in sorted(set(verdicts)))}."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from harness.files import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aa", type=int, default=40, help="A/A gate runs, half of them loaded (default 40)")
    parser.add_argument("--budget", type=float, default=45.0, help="budget of each one-item gate run (default 45 s)")
    parser.add_argument("--suite-runs", type=int, default=1, help="A/A runs of benchmarks/gate_suite.toml (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="reports/gate_calibration.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.gate_calibration " + " ".join(argv if argv is not None else sys.argv[1:])
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    runs = scenarios(args.aa)
    random.Random(args.seed).shuffle(runs)
    records = []
    with tempfile.TemporaryDirectory(prefix="moebench-calibration-") as scratch:
        repo = Path(scratch) / "project"
        make_repo(repo, suite_text(args.budget, quartets=4, extra=SMALL), [{}])
        for n, (scenario, variant, loaded) in enumerate(runs):
            set_working_tree(repo, **variant)
            record = gate_once(repo, Path(scratch) / "out", loaded, ["suite.toml", "--baseline-ref", "HEAD"])
            records.append({"scenario": scenario, "variant": variant, "loaded": loaded, **record})
            item = record["items"][0] if record["items"] else {}
            print(f"[{n + 1}/{len(runs)}] {scenario:<20} {'loaded' if loaded else 'quiet':<6} "
                  f"{item.get('verdict', 'ERROR'):<12} ratio {item.get('ratio') or 0:.3f} "
                  f"noise {_pct(item.get('noise'))} {record['wall_s']:.0f} s {record['stderr_tail']}", flush=True)
        suite_runs = []
        for _ in range(args.suite_runs):
            record = gate_once(ROOT, Path(scratch) / "suite-out", False,
                               [str(ROOT / "benchmarks" / "gate_suite.toml"), "--baseline-ref", "HEAD"], cwd=ROOT)
            suite_runs.append(record)
            print(f"suite A/A: {[i['verdict'] for i in record['items']]} {record['wall_s']:.0f} s", flush=True)
    out = Path(args.out)
    write_report(out, records, suite_runs, args, started, command)
    write_json_atomic({"command": command, "started_utc": started, "runs": records, "suite_runs": suite_runs},
                      out.with_suffix(".json"))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
