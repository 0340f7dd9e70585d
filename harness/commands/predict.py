"""`moebench predict`: the performance model's time for trials, on any testbed, without running them."""
from __future__ import annotations

import argparse
import sys

NAME = "predict"
HELP = "predict layer step times on a testbed (testbeds/*.toml) from the same flags as `run`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.commands import run

    run.add_arguments(parser, with_predict=False)
    parser.add_argument("--testbed", default=None,
                        help="testbed name in testbeds/ or a file (default: this machine's calibrated file, "
                             "testbeds/local-<hash>.toml)")


def default_testbed() -> str:
    """This machine's calibrated file: the one whose name carries this machine's fingerprint hash."""
    from harness.errors import UsageError
    from harness.perfmodel.calibrate import local_testbed_path

    path = local_testbed_path()
    if not path.exists():
        raise UsageError(f"no --testbed given and this machine has no calibrated file ({path.name}); "
                         f"run ./moebench calibrate, or name a testbed")
    return str(path)


def _entries(args: argparse.Namespace, systems: list[str]) -> list[tuple[str, dict]]:
    """(system, options) per entry: --option applies to every entry of its system, --variant adds one."""
    from harness.commands.run import parse_option
    from harness.errors import UsageError

    common: dict[str, dict] = {name: {} for name in systems}
    for text in args.option:
        key, value = parse_option(text)
        target, _, bare = key.rpartition(".")
        for name in ([target] if target else systems):
            if name not in common:
                raise UsageError(f"--option {text}: system {name!r} is not among the predicted systems")
            common[name][bare] = value
    entries = [(name, dict(common[name])) for name in systems]
    for text in args.variant:
        name, sep, rest = text.partition(":")
        if not sep or name not in common:
            raise UsageError(f"--variant must be SYSTEM:KEY=VALUE[,KEY=VALUE...] with a predicted system, got {text!r}")
        options = dict(common[name])
        for part in rest.split(","):
            key, value = parse_option(part)
            options[key] = value
        entries.append((name, options))
    return entries


def run(args: argparse.Namespace) -> int:
    from core.names import unknown_name_message
    from core.values import ParallelSpec
    from harness.commands.run import resolve_workloads
    from harness.errors import UsageError
    from harness.perfmodel.layer import SYSTEMS, predict_layer
    from harness.perfmodel.testbed import load_testbed
    from harness.perfmodel.trials import layer_case, layer_peak_bytes, rank_threads
    from harness.tables import text_table

    if args.level != "layer":
        raise UsageError(f"--level {args.level}: the performance model predicts layer steps only so far")
    if (args.mode or "forward_backward") != "forward_backward":
        raise UsageError(f"--mode {args.mode}: the performance model predicts forward+backward steps only")
    if args.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype {args.dtype}: the performance model predicts float32 and bfloat16 trials")
    testbed = load_testbed(args.testbed or default_testbed())
    world = args.nproc_per_node * args.nnodes
    parallel = ParallelSpec(world_size=world, ep=args.ep, nnodes=args.nnodes, threads_per_rank=args.threads_per_rank)
    parallel.validate()
    if world > testbed.devices:
        raise UsageError(f"{world} ranks do not fit testbed {testbed.name} ({testbed.devices} devices)")
    systems = [s.strip() for s in (args.systems or ",".join(SYSTEMS)).split(",") if s.strip()]
    for name in systems:
        if name not in SYSTEMS:
            raise UsageError(unknown_name_message("system for the performance model", name, sorted(SYSTEMS)))
    threads = rank_threads(testbed, args.threads_per_rank, max(1, world // args.nnodes))
    rows = []
    for workload in resolve_workloads(args):
        parallel.validate(workload.layer.num_experts)
        for name, options in _entries(args, systems):
            case = layer_case(name, workload.layer, workload.tokens_per_step, workload.capacity_factor, args.dtype,
                              args.ep, options, threads)
            p = predict_layer(testbed, case)
            device = "cuda" if testbed.fingerprint is None else "cpu"
            memory = layer_peak_bytes(name, workload, workload.capacity_factor, args.dtype, parallel, device, options)
            fits = "" if memory <= testbed.memory_capacity.value else " (does not fit)"
            top = sorted(p.phases_s.items(), key=lambda kv: -kv[1])[:3]
            label = name + "".join(f" {k}={v}" for k, v in sorted(options.items()))
            rows.append((f"{workload.name}/{workload.flavor}", label, f"{p.total_s * 1e3:.2f}",
                         f"{p.exposed_comm_s * 1e3:.2f}", f"{p.degrees['forward']}/{p.degrees['backward']}",
                         f"{memory / 2**30:.2f}{fits}", ", ".join(f"{k} {v * 1e3:.2f}" for k, v in top)))
    print(f"testbed {testbed.name}: {testbed.description}")
    print(text_table(("workload", "system", "predicted ms", "exposed comm ms", "d fwd/bwd", "peak GiB/rank",
                      "largest phases (ms)"), rows))
    kinds = sorted({q.kind for _, q in testbed.quantities()})
    print(f"layer forward+backward per rank, {args.dtype}, ep {args.ep} of {world} ranks; the testbed's figures are "
          f"{', '.join(kinds)} (docs/testbeds.md); time: harness/perfmodel/layer.py; peak memory: the memory "
          f"guard's estimate (harness/memory_guard.py), without the equivalence check's copy", file=sys.stdout)
    return 0
