"""`moebench calibrate`: measure this machine into a testbed file for the performance model."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

NAME = "calibrate"
HELP = ("measure this machine (GEMMs at the workloads' shapes, memory bandwidth, collectives at 2 and 4 ranks) "
        "into a testbed file")

DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE",
                        help="testbed file to write (default: testbeds/local-<fingerprint hash>.toml)")
    parser.add_argument("--workloads", default=None,
                        help="workloads whose proxy expert GEMMs are measured, comma-separated (default: all)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="GEMM dtypes, comma-separated")
    parser.add_argument("--threads", default=None,
                        help="GEMM thread counts, comma-separated (default: 1 and every core)")
    parser.add_argument("--ranks", default="2,4", help="world sizes for the collectives, comma-separated")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a collective run is killed")


def _positive_ints(text: str, flag: str) -> list[int]:
    from harness.errors import UsageError

    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise UsageError(f"{flag} takes positive integers, comma-separated, got {text!r}")
    return sorted({int(v) for v in values})


def _names(text: str, flag: str, known: list[str] | tuple[str, ...]) -> list[str]:
    from core.names import unknown_name_message
    from harness.errors import UsageError

    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError(f"{flag} is empty")
    for name in names:
        if name not in known:
            raise UsageError(unknown_name_message(flag.lstrip("-").rstrip("s"), name, list(known)))
    return names


def run(args: argparse.Namespace) -> int:
    from harness.commands.comm import CollectivesFailed, run_collectives
    from harness.files import write_text_atomic
    from harness.launch import LaunchConfig
    from harness.perfmodel import calibrate as cal
    from harness.perfmodel.testbed import load_testbed
    from workloads.flavors import workload_names

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workloads = _names(args.workloads, "--workloads", workload_names()) if args.workloads else workload_names()
    dtypes = _names(args.dtypes, "--dtypes", DTYPES)
    threads = _positive_ints(args.threads, "--threads") if args.threads else sorted({1, cores})
    ranks = _positive_ints(args.ranks, "--ranks")
    if any(r < 2 for r in ranks):
        from harness.errors import UsageError

        raise UsageError(f"--ranks: a collective needs at least 2 ranks, got {args.ranks!r}")

    fingerprint = cal.machine_fingerprint()
    out = Path(args.out) if args.out else cal.local_testbed_path(fingerprint)
    log = lambda text: print(f"moebench calibrate: {text}", file=sys.stderr, flush=True)  # noqa: E731

    shapes = cal.workload_gemm_shapes(workloads)
    log(f"GEMMs: {len(shapes) + 1} shapes x {len(dtypes)} dtypes x threads {threads} ...")
    gemms = cal.measure_gemms(shapes, dtypes, threads)
    log("memory bandwidth and per-call overhead ...")
    copy_bw = cal.measure_copy_bandwidth()
    per_call = cal.measure_call_overhead()
    collectives = []
    for n in ranks:
        log(f"collectives at {n} ranks ...")
        config = LaunchConfig(nproc_per_node=n, threads_per_rank=max(1, cores // n))
        try:
            raw = run_collectives(config, cal.collective_ops(), list(cal.COMM_SIZES), iters=10, warmup=2,
                                  device="cpu", timeout=args.timeout)
        except CollectivesFailed as exc:
            print(f"moebench calibrate: error: collectives at {n} ranks: {exc}", file=sys.stderr)
            return 1
        collectives += cal.fit_collectives(raw)

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = "./moebench calibrate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "./moebench calibrate"
    text = cal.render_testbed(out.stem, when, command.strip(), fingerprint, max(ranks), cal.memory_total_bytes(),
                            copy_bw, gemms, collectives, per_call)
    write_text_atomic(text, out)
    testbed = load_testbed(out)  # what was written reads back as a valid testbed
    for dtype in dtypes:
        for n in threads:
            log(f"{dtype} at {n} thread(s): {testbed.gemm_flops(dtype, threads=n) / 1e9:.1f} GFLOP/s "
                f"({cal.LARGE_SQUARE}^3)")
    log(f"memory bandwidth {copy_bw / 1e9:.1f} GB/s; per-call overhead {per_call * 1e6:.1f} us")
    for c in collectives:
        log(f"{c.op} at {c.ranks} ranks: latency {c.latency_s * 1e6:.0f} us, "
            f"bus bandwidth {c.bus_bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    print(f"wrote {out}")
    return 0
