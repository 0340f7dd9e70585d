"""Line numbers for TOML errors (core.toml_lines): tomllib reports none for keys.

A bad value in a file should be reported as ``file:line: ...``. tomllib gives
a position only for syntax errors (in its message), and none for the keys of
the dict it returns, so the line of a key is found in the text: the first
``key = ...`` (bare or quoted) inside the right table. Good enough for the
files people write by hand; when a key cannot be found the caller names the
file without a line.
"""
from __future__ import annotations

import re
import tomllib

HEADER = re.compile(r"^\s*\[")
SYNTAX_POSITION = re.compile(r"at line (\d+), column \d+")


def read_utf8(path, what: str, error: type[Exception]) -> str:
    """The text of a hand-written file; unreadable or not UTF-8 is one `error` line naming `what` and path."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"cannot read {what} {path}: {reason}") from None


def line_of_key(lines: list[str], key: str, start: int = 0, end: int | None = None) -> int | None:
    """1-based line of ``key = ...`` within lines[start:end] (0-based, end exclusive); None when absent."""
    pattern = re.compile(rf"^\s*([\"']?){re.escape(key)}\1\s*=")
    for i in range(max(start, 0), min(len(lines) if end is None else end, len(lines))):
        if pattern.match(lines[i]):
            return i + 1
    return None


def table_span(lines: list[str], table: str | None) -> tuple[int, int] | None:
    """0-based [start, end) of the lines of ``[table]`` (its header included); None: the top level."""
    headers = [i for i, line in enumerate(lines) if HEADER.match(line)]
    if table is None:
        return 0, headers[0] if headers else len(lines)
    wanted = _header_pattern(table)
    for n, i in enumerate(headers):
        if wanted.match(lines[i]):
            return i, headers[n + 1] if n + 1 < len(headers) else len(lines)
    return None


def _header_pattern(table: str) -> re.Pattern:
    """``[table]`` or ``[[table]]``, bare or quoted."""
    return re.compile(rf"^\s*\[\[?\s*([\"']?){re.escape(table)}\1\s*\]")


def key_line(lines: list[str], key: str, table: str | None = None) -> int | None:
    """1-based line where `key` of `[table]` (None: the top level) is set, also as a dotted
    ``table.key`` at the top level; None when the text does not set it."""
    span = table_span(lines, table)
    found = line_of_key(lines, key, *span) if span else None
    if found is None and table is not None:
        found = line_of_key(lines, f"{table}.{key}", *table_span(lines, None))
    if found is None:  # a table where a value belongs: [key] or [table.key]
        found = header_line(lines, f"{table}.{key}" if table else key)
    return found


def header_line(lines: list[str], table: str) -> int | None:
    """1-based line of the ``[table]`` (or ``[[table]]``) header; None when there is none."""
    span = table_span(lines, table)
    return span[0] + 1 if span else None


def top_level_line(lines: list[str], name: str) -> int | None:
    """1-based line that introduces top-level `name`: ``name = ...`` before any table, or its header."""
    return line_of_key(lines, name, *table_span(lines, None)) or header_line(lines, name)


def syntax_error_text(error: ValueError) -> str:
    """What tomllib.loads refused: its own message, or, for the plain ValueError it lets through from
    int() (a number past Python's digit limit), words a user can act on."""
    if isinstance(error, tomllib.TOMLDecodeError):
        return str(error)
    return f"a number has too many digits to read ({str(error).split(':')[0]})"


def syntax_error_line(error: Exception) -> int | None:
    """The line a tomllib.TOMLDecodeError points at (it is in the message on Python 3.11)."""
    lineno = getattr(error, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    match = SYNTAX_POSITION.search(str(error))
    return int(match.group(1)) if match else None
