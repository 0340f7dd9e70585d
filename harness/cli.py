"""`python -m harness` (what ./moebench forwards to).

Each subcommand lives in its own module under harness/commands/ and defines
NAME, HELP, ``add_arguments(parser)`` and ``run(args) -> int``. Bad input
raises InputError (core/errors.py; UsageError is one) and becomes one line on
stderr, exit 2. Anything else escaping a command is a bug in moebench, and is
shown as one: the traceback, then one line saying so, exit 1. A bug must never
look like a typo of the user's.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

import harness.commands
from core.errors import InputError

EXIT_INTERNAL_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


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
        args.given_argv = list(argv[1:])  # what was typed, for commands that must know which flags were given
    if args.command is None:
        parser.print_help()
        return 2
    command = handlers[args.command]
    try:
        return int(command.run(args) or 0)
    except InputError as exc:
        print(f"moebench {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("moebench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place that catches everything: to say it is a bug
        traceback.print_exc()
        print(f"moebench {args.command}: internal error (a bug in moebench, not in your input): "
              f"{type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a message from code we do not own may span several)."""
    parts = [part.strip() for part in str(exc).splitlines() if part.strip()]
    return " | ".join(parts) or type(exc).__name__
