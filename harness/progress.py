"""What a person watching a run sees: rounds done, the current trial, time spent and time left.

On a terminal it is a live bar (tqdm) with the current trial beside it and
each finished round printed above it; anywhere else (CI logs, a file, a
pipe) it is one plain line per finished round, as a log should be. Both
give the same estimate of the time left: each remaining round is expected
to take as long as that trial's own earlier rounds, or, before a trial has
run once, as long as the average round so far.
"""
from __future__ import annotations

import statistics
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class RunProgress:
    """Progress of one run over `total` rounds, `done` of which finished before (a resumed run)."""

    def __init__(self, total: int, stream: TextIO, done: int = 0, live: bool | None = None):
        self.total, self.done, self.stream = total, done, stream
        self.started = time.monotonic()
        self.walls: dict[int, list[float]] = {}  # trial -> wall seconds of its finished rounds
        self.remaining: dict[int, int] = {}  # trial -> rounds still planned
        is_tty = getattr(stream, "isatty", None)
        self.live = bool(is_tty and is_tty()) if live is None else live
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, file=stream, unit="round", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rounds {postfix}")

    def plan(self, remaining: dict[int, int]) -> None:
        """How many rounds each trial still has to run (updated as trials stop early)."""
        self.remaining = dict(remaining)
        self._refresh("")

    def starting(self, label: str) -> None:
        self._refresh(label)

    def finished(self, trial: int, label: str, outcome: str, wall_s: float) -> None:
        self.done += 1
        self.walls.setdefault(trial, []).append(wall_s)
        self.remaining[trial] = max(0, self.remaining.get(trial, 1) - 1)
        line = f"[{self.done}/{self.total}] {label} ... {outcome}  ({self.timing()})"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self.bar.update(1)
        else:
            print(line, file=self.stream, flush=True)

    def stopped_early(self, trial: int) -> None:
        """A trial that failed runs no more rounds: they leave the total and the estimate."""
        dropped = self.remaining.pop(trial, 0)
        self.total -= dropped
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def estimate_left_s(self) -> float | None:
        walls = [w for per_trial in self.walls.values() for w in per_trial]
        if not walls:
            return None
        typical = statistics.fmean(walls)
        return sum(n * (statistics.fmean(self.walls[t]) if t in self.walls else typical)
                   for t, n in self.remaining.items())

    def timing(self) -> str:
        left = self.estimate_left_s()
        elapsed = format_duration(time.monotonic() - self.started)
        return f"elapsed {elapsed}" + ("" if left is None else f", about {format_duration(left)} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _refresh(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}  {self.timing()}".strip())
