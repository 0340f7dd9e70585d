"""`moebench run`: benchmark MoE systems on identical work and write a results file.

Everything is validated before the first trial starts; bad input is one line
and exit 2. The run itself never stops for a failing trial: every outcome is
a status in the results file. Multi-node: every node runs the same command
with its own --node-rank and the same --rdzv-endpoint; node 0 writes the
results and prints the table.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from core.names import closest_names, either, unknown_name_message
from harness import plugin_flag
from harness.errors import UsageError, input_errors
from harness.host_memory import MALLOC_MODES

NAME = "run"
HELP = "run the benchmark: systems x workloads in interleaved rounds, then write results/<run_id>.json"

DEFAULT_WORKLOAD = "mixtral-8x7b"
DEFAULT_MODE = {"layer": "forward_backward", "model": "train"}
# CLI flag -> resolve_workload override field
OVERRIDES = {
    "model_dim": "model_dim", "ffn_dim": "ffn_dim", "experts": "num_experts", "top_k": "top_k",
    "activation": "activation", "batch_size": "batch_size", "seq_len": "seq_len", "layers": "n_layers",
    "heads": "n_heads", "kv_heads": "n_kv_heads", "vocab": "vocab_size", "router": "router",
}
OPTION_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _one_line_error(message: str) -> None:
    """argparse's own errors as one line too (instead of usage + message)."""
    print(f"moebench run: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_arguments(parser: argparse.ArgumentParser, with_predict: bool = True) -> None:
    parser.error = _one_line_error  # type: ignore[method-assign]
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", help=f"preset name(s), comma-separated, or 'custom' (default {DEFAULT_WORKLOAD})")
    w.add_argument("--config", metavar="FILE.toml", help="custom workload from a TOML file")
    w.add_argument("--flavor", default="proxy", help="full | proxy | debug (default proxy)")
    for flag in OVERRIDES:
        w.add_argument(f"--{flag.replace('_', '-')}", dest=flag, metavar="VALUE",
                       help="declared (default) | softmax: the workload's own router, or the common softmax "
                            "top-k router every system can run" if flag == "router"
                       else f"override the workload's {OVERRIDES[flag]}")
    t = parser.add_argument_group("trial")
    t.add_argument("--level", default="layer", help="layer | model (default layer)")
    t.add_argument("--mode", help="forward | forward_backward | train (default: forward_backward for layer, "
                                  "train for model)")
    t.add_argument("--routing", default="learned", help="learned | balanced | zipf (default learned)")
    t.add_argument("--systems", help="comma-separated systems (default: every system available here, "
                                     "plugins included)")
    plugin_flag.add_argument(t)
    t.add_argument("--capacity-factor", help="a positive number or 'dropless' (default: the workload's)")
    t.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float64 (default float32)")
    t.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--option", action="append", default=[], metavar="[SYSTEM.]KEY=VALUE",
                   help="system knob (repeatable): SYSTEM.KEY=VALUE applies to that system only; KEY=VALUE to "
                        "every selected system that declares KEY (see `moebench list`)")
    t.add_argument("--variant", action="append", default=[], metavar="SYSTEM:KEY=VALUE[,KEY=VALUE...]",
                   help="an extra, labelled entry of SYSTEM with these options, run interleaved with the others "
                        "(repeatable), e.g. --variant tutel_native:expert_kernel=mm")
    m = parser.add_argument_group("method")
    m.add_argument("--repeats", type=int, default=3, help="rounds over all systems (default 3)")
    m.add_argument("--warmup", type=int, default=2, help="warm-up steps per round (default 2)")
    m.add_argument("--steps", type=int, default=5, help="timed steps per round (default 5)")
    m.add_argument("--timeout", type=float, default=300.0, help="seconds per trial round (default 300)")
    m.add_argument("--no-check", action="store_true", help="skip the equivalence check against torch_reference")
    m.add_argument("--malloc", choices=MALLOC_MODES, default="reuse",
                   help="host allocator policy in trial processes: reuse (default: glibc keeps freed memory, "
                        "no per-step page faults; harness/host_memory.py) or system (glibc defaults)")
    m.add_argument("--order-seed", type=int, default=0,
                   help="seed of the random order of trials inside each round (default 0; recorded)")
    m.add_argument("--out", default="results", help="results directory (default results/)")
    if with_predict:
        m.add_argument("--predict", nargs="?", const="local", metavar="TESTBED",
                       help="store the performance model's prediction beside each layer trial it covers, on "
                            "TESTBED (default: this machine's calibrated file); reports then show the error")
    m.add_argument("--resume", metavar="RUN_ID",
                   help="finish an interrupted run: run only the rounds its journal (OUT/RUN_ID.journal.jsonl) "
                        "lacks, with the settings it started with, then write OUT/RUN_ID.json")
    p = parser.add_argument_group("parallel (torchrun's meaning)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this node (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks per group (default 1)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="rendezvous of a multi-node run; round i uses PORT+i, hosted by node 0")
    p.add_argument("--threads-per-rank", type=int, help="torch threads per rank (default: cores / ranks per node)")


# ----------------------------------------------------------------- parsing

def parse_option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not OPTION_KEY.match(key):
        raise UsageError(f"--option must be KEY=VALUE, got {text!r}")
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            continue
    return key, raw


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UsageError(unknown_name_message(what, value, choices), what)
    return value


def resolve_workloads(args: argparse.Namespace) -> list:
    from workloads.resolve import resolve_workload

    overrides = {OVERRIDES[flag]: getattr(args, flag) for flag in OVERRIDES if getattr(args, flag) is not None}
    if args.capacity_factor is not None:
        overrides["capacity_factor"] = args.capacity_factor
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist or is not a file")
    names = [n.strip() for n in (args.workload or "").split(",") if n.strip()]
    if not names:
        names = ["custom"] if args.config else [DEFAULT_WORKLOAD]
    workloads = [resolve_workload(name, args.flavor, overrides, args.config) for name in names]
    if len({w.name for w in workloads}) != len(workloads):
        raise UsageError(f"workload given twice: {args.workload}")
    return workloads


def select_systems(requested: str | None) -> tuple[list[str], dict[str, str]]:
    """(systems to run, {system: why it cannot run here}) -- unknown names are a UsageError.

    Without --systems, the systems that cannot run here are left out (run() notes them); named ones
    stay in the list and are recorded as skipped with their reason."""
    import systems

    known = systems.system_names()
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        if not names:
            raise UsageError(f"--systems {requested!r} names no system; choose from {', '.join(known)}", "systems")
        for name in names:
            if name not in known:
                raise UsageError(unknown_name_message("system", name, known), "systems")
        if len(set(names)) != len(names):
            raise UsageError(f"system given twice: {requested}")
    else:
        names = known
    unavailable = {}
    for name in names:
        try:
            available = systems.availability(name)
            ok, reason = available.ok, available.reason
        except Exception as exc:  # noqa: BLE001 - a broken peer install is a reason, not a crash
            ok, reason = False, f"availability check failed: {type(exc).__name__}: {exc}"
        if not ok:
            unavailable[name] = reason
    if not requested:
        names = [n for n in names if n not in unavailable]
        if not names:
            raise UsageError("no system is available on this machine (see `moebench list`)")
    return names, unavailable


def _declared_options(name: str) -> dict:
    """The options system `name` declares; none when its class cannot even be loaded (it is then
    recorded as skipped with select_systems' reason)."""
    import systems

    try:
        return dict(systems.load_system_class(name).options)
    except Exception:  # noqa: BLE001 - a broken install or plugin is a reason already, not a crash
        return {}


def system_options(args: argparse.Namespace, names: list[str]) -> list[tuple[str, dict]]:
    """(system, options) entries to run: each selected system with the options addressed to it, then
    each --variant. An option no selected system declares, or one addressed to a system that does
    not declare it, is a usage error before anything runs (never a silently skipped system)."""
    import systems

    declared = {name: _declared_options(name) for name in names}
    per_system: dict[str, dict] = {name: {} for name in names}

    def require_declared(flag: str, name: str, key: str) -> None:
        if key not in declared[name]:
            close = closest_names(key, declared[name])
            hint = f"; did you mean {either(close)}?" if close else ""
            raise UsageError(f"{flag}: {name} has no option {key!r}{hint} "
                             f"(known: {', '.join(sorted(declared[name])) or 'none'})")

    for text in args.option:
        key, value = parse_option(text)
        target, dot, bare = key.partition(".")
        if dot and target in systems.system_names():
            if target not in names:
                raise UsageError(f"--option {text}: system {target} is not among the selected systems")
            require_declared(f"--option {text}", target, bare)
            per_system[target][bare] = value
            continue
        takers = [name for name in names if key in declared[name]]
        if not takers:
            close = closest_names(key, {option for options in declared.values() for option in options})
            hint = f"; did you mean {either(close)}?" if close else ""
            raise UsageError(f"--option {text}: no selected system declares option {key!r}{hint} "
                             f"(address one system with SYSTEM.{key}=VALUE; see `moebench list`)")
        for name in takers:
            per_system[name][key] = value
    entries = [(name, per_system[name]) for name in names]
    for text in args.variant:
        name, _, rest = text.partition(":")  # its form was checked in build_specs
        if name not in declared:
            raise UsageError(f"--variant {text}: system {name!r} is not among the selected systems")
        options = dict(per_system[name])
        for part in rest.split(","):
            key, value = parse_option(part)
            require_declared(f"--variant {text}", name, key)
            options[key] = value
        if (name, options) in entries:
            raise UsageError(f"--variant {text} repeats an entry that already runs")
        entries.append((name, options))
    return entries


def _trial_flags(args: argparse.Namespace) -> tuple[str, str, str]:
    """(level, mode, routing), checked with the other trial and method flags: all cheap, all before the
    workloads are resolved and the peers imported."""
    from core.values import DTYPES, MoEKnobs
    from harness.trial_spec import MODES
    from workloads.routing import ROUTINGS
    from workloads.spec import LEVELS

    level = _choice(args.level, LEVELS, "level")
    mode = _choice(args.mode or DEFAULT_MODE[level], MODES, "mode")
    routing = _choice(args.routing, ROUTINGS, "routing")
    if level == "model" and routing != "learned":
        raise UsageError(f"--routing {routing} applies at layer level only: the model level routes every MoE "
                         "layer with its learned gate (use --level layer, or leave --routing at learned)")
    _choice(args.dtype, tuple(DTYPES), "dtype")
    _choice(args.device, ("cpu", "cuda"), "device")
    MoEKnobs(dtype=args.dtype, device=args.device, seed=args.seed).validate()  # the seed's range
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is available here")
    _method_flags(args)
    return level, mode, routing


def _method_flags(args: argparse.Namespace) -> None:
    for name, minimum in (("repeats", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name} must be at least {minimum}, got {getattr(args, name)}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite positive number of seconds, got {args.timeout}")
    for text in args.option:
        parse_option(text)  # malformed options and variants are reported before the peers are imported
    for text in args.variant:
        name, colon, rest = text.partition(":")
        if not colon or not name or not rest:
            raise UsageError(f"--variant must be SYSTEM:KEY=VALUE[,KEY=VALUE...], got {text!r}")


def build_specs(args: argparse.Namespace) -> tuple[list, dict]:
    """Every trial of this run, validated; plus the reasons of systems that cannot run here."""
    from core.values import MoEKnobs, ParallelSpec
    from harness.launch import LaunchConfig
    from harness.trial_spec import TrialSpec
    from systems.plugins import references_for
    from workloads.routing import check_synthetic_fits

    level, mode, routing = _trial_flags(args)
    launch = LaunchConfig(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                          rdzv_endpoint=args.rdzv_endpoint, threads_per_rank=args.threads_per_rank)
    with input_errors():  # harness/launch.py says what is wrong with torchrun's flags as a ValueError
        launch.validate()
    parallel = ParallelSpec(world_size=launch.world_size, ep=args.ep, nnodes=args.nnodes,
                            threads_per_rank=args.threads_per_rank)
    parallel.validate()
    workloads = resolve_workloads(args)
    for workload in workloads:
        parallel.validate(workload.layer.num_experts)
        check_synthetic_fits(workload.layer, routing)  # before the peers are imported (spec.validate checks too)
    with input_errors("--system-plugin: "):  # their systems join the registry before --systems is read
        plugin_flag.register(args)
    names, unavailable = select_systems(args.systems)  # after the cheap checks: it imports the peer packages
    entries = system_options(args, names)
    specs = []
    for workload in workloads:
        for name, options in entries:
            knobs = MoEKnobs(capacity_factor=workload.capacity_factor, dtype=args.dtype, device=args.device,
                             seed=args.seed, options=dict(options))
            spec = TrialSpec(name, workload, level, mode, routing, knobs, parallel, warmup=args.warmup,
                             steps=args.steps, timeout_s=args.timeout, check=not args.no_check, malloc=args.malloc,
                             plugins=references_for(name))
            spec.validate()
            specs.append(spec)
    return specs, unavailable


# ----------------------------------------------------------------- running

def run(args: argparse.Namespace) -> int:
    from harness import journal as journals
    from harness import run_plan

    testbed = _predict_testbed(args)  # before anything runs: a bad testbed is a usage error
    if args.resume is not None:
        return _resume(args, testbed)
    specs, unavailable = build_specs(args)
    if not args.systems:
        for name, reason in unavailable.items():
            print(f"moebench run: note: {name} is not available here ({reason})", file=sys.stderr)
        unavailable = {}
    plan = run_plan.new_plan(specs, unavailable, repeats=args.repeats, order_seed=args.order_seed,
                             warmup=args.warmup, steps=args.steps, malloc=args.malloc, node_rank=args.node_rank,
                             rdzv_endpoint=args.rdzv_endpoint, command_line=["moebench", *sys.argv[1:]])
    journal = None
    if args.node_rank == 0:  # node 0 writes the results, so it keeps the journal
        journal = journals.create(journals.journal_path(args.out, plan["run_id"]), plan)
    return _report(run_plan.carry_out(plan, journal, args.out), testbed)


def _predict_testbed(args: argparse.Namespace):
    if getattr(args, "predict", None) is None:
        return None
    from harness.commands.predict import default_testbed
    from harness.perfmodel.testbed import load_testbed

    return load_testbed(default_testbed() if args.predict == "local" else args.predict)


# Flags --resume may come with: where the journal is, and which plugin files to load.
RESUME_FLAGS = ("resume", "out", "system_plugin", "predict")


def _resume(args: argparse.Namespace, testbed=None) -> int:
    from harness import run_plan, schema
    from systems.plugins import register_plugins

    given = [key for key in _given_flags(getattr(args, "given_argv", [])) if key not in RESUME_FLAGS]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"--resume runs with the settings the run started with; drop {flag}")
    journal = run_plan.open_for_resume(args.out, args.resume)
    for warning in journal.warnings:
        print(f"moebench run: warning: {warning}", file=sys.stderr)
    for spec in run_plan.specs_of(journal.plan):
        with input_errors("the run's plugin: "):  # plugin systems join the registry as in the first run
            register_plugins(spec.plugins)
    kept = len(journal.rounds)
    journal.note("resumed", utc=schema.utc_stamp(), rounds_kept=kept)
    print(f"moebench run: resuming {journal.run_id}: {kept} finished rounds kept", file=sys.stderr)
    return _report(run_plan.carry_out(journal.plan, journal, journal.path.parent), testbed)


def _given_flags(argv: list[str]) -> list[str]:
    """The destinations of the flags actually typed (a default typed out counts as given)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return list(vars(parser.parse_args(argv)))


def _report(outcome, testbed=None) -> int:
    from harness import runner

    if outcome.results_path is not None and testbed is not None:
        covered = add_predictions(outcome.results_path, testbed)
        print(f"moebench run: predicted {covered} trial(s) on testbed {testbed.name}", file=sys.stderr)
    if outcome.results_path is not None:
        print(runner.format_table(outcome.trials))
        print(f"results: {outcome.results_path}")
    return outcome.exit_code


def add_predictions(results_path, testbed) -> int:
    """Write the model's prediction into each trial of a results file it covers (atomically); how many."""
    import json

    from harness.files import write_json_atomic
    from harness.perfmodel.trials import prediction_for_record

    doc = json.loads(Path(results_path).read_text())
    covered = 0
    for trial in doc["trials"]:
        trial["prediction"] = prediction_for_record(trial, testbed)
        covered += trial["prediction"] is not None
    write_json_atomic(doc, results_path)
    return covered
