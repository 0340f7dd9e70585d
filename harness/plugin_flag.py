"""The ``--system-plugin REF`` flag every command that names systems shares (run, check, list, gate).

A REF is ``package.module:ClassName``, ``path/to/file.py`` or ``path/to/file.py:ClassName``
(systems/plugins.py); the flag is repeatable. A bad reference raises a ValueError whose message
is one line, which the CLI prints with exit code 2."""
from __future__ import annotations

import argparse

HELP = ("your own MoE system, as package.module:ClassName, path/to/file.py or path/to/file.py:ClassName "
        "(repeatable; a MoESystem subclass, see the README's 'Your own system as a plugin')")


def add_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--system-plugin", action="append", default=[], metavar="REF", dest="system_plugin",
                        help=HELP)


def register(args: argparse.Namespace, base_dir=None) -> list[str]:
    """Register the command's --system-plugin references; returns their system names."""
    from systems.plugins import register_plugins

    return register_plugins(getattr(args, "system_plugin", None) or [], base_dir=base_dir)
