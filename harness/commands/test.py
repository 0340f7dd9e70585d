"""`moebench test`: run the test suite with pytest (extra args pass through)."""
from __future__ import annotations

import argparse
import subprocess
import sys

NAME = "test"
HELP = "run the test suite (pytest); extra arguments are passed to pytest"

NO_TESTS_COLLECTED = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest, e.g. -k schema")


def run(args: argparse.Namespace) -> int:
    rc = subprocess.call([sys.executable, "-m", "pytest", *args.pytest_args])
    if rc == NO_TESTS_COLLECTED:
        print("moebench test: error: no tests were collected", file=sys.stderr)
        return 1
    return rc
