"""`moebench test`: run the test suite with pytest (extra args pass through)."""
from __future__ import annotations

import argparse
import subprocess
import sys

NAME = "test"
HELP = "run the test suite (pytest); extra arguments are passed to pytest"

NO_TESTS_COLLECTED = 5
PASSES_EXTRA_ARGS = True  # harness/cli.py hands everything after `test` to pytest unparsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest, passed verbatim, e.g. -q -k schema")


def run(args: argparse.Namespace) -> int:
    rc = subprocess.call([sys.executable, "-m", "pytest", *args.extra_args])
    if rc == NO_TESTS_COLLECTED:
        print("moebench test: error: no tests were collected", file=sys.stderr)
        return 1
    return rc
