"""The one exception type that means "the user's input is wrong" (core.errors).

The CLI prints an InputError as one line and exits 2; anything else escaping a
command is a bug in moebench and is shown as one (traceback, exit 1). So code
that validates what a user typed or wrote raises InputError, and nothing else
may: a plain ValueError deep inside is a bug, not bad input.
"""
from __future__ import annotations

# What str.splitlines() breaks at, written as escapes: a message quoting a user's key or path stays one line.
LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class InputError(ValueError):
    """The user's input is wrong; the message is one line naming the problem.

    ``field`` names the offending value in the value types' vocabulary
    ("top_k", "capacity_factor", "flavor", ...) when there is one, so a file
    reader can point at the line that set it. Line breaks in the message
    (from a quoted key, a path) are written as escapes.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(str(message).translate(LINE_BREAKS))
        self.field = field
