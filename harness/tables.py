"""The one table formatter: plain-text (terminal) and Markdown tables from rows of cells.

Every table the harness prints or writes goes through here, so column
alignment and separators look the same in `run`, `check`, `list`, `comm`
and the reports.
"""
from __future__ import annotations

from collections.abc import Sequence


def _cells(header: Sequence, rows: Sequence[Sequence]) -> tuple[list[str], list[list[str]], list[int]]:
    head = [str(h) for h in header]
    body = [[str(c) for c in row] for row in rows]
    for i, row in enumerate(body):
        if len(row) != len(head):
            raise ValueError(f"row {i} has {len(row)} cells, the header has {len(head)}")
    widths = [max([len(h), *(len(r[c]) for r in body)]) for c, h in enumerate(head)]
    return head, body, widths


def text_table(header: Sequence, rows: Sequence[Sequence], rule: bool = True) -> str:
    """Columns padded to their widest cell, two spaces apart, a dashed rule under the header."""
    head, body, widths = _cells(header, rows)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(head)]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + [line(r) for r in body])


def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured Markdown table, cells padded so the source reads as a table too."""
    head, body, widths = _cells(header, rows)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
