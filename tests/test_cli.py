"""The top-level CLI: pytest options pass through `moebench test`; other commands reject unknown flags."""
from __future__ import annotations

import subprocess
import sys


def _moebench(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=120)


def test_test_command_passes_pytest_options_through():
    proc = _moebench("test", "-q", "-k", "outlier", "tests/test_stats.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout and "deselected" in proc.stdout


def test_unknown_flag_on_another_command_is_one_line_exit_2():
    proc = _moebench("list", "--bogus")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["moebench: error: unrecognized arguments: --bogus (see moebench --help)"]
