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
                        help="--measure: where the measured trials are written (default: results/paper_fsmoe)")


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
        measured, note = (_measure(args) if args.measure else (None, ""))
        table = paper.fsmoe_table(command, measured, note)
        written = paper.write_table(table, Path(args.out), "fsmoe", "speedup over Tutel")
    else:
        table = paper.megatron_table(command)
        written = paper.write_table(table, Path(args.out), "megatron", "TFLOP/s per GPU")
    print(table.markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


def _measure(args: argparse.Namespace):
    """Run the pair here, interleaved, and read the paired speedups back from the results written."""
    from harness import cli, stats
    from harness.errors import UsageError
    from harness.paper import MeasuredRow
    from harness.report import find_result_files, load_results

    results = Path(args.results)
    before = set(results.rglob("*.json")) if results.exists() else set()
    code = cli.main(["run", "--workload", MEASURE_WORKLOADS, "--flavor", "proxy", "--level", "model",
                     "--nproc-per-node", "2", "--ep", "2", "--systems", "tutel_native,fsmoe_native",
                     "--repeats", str(args.repeats), "--out", str(results)])
    new = [p for p in find_result_files([str(results)]) if p not in before]
    if code not in (0, 1) or not new:  # 1: some trial failed; its rows are left out below
        raise UsageError(f"the measured run failed (exit {code}); see its output above")
    docs, _ = load_results(new)
    rows = []
    for doc in docs:
        by_key: dict[str, dict] = {}
        for trial in doc.get("trials", []):
            if trial.get("status") == "ok":
                by_key.setdefault(trial["workload_spec"]["name"], {})[trial["system"]] = trial
        for workload, pair in sorted(by_key.items()):
            if {"tutel_native", "fsmoe_native"} <= set(pair):
                r = stats.speedup(pair["tutel_native"], pair["fsmoe_native"])
                rows.append(MeasuredRow(workload, pair["tutel_native"]["summary"]["median"] * 1e3,
                                        pair["fsmoe_native"]["summary"]["median"] * 1e3, r.ratio, r.interval_text(),
                                        r.n_pairs))
    note = (f"Measured by the same command: `./moebench run --workload {MEASURE_WORKLOADS} --flavor proxy --level "
            f"model --nproc-per-node 2 --ep 2 --systems tutel_native,fsmoe_native --repeats {args.repeats}` "
            f"(results in {results}/). Proxy flavours on this machine's CPU cores, gloo; speedup = tutel_native's "
            "step / fsmoe_native's, geometric mean of the paired per-round ratios with its 95% bootstrap interval. "
            "A CPU cannot overlap communication with compute here, so these rows test the systems, not FSMoE's "
            "GPU claim.")
    return rows, note
