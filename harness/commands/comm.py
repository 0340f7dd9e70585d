"""`moebench comm`: collective bandwidth and latency on a torchrun world.

Results go to the same versioned results schema (level "comm", mode = the
collective), plus a printed table and the alpha-beta fit per collective
that calibrates the performance model.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.names import unknown_name_message
from harness.errors import UsageError, input_errors

NAME = "comm"
HELP = "collective micro-benchmarks (all-to-all, all-reduce, all-gather, reduce-scatter) across message sizes"

DEFAULT_SIZES = "4K,64K,1M,4M,16M"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
DEVICES = ("cpu", "cuda")


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in UNITS else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"message size must be a positive number of bytes like 4K or 16M, got {text!r}")
    return int(number) * UNITS[unit]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.results_model import COLLECTIVES

    parser.add_argument("--ops", default=",".join(COLLECTIVES), help="collectives, comma-separated")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="bytes per rank, comma-separated (K, M suffixes)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per size")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="ranks on this node (torchrun's flag)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun's flag)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank (torchrun's flag)")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0 (multi-node)")
    parser.add_argument("--threads-per-rank", type=int, default=None, help="OMP threads per rank")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")
    parser.add_argument("--out", default="results", help="directory for the results file (default results/)")


def _validate(args) -> tuple[list[str], list[int]]:
    from harness.results_model import COLLECTIVES

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if not ops:
        raise UsageError(f"no collective given in --ops {args.ops!r}; choose from {', '.join(COLLECTIVES)}")
    for op in ops:
        if op not in COLLECTIVES:
            raise UsageError(unknown_name_message("collective", op, COLLECTIVES))
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    for name in ("iters", "warmup"):
        if getattr(args, name) < (1 if name == "iters" else 0):
            raise UsageError(f"--{name} must be {'positive' if name == 'iters' else 'non-negative'}, "
                             f"got {getattr(args, name)}")
    if args.device not in DEVICES:
        raise UsageError(unknown_name_message("device", args.device, DEVICES))
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite positive number of seconds, got {args.timeout}")
    if args.nproc_per_node * args.nnodes < 2:
        raise UsageError("a collective benchmark needs at least 2 ranks (--nproc-per-node / --nnodes)")
    return ops, sizes


def comm_trials(raw: dict, nnodes: int) -> list[dict]:
    """Schema trial records (level "comm") from the ranks' measurements."""
    from harness.comm import bus_factor
    from harness.identity import trial_id
    from harness.stats import summarize

    trials = []
    for m in raw["results"]:
        summary = summarize(m["samples_s"])
        world = m["world_size"]
        algbw = m["bytes"] / summary["median"]
        trial = {
            "system": f"torch.distributed:{raw['backend']}", "workload": f"comm/{m['op']}",
            "flavor": f"{m['bytes']}B", "level": "comm", "mode": m["op"], "routing": "none",
            "workload_spec": {"op": m["op"], "bytes_per_rank": m["bytes"], "iters": len(m["samples_s"])},
            "parallel": {"world_size": world, "ep": 1, "tp": 1, "dp": world, "nnodes": nnodes},
            "knobs": {"dtype": "float32"}, "dtype": "float32", "seed": 0, "status": "ok", "message": "",
            "samples_s": m["samples_s"], "per_rank_samples_s": None,
            "rounds": [{"round": 0, "status": "ok", "median_s": summary["median"], "calibration_before_s": None,
                        "calibration_after_s": None, "wall_s": sum(m["samples_s"])}],
            "summary": summary,
            "throughput": {"algbw_bytes_per_s": algbw, "busbw_bytes_per_s": algbw * bus_factor(m["op"], world)},
            "flops": None, "phase_times_s": None, "check": None, "peak_memory_bytes": None,
        }
        trial["id"] = trial_id(trial)
        trials.append(trial)
    return trials


