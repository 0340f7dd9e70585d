"""The run journal: every finished round on disk the moment it finishes, so nothing is lost.

A run writes ``OUT/RUN_ID.journal.jsonl`` beside its results file. The
first line is the plan (every trial spec, the round orders, the method
settings, the systems that could not run); each later line is one finished
round. A line is written, flushed and fsynced before the next round starts,
so a crash, a kill or a validation failure at the end loses at most the
round that was running. The results document is assembled from the journal
(harness/runner.py), and `moebench run --resume RUN_ID` runs only the rounds
it lacks. Once the results file is written and valid, the journal is removed.

A reader tolerates a torn last line (the writer was killed mid-write): it is
dropped with a warning, and the next append cuts it off.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UsageError

FORMAT = "moebench.run-journal"
VERSION = 1
SUFFIX = ".journal.jsonl"


def journal_path(out_dir, run_id: str) -> Path:
    return Path(out_dir) / f"{run_id}{SUFFIX}"


@dataclass
class Journal:
    """One run's plan and the rounds finished so far (in the order they finished)."""

    path: Path
    plan: dict
    rounds: list[dict] = field(default_factory=list)  # {"trial": i, "round": r, "result": {...}}
    events: list[dict] = field(default_factory=list)  # {"event": "resumed", "utc": ..., "rounds_kept": k}
    warnings: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.plan["run_id"]

    def done(self) -> set[tuple[int, int]]:
        """(trial index, round index) of every finished round."""
        return {(entry["trial"], entry["round"]) for entry in self.rounds}

    def append(self, trial: int, round_index: int, result: dict) -> None:
        """Record one finished round durably before the run moves on."""
        entry = {"trial": trial, "round": round_index, "result": result}
        _append_line(self.path, json.dumps(entry))
        self.rounds.append(entry)

    def note(self, event: str, **details) -> None:
        """Record something that happened to the run itself (a resume), for the results' method."""
        entry = {"event": event, **details}
        _append_line(self.path, json.dumps(entry))
        self.events.append(entry)


def create(path, plan: dict) -> Journal:
    """A new journal holding only the plan; refuses to overwrite an existing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "version": VERSION, **plan}
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        raise UsageError(f"journal {path} exists already (resume it with --resume {plan['run_id']})") from None
    return Journal(path, header)


def read(path) -> Journal:
    """The journal at `path`; a missing, foreign or unreadable plan is one UsageError line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise UsageError(f"no run journal at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read run journal {path}: {exc}") from None
    plan = _decode(lines[0]) if lines else None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise UsageError(f"{path} is not a moebench run journal (its first line is not a run plan)")
    if plan.get("version") != VERSION:
        raise UsageError(f"{path}: journal version {plan.get('version')!r} is not one this harness reads ({VERSION})")
    journal = Journal(path, plan)
    body = lines[1:]
    for number, line in enumerate(body, start=2):
        if not line.strip():
            continue
        entry = _decode(line)
        if isinstance(entry, dict) and isinstance(entry.get("event"), str):
            journal.events.append(entry)
            continue
        if not _is_round(entry):
            last = all(not rest.strip() for rest in body[number - 1:])
            what = "a torn last line (the run was killed while writing it)" if last else "an unreadable line"
            journal.warnings.append(f"{path}:{number}: dropped {what}")
            continue
        journal.rounds.append(entry)
    return journal


def remove(journal: Journal) -> None:
    journal.path.unlink(missing_ok=True)


def _decode(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _is_round(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("trial"), int) and isinstance(entry.get("round"), int)
            and isinstance(entry.get("result"), dict))


def _append_line(path: Path, line: str) -> None:
    """Append one line and fsync. A torn last line (a killed writer's) is cut off first: it was
    never a finished round, and the file goes on reading cleanly."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
                f.seek(0, os.SEEK_END)
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())
