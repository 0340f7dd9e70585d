"""`moebench convert IN.json OUT.json`: a moebench results document <-> a pytest-benchmark JSON file.

The direction comes from the input (harness/convert.py says what maps to what,
and what cannot); ``--to`` names the output format instead and fails when the
input already is one.
"""
from __future__ import annotations

import argparse

NAME = "convert"
HELP = "convert a moebench results file to a pytest-benchmark JSON file, or the other way round"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.convert import FORMATS

    parser.add_argument("input", metavar="IN.json", help="a moebench results file or a pytest-benchmark JSON file "
                        "(--benchmark-json, --benchmark-autosave, --benchmark-save)")
    parser.add_argument("output", metavar="OUT.json", help="the converted file (written atomically)")
    parser.add_argument("--to", choices=FORMATS, default=None,
                        help="output format (default: the other format than the input's)")


def run(args: argparse.Namespace) -> int:
    from harness.convert import convert_file

    command_line = ["python", "-m", "harness", NAME, args.input, args.output]
    if args.to:
        command_line += ["--to", args.to]
    to, out = convert_file(args.input, args.output, to=args.to, command_line=command_line)
    if to == "moebench":
        count = f"{len(out['trials'])} trial(s)"
    else:
        count = f"{len(out['benchmarks'])} benchmark(s)"
        omitted = out["converted_from"]["omitted_trials"]
        if omitted:
            count += f"; {len(omitted)} trial(s) without samples left out (kept under \"moebench\")"
    print(f"wrote {args.output}: {to}, {count}")
    return 0