def format_comm_table(trials: list[dict]) -> str:
    from harness.comm import fit_alpha_beta
    from harness.tables import text_table

    rows = []
    by_op: dict[str, list[tuple[int, float]]] = {}
    for t in trials:
        s, tp = t["summary"], t["throughput"]
        nbytes = t["workload_spec"]["bytes_per_rank"]
        by_op.setdefault(t["mode"], []).append((nbytes, s["median"]))
        rows.append((t["mode"], nbytes, f"{s['median'] * 1e6:.1f}", f"{s['iqr'] * 1e6:.1f}",
                     f"{tp['algbw_bytes_per_s'] / 1e6:.1f}", f"{tp['busbw_bytes_per_s'] / 1e6:.1f}"))
    lines = [text_table(("collective", "bytes/rank", "median us", "IQR us", "algbw MB/s", "busbw MB/s"), rows)]
    lines.append("alpha-beta fit t = alpha + bytes * beta (least squares over sizes):")
    for op, points in by_op.items():
        if len(points) >= 2:
            alpha, beta = fit_alpha_beta(points)
            bw = f"{1 / beta / 1e6:.1f} MB/s" if beta > 0 else "n/a"
            lines.append(f"  {op:<15} alpha {alpha * 1e6:8.1f} us   1/beta {bw}")
    lines.append("timing: perf_counter between barriers, slowest rank per call; busbw as in nccl-tests")
    return "\n".join(lines)


class CollectivesFailed(Exception):
    """The ranks ended without a result; the message says how."""


def run_collectives(config, ops: list[str], sizes: list[int], iters: int, warmup: int, device: str,
                    timeout: float) -> dict | None:
    """Launch the ranks (torchrun) and return rank 0's measurements; None on a node other than 0.
    Raises CollectivesFailed when they time out or exit without a result."""
    from harness import procs
    from harness.launch import REPO_DIR, child_env, trial_command

    with tempfile.TemporaryDirectory(prefix="moebench-comm-") as tmp:
        spec_path, out_path = Path(tmp) / "comm.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({"ops": ops, "sizes": sizes, "iters": iters, "warmup": warmup,
                                         "device": device}))
        argv = trial_command(config, spec_path, out_path, 0, timeout, module="harness.comm")
        with open(Path(tmp) / "stderr", "wb") as err:
            # timeout or Ctrl-C kills torchrun and every rank (harness/procs.py); Ctrl-C is re-raised
            rc = procs.run(argv, timeout, cwd=REPO_DIR, env=child_env(config), stdout=subprocess.DEVNULL,
                           stderr=err).returncode
        if rc is None:
            raise CollectivesFailed(f"no result after {timeout:g} s; ranks killed")
        if config.node_rank != 0:
            if rc != 0:
                raise CollectivesFailed(f"this node's ranks exited with code {rc}")
            return None
        if not out_path.exists():
            tail = (Path(tmp) / "stderr").read_text(errors="replace").strip().splitlines()[-5:]
            raise CollectivesFailed(f"ranks exited with code {rc} without a result: {' | '.join(tail)}")
        return json.loads(out_path.read_text())


def run(args: argparse.Namespace) -> int:
    from harness.launch import LaunchConfig
    from harness.schema import new_document, write_atomic

    ops, sizes = _validate(args)
    config = LaunchConfig(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                          rdzv_endpoint=args.rdzv_endpoint, threads_per_rank=args.threads_per_rank)
    with input_errors():  # harness/launch.py says what is wrong with torchrun's flags as a ValueError
        config.validate()
    print(f"moebench comm: {config.world_size} ranks, {len(ops)} collectives x {len(sizes)} sizes ...",
          file=sys.stderr)
    started = time.monotonic()
    try:
        raw = run_collectives(config, ops, sizes, args.iters, args.warmup, args.device, args.timeout)
    except CollectivesFailed as exc:
        print(f"moebench comm: error: {exc}", file=sys.stderr)
        return 1
    if raw is None:
        print(f"moebench comm: done on node {args.node_rank} (results are written on node 0)")
        return 0
    trials = comm_trials(raw, config.nnodes)
    method = {"timer": "perf_counter between barriers, slowest rank per call", "warmup": args.warmup,
              "steps": args.iters, "rounds": 1, "interleaved": False, "calibration": "none",
              "notes": f"collective micro-benchmark, {time.monotonic() - started:.1f} s wall"}
    doc = new_document(sys.argv, method, trials)
    path = write_atomic(doc, Path(args.out) / f"comm-{doc['run_id']}.json")
    print(format_comm_table(trials))
    print(f"results: {path}")
    return 0
