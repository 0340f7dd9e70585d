"""`moebench report`: comparison tables (Markdown, CSV) and a chart from results files."""
from __future__ import annotations

import argparse

NAME = "report"
HELP = "build iteration-time and speedup tables (Markdown, CSV) and a bar chart from results files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", default=["results"],
                        help="results files or directories of them (default: results/)")
    parser.add_argument("--baseline", metavar="SYSTEM",
                        help="system the speedups are relative to (default: tutel_native if present, "
                             "else torch_reference)")
    parser.add_argument("--out", metavar="DIR", default="reports", help="output directory (default: reports/)")
    parser.add_argument("--include-unchecked", action="store_true",
                        help="show speedups of systems whose equivalence check failed (marked)")
    parser.add_argument("--title", default="moebench", help="title of the tables and chart (default: moebench)")


def _command_line(args: argparse.Namespace) -> list[str]:
    """The report command as given (rebuilt from the parsed arguments, so it is right however main() was called)."""
    line = ["python", "-m", "harness", NAME, *args.paths]
    if args.baseline:
        line += ["--baseline", args.baseline]
    line += ["--out", args.out, "--title", args.title]
    return line + (["--include-unchecked"] if args.include_unchecked else [])


def run(args: argparse.Namespace) -> int:
    from harness.report import ReportOptions, build_report

    report = build_report(ReportOptions(
        paths=list(args.paths), baseline=args.baseline, out_dir=args.out, include_unchecked=args.include_unchecked,
        title=args.title, command_line=_command_line(args),
    ))
    print(report.iteration_markdown)
    print(report.speedup_markdown)
    for path in report.written:
        print(f"wrote {path}")
    return 0
