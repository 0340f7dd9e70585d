"""`moebench paper fsmoe|megatron`: regenerate a paper's table, published beside modelled, with the error."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "paper"
HELP = "regenerate a paper's table from the performance model (fsmoe: FSMoE vs Tutel; megatron: Mixtral-8x7B TFLOP/s)"
PAPERS = ("fsmoe", "megatron")
MEASURE_WORKLOADS = "gpt2-xl-moe,mixtral-8x7b,mixtral-8x22b"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paper", choices=PAPERS, help="which table")
    parser.add_argument("--out", metavar="DIR", default="reports/paper", help="output directory (default: reports/paper)")
    parser.add_argument("--measure", action="store_true",
                        help="fsmoe: also run tutel_native and fsmoe_native here (model level, proxy flavour, "
                             "2 ranks, EP 2) and put the measured speedups beside the modelled ones")
    parser.add_argument("--repeats", type=int, default=3, help="--measure: interleaved rounds (default: 3)")
    parser.add_argument("--results", metavar="DIR", default="results/paper_fsmoe",
                        help="fsmoe: where measured trials are read from (the newest file with both systems) and "
                             "--measure writes them (default: results/paper_fsmoe)")


def _command_line(args: argparse.Namespace) -> str:
    line = f"./moebench paper {args.paper}"
    if args.out != "reports/paper":
        line += f" --out {args.out}"
    if args.measure:
        line += f" --measure --repeats {args.repeats}"
        if args.results != "results/paper_fsmoe":
            line += f" --results {args.results}"
    return line


def run(args: argparse.Namespace) -> int:
    from harness import paper
    from harness.errors import UsageError

    if args.measure and args.paper != "fsmoe":
        raise UsageError("--measure applies to `paper fsmoe` only (Megatron's figure needs 64 H100s)")
    if args.repeats < 2:
        raise UsageError(f"--repeats must be at least 2 (a paired interval needs rounds), got {args.repeats}")
    command = _command_line(args)
    if args.paper == "fsmoe":
        if args.measure:
            _measure(args)
        measured, note = _measured_rows(Path(args.results))
        table = paper.fsmoe_table(command, measured, note)
        written = paper.write_table(table, Path(args.out), "fsmoe", "speedup over Tutel")
    else:
        table = paper.megatron_table(command)
        written = paper.write_table(table, Path(args.out), "megatron", "TFLOP/s per GPU")
    print(table.markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


def _measure(args: argparse.Namespace) -> None:
    """Run the pair here, interleaved, into --results (read back by _measured_rows)."""
    from harness import cli
    from harness.errors import UsageError

    code = cli.main(["run", "--workload", MEASURE_WORKLOADS, "--flavor", "proxy", "--level", "model",
                     "--nproc-per-node", "2", "--ep", "2", "--systems", "tutel_native,fsmoe_native",
                     "--repeats", str(args.repeats), "--out", args.results])
    if code not in (0, 1):  # 1: some trial failed; its rows are left out of the table
        raise UsageError(f"the measured run failed (exit {code}); see its output above")


def _measured_rows(results: Path):
    """The paired speedups of the newest results file in `results` holding both systems, and a note on
    how, where and when they were measured; (None, "") when nothing was measured yet."""
    from harness import stats
    from harness.paper import MeasuredRow
    from harness.report import load_results

    files = sorted(results.glob("*.json")) if results.is_dir() else []
    docs, _ = load_results(files)
    for doc in sorted(docs, key=lambda d: d.get("created_utc") or "", reverse=True):
        by_workload: dict[str, dict] = {}
        for trial in doc.get("trials", []):
            if trial.get("status") == "ok":
                by_workload.setdefault(trial["workload_spec"]["name"], {})[trial["system"]] = trial
        rows = []
        for workload, pair in sorted(by_workload.items()):
            if {"tutel_native", "fsmoe_native"} <= set(pair):
                r = stats.speedup(pair["tutel_native"], pair["fsmoe_native"])
                rows.append(MeasuredRow(workload, pair["tutel_native"]["summary"]["median"] * 1e3,
                                        pair["fsmoe_native"]["summary"]["median"] * 1e3, r.ratio, r.interval_text(),
                                        r.n_pairs))
        if rows:
            env = doc.get("environment") or {}
            note = (f"Measured {doc.get('created_utc', 'at an unrecorded time')} on {env.get('cpu_model', '?')} "
                    f"({env.get('cpu_count', '?')} CPUs) by `{' '.join(doc.get('command_line') or [])}` "
                    f"(results in {results}/; `paper fsmoe --measure` runs it again). Proxy flavours, gloo; speedup "
                    "= tutel_native's step / fsmoe_native's, geometric mean of the paired per-round ratios with its "
                    "95% bootstrap interval. A CPU cannot overlap communication with compute, so these rows test "
                    "the two systems here, not FSMoE's GPU claim.")
            return rows, note
    return None, ""
