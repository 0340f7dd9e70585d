"""One wording for "unknown NAME", with the closest valid names first (core.names).

A typo should cost one glance: ``unknown system 'tutle_native'; did you mean
tutel_native? (choose from ...)``. difflib's ratio is good at transposed and
dropped letters, which are the typos people make in names like these.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

CUTOFF = 0.6  # difflib's default: 'tutle_native' ~ 'tutel_native', 'gpt5' !~ 'mixtral-8x7b'
MAX_SUGGESTIONS = 3


def closest_names(given: object, choices: Iterable[object]) -> list[str]:
    """The valid names nearest to `given`, best first (case-insensitive: 'Layer' suggests layer)."""
    by_folded: dict[str, str] = {}
    for choice in map(str, choices):
        by_folded.setdefault(choice.casefold(), choice)
    folded = difflib.get_close_matches(str(given).casefold(), list(by_folded), n=MAX_SUGGESTIONS, cutoff=CUTOFF)
    return [by_folded[name] for name in folded]


def either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def unknown_name_message(kind: str, given: object, choices: Iterable[object]) -> str:
    """``unknown KIND 'given'; did you mean X? (choose from a, b)`` or, with nothing close, the list alone."""
    choices = [str(c) for c in choices]
    listing = ", ".join(choices) or "(none)"
    close = closest_names(given, choices)
    if close:
        return f"unknown {kind} {given!r}; did you mean {either(close)}? (choose from {listing})"
    return f"unknown {kind} {given!r}; choose from {listing}"
