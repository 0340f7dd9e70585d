"""`moebench predict`: the performance model's time for trials, on any testbed, without running them."""
from __future__ import annotations

import argparse
import sys

NAME = "predict"
HELP = ("predict layer steps or whole training iterations on a testbed (testbeds/*.toml) from the same flags as "
        "`run`, plus a parallel layout for the model level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.commands import run

    run.add_arguments(parser, with_predict=False)
    parser.add_argument("--testbed", default=None,
                        help="testbed name in testbeds/ or a file (default: this machine's calibrated file, "
                             "testbeds/local-<hash>.toml)")
    layout = parser.add_argument_group("layout (--level model; harness/perfmodel/iteration.py)")
    layout.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    layout.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    layout.add_argument("--vpp", type=int, default=1, help="virtual stages per pipeline rank (default 1)")
    layout.add_argument("--micro-batches", type=int, default=None,
                        help="micro-batches per data-parallel replica per iteration (default: pp)")
    layout.add_argument("--distributed-optimizer", action="store_true",
                        help="optimizer states sharded over the data-parallel ranks")


def default_testbed() -> str:
    """This machine's calibrated file: the one whose name carries this machine's fingerprint hash."""
    from harness.errors import UsageError
    from harness.perfmodel.calibrate import local_testbed_path

    path = local_testbed_path()
    if not path.exists():
        raise UsageError(f"no --testbed given and this machine has no calibrated file ({path.name}); "
                         f"run ./moebench calibrate, or name a testbed")
    return str(path)


def run(args: argparse.Namespace) -> int:
    from core.names import unknown_name_message
    from harness.commands.run import resolve_workloads, system_options
    from harness.errors import UsageError
    from harness.perfmodel.layer import SYSTEMS
    from harness.perfmodel.testbed import DTYPE_BYTES, load_testbed

    if args.level not in ("layer", "model"):
        raise UsageError(f"--level {args.level}: the performance model predicts layer or model")
    wanted_mode = "forward_backward" if args.level == "layer" else "train"
    if (args.mode or wanted_mode) != wanted_mode:
        raise UsageError(f"--mode {args.mode}: the performance model predicts {wanted_mode} at {args.level} level")
    if args.dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype {args.dtype}: the performance model predicts {', '.join(DTYPE_BYTES)}")
    testbed = load_testbed(args.testbed or default_testbed())
    systems = [s.strip() for s in (args.systems or ",".join(SYSTEMS)).split(",") if s.strip()]
    for name in systems:
        if name not in SYSTEMS:
            raise UsageError(unknown_name_message("system for the performance model", name, sorted(SYSTEMS)))
    entries = system_options(args, systems)
    workloads = resolve_workloads(args)
    print(f"testbed {testbed.name}: {testbed.description}")
    if args.level == "layer":
        _predict_layers(args, testbed, workloads, entries)
    else:
        _predict_iterations(args, testbed, workloads, entries)
    return 0


def _label(name: str, options: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in sorted(options.items()))


def _largest(phases: dict[str, float], n: int = 3) -> str:
    return ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])[:n])


def _predict_layers(args, testbed, workloads, entries) -> None:
    from core.values import ParallelSpec
    from harness.errors import UsageError
    from harness.perfmodel.layer import predict_layer
    from harness.perfmodel.trials import layer_case, layer_peak_bytes, rank_threads
    from harness.tables import text_table

    if (args.tp, args.pp, args.vpp) != (1, 1, 1) or args.micro_batches or args.distributed_optimizer:
        raise UsageError("--tp, --pp, --vpp, --micro-batches and --distributed-optimizer lay out a whole model: "
                         "use them with --level model")
    world = args.nproc_per_node * args.nnodes
    parallel = ParallelSpec(world_size=world, ep=args.ep, nnodes=args.nnodes, threads_per_rank=args.threads_per_rank)
    parallel.validate()
    if world > testbed.devices:
        raise UsageError(f"{world} ranks do not fit testbed {testbed.name} ({testbed.devices} devices)")
    threads = rank_threads(testbed, args.threads_per_rank, max(1, world // args.nnodes))
    rows = []
    for workload in workloads:
        parallel.validate(workload.layer.num_experts)
        for name, options in entries:
            case = layer_case(name, workload.layer, workload.tokens_per_step, workload.capacity_factor, args.dtype,
                              args.ep, options, threads)
            p = predict_layer(testbed, case)
            device = "cuda" if testbed.fingerprint is None else "cpu"
            memory = layer_peak_bytes(name, workload, workload.capacity_factor, args.dtype, parallel, device, options)
            fits = "" if memory <= testbed.memory_capacity.value else " (does not fit)"
            rows.append((f"{workload.name}/{workload.flavor}", _label(name, options), f"{p.total_s * 1e3:.2f}",
                         f"{p.exposed_comm_s * 1e3:.2f}", f"{p.degrees['forward']}/{p.degrees['backward']}",
                         f"{memory / 2**30:.2f}{fits}", _largest(p.phases_s)))
    print(text_table(("workload", "system", "predicted ms", "exposed comm ms", "d fwd/bwd", "peak GiB/rank",
                      "largest phases (ms)"), rows))
    kinds = sorted({q.kind for _, q in testbed.quantities()})
    print(f"layer forward+backward per rank, {args.dtype}, ep {args.ep} of {world} ranks; the testbed's figures are "
          f"{', '.join(kinds)} (docs/testbeds.md); time: harness/perfmodel/layer.py; peak memory: the memory "
          f"guard's estimate (harness/memory_guard.py), without the equivalence check's copy", file=sys.stdout)


def _predict_iterations(args, testbed, workloads, entries) -> None:
    from harness.perfmodel.iteration import Layout, model_flops_per_iteration, predict_iteration
    from harness.perfmodel.model_memory import peak_memory_bytes
    from harness.tables import text_table

    layout = Layout(world=args.nproc_per_node * args.nnodes, tp=args.tp, ep=args.ep, pp=args.pp, vpp=args.vpp,
                    micro_batches=args.micro_batches or args.pp, distributed_optimizer=args.distributed_optimizer)
    rows = []
    for workload in workloads:
        for name, options in entries:
            p = predict_iteration(testbed, workload, name, layout, args.dtype, options)
            memory = peak_memory_bytes(workload, layout, args.dtype, name)
            fits = "" if memory <= testbed.memory_capacity.value else " (does not fit)"
            tflops = model_flops_per_iteration(workload, layout) / p.total_s / layout.world / 1e12
            rows.append((f"{workload.name}/{workload.flavor}", _label(name, options), f"{p.total_s * 1e3:.1f}",
                         f"{p.exposed_comm_s * 1e3:.1f}", f"{p.phases_s['pipeline bubble'] * 1e3:.1f}",
                         f"{tflops:.1f}", f"{memory / 2**30:.2f}{fits}", _largest(p.phases_s)))
    print(text_table(("workload", "system", "iteration ms", "exposed comm ms", "bubble ms", "TFLOP/s/device",
                      "peak GiB/device", "largest phases (ms)"), rows))
    print(f"one training iteration, {args.dtype}: {layout.world} devices, tp {layout.tp}, ep {layout.ep}, pp "
          f"{layout.pp}, vpp {layout.vpp}, dp {layout.dp}, {layout.micro_batches} micro-batch(es) of the workload's "
          f"batch per replica; time: harness/perfmodel/iteration.py; peak memory: harness/perfmodel/model_memory.py",
          file=sys.stdout)
