"""The one way the harness writes a JSON file that others read (atomically), and reads one back.

Results files, trial results and check reports are read by other processes
(the runner, `report`, CI); a reader must see the old file or the complete
new one, never a half-written file, even if the writer is killed mid-way.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.files import write_text_atomic
from harness.errors import UsageError

__all__ = ["write_json_atomic", "write_text_atomic", "read_json", "describe_json_error"]


def write_json_atomic(data, path, indent: int | None = 1) -> Path:
    """Serialise `data`, then write it atomically (write_text_atomic).

    Serialising first means a value json cannot encode fails before any file exists."""
    return write_text_atomic(json.dumps(data, indent=indent) + "\n", path)


def read_json(path, what: str = "file"):
    """The JSON value in `path`; a missing, unreadable or malformed file is one UsageError line
    naming it (`what` says which kind of file the command expected)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is {describe_json_error(exc, text)}") from None


def describe_json_error(exc: json.JSONDecodeError, text: str) -> str:
    """"not valid JSON (where: what)", saying "truncated" when the text stops mid-value: a writer
    killed mid-way, not a hand-edit gone wrong."""
    place = f"line {exc.lineno}, column {exc.colno}"
    # Some messages end in "at" ("Unterminated string starting at") and read on into the place.
    where = f"{exc.msg} {place}" if exc.msg.endswith(" at") else f"{place}: {exc.msg}"
    cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
    return f"not valid JSON ({where}){'; the text stops mid-document, so it looks truncated' if cut else ''}"
