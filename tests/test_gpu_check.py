"""benchmarks/gpu_check.sh --dry-run: every command it would run on a GPU machine parses, names known
workloads, systems and options, and covers the systems that need CUDA. (Building the trials needs the
CUDA device itself: `--device cuda` is refused here, so that part is left to the GPU machine.)"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from harness.cli import build_parser
from harness.commands.run import resolve_workloads, system_options
from systems import system_names

ROOT = Path(__file__).resolve().parent.parent


def _dry_run_commands() -> list[list[str]]:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert lines and all(shlex.split(line)[1:3] == ["-m", "harness"] for line in lines), done.stdout
    return [shlex.split(line)[3:] for line in lines]


def test_dry_run_prints_valid_runs_covering_the_gpu_only_systems():
    commands = _dry_run_commands()
    parser, _ = build_parser()
    runs = [cmd for cmd in commands if cmd[0] == "run"]
    assert len(runs) == 4 and {cmd[0] for cmd in commands} == {"list", "run", "report"}
    systems_seen, levels = set(), set()
    for argv in runs:
        args = parser.parse_args(argv)
        assert (args.device, args.dtype) == ("cuda", "bfloat16")
        assert resolve_workloads(args)
        names = args.systems.split(",")
        assert set(names) <= set(system_names())
        assert system_options(args, names)  # --variant / --option name declared options
        systems_seen |= set(names)
        levels.add(args.level or "layer")
    assert {"liger_kernel", "megatron_grouped_gemm", "hf_transformers", "torchtitan"} <= systems_seen
    assert levels == {"layer", "model"}


def test_unknown_argument_is_one_line_and_exit_2():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--frobnicate"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--frobnicate" in done.stderr
