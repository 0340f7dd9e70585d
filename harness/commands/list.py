"""`moebench list`: which systems can run here (and why not), and the workloads with their key dimensions."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from harness import plugin_flag
from harness.errors import input_errors

NAME = "list"
HELP = "list systems (available here or not, and why) and workloads with their flavours and dimensions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    plugin_flag.add_argument(parser)


def system_rows() -> list[dict]:
    """One row per registered system; a system whose adapter cannot even be imported is 'no', with the reason.
    "source" says where it comes from: built-in, a plugin reference, or an installed entry point."""
    import systems
    from systems.plugins import source_of

    rows = []
    for name in systems.system_names():
        try:
            available = systems.availability(name)
            ok, reason = available.ok, available.reason
        except Exception as exc:  # a peer package can fail at import in many ways; report it, never crash
            ok, reason = False, f"availability check failed: {type(exc).__name__}: {exc}"
        try:
            cls = systems.load_system_class(name)
            description, options = cls.description, dict(cls.options)
        except Exception:  # already explained in the reason above
            description, options = "", {}
        rows.append({"name": name, "available": ok, "reason": reason, "description": description,
                     "options": options, "source": source_of(name)})
    return rows


def workload_rows() -> list[dict]:
    from workloads.flavors import get_workload, workload_names
    from workloads.spec import FLAVORS

    rows = []
    for name in workload_names():
        for flavor in FLAVORS:
            wl = get_workload(name, flavor)
            layer, model = wl.layer, wl.model
            rows.append({
                "workload": name, "flavor": flavor, "M": layer.model_dim, "H": layer.ffn_dim,
                "E": layer.num_experts, "k": layer.top_k, "activation": layer.activation,
                "tokens_per_step": wl.tokens_per_step, "batch_size": wl.batch_size, "seq_len": wl.seq_len,
                "layers": model.n_layers, "moe_layers": model.n_layers // model.moe_every,
                "heads": model.n_heads, "kv_heads": model.n_kv_heads, "vocab": model.vocab_size,
                "capacity_factor": wl.capacity_factor,
            })
    return rows


def _text_table(rows: list[dict], columns: list[str]) -> str:
    from harness.tables import text_table

    return text_table(columns, [["yes" if v is True else "no" if v is False else v for v in (r[c] for c in columns)]
                                for r in rows])


def run(args: argparse.Namespace) -> int:
    from systems.plugins import ignored_entry_points

    # Peer packages log to stdout while importing (deepspeed's accelerator notice); keep stdout for our output.
    with contextlib.redirect_stdout(sys.stderr):
        with input_errors("--system-plugin: "):
            plugin_flag.register(args)
        system_info = system_rows()
    ignored = ignored_entry_points()
    workload_info = workload_rows()
    if args.json:
        print(json.dumps({"systems": system_info, "workloads": workload_info, "ignored_entry_points": ignored},
                         indent=1))
        return 0
    print("Systems")
    print(_text_table(system_info, ["name", "available", "reason", "description", "source"]))
    for why in ignored.values():
        print(f"ignored: {why}")
    print()
    print("System options (--option SYSTEM.KEY=VALUE for one system, --option KEY=VALUE for every system that "
          "declares KEY, --variant SYSTEM:KEY=VALUE[,...] for an extra labelled entry)")
    option_rows = [{"system": r["name"], "option": key, "meaning": meaning}
                   for r in system_info for key, meaning in r["options"].items()]
    print(_text_table(option_rows, ["system", "option", "meaning"]))
    print()
    print("Workloads (M model dim, H expert hidden, E experts, k top-k; tokens per rank per step)")
    print(_text_table(workload_info, ["workload", "flavor", "M", "H", "E", "k", "activation", "tokens_per_step",
                                      "layers", "moe_layers", "capacity_factor"]))
    return 0
