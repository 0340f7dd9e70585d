"""`python -m harness` (what ./moebench forwards to).

Each subcommand lives in its own module under harness/commands/ and defines
NAME, HELP, ``add_arguments(parser)`` and ``run(args) -> int``. Bad input
raises UsageError (or ValueError) and becomes one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import harness.commands
from harness.errors import UsageError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(harness.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"harness.commands.{info.name}")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (and `--help` for more)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = OneLineErrorParser(
        prog="moebench",
        description="Benchmark and compare Mixture-of-Experts training systems on identical work.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        handlers[module.NAME] = module
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    passthrough = bool(argv) and getattr(handlers.get(argv[0]), "PASSES_EXTRA_ARGS", False)
    if passthrough and not {"-h", "--help"} & set(argv[1:2]):
        # Everything after the command goes to the tool it wraps, verbatim and in order.
        args = argparse.Namespace(command=argv[0], extra_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = handlers[args.command]
    try:
        return int(command.run(args) or 0)
    except (UsageError, ValueError) as exc:
        print(f"moebench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moebench: interrupted", file=sys.stderr)
        return 130
