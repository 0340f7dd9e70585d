"""Errors the CLI turns into one clear line and exit code 2 (harness/cli.py).

UsageError is an InputError (core/errors.py): bad input from the user. Any
other exception escaping a command is a bug in moebench and is shown as one.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from core.errors import InputError


class UsageError(InputError):
    """Bad input from the user (unknown name, invalid size, unreadable file)."""


@contextlib.contextmanager
def input_errors(prefix: str = "") -> Iterator[None]:
    """Around a call into code we do not own that signals bad input with ValueError (plugin
    references, torchrun's flags, checkpoint files): at that call, a ValueError is the user's input.
    Use it around that one call only, so a ValueError from anywhere else stays a bug."""
    try:
        yield
    except InputError:
        raise
    except ValueError as exc:
        raise UsageError(f"{prefix}{exc}") from exc
