"""How a gate's verdicts are shown: one line per item on the terminal, a Markdown summary for CI."""
from __future__ import annotations

from harness.gate_verdict import FAIL, INCONCLUSIVE
from harness.tables import markdown_table

METHOD = (
    "Each item is measured in two blocks of fresh worker processes; a round is a randomised ABBA quartet "
    "of measurements (median of the timed steps) inside one block, and rounds alternate between blocks. "
    "Ratio = candidate / baseline time (above 1: slower): geometric mean of per-round ratios, with a "
    "bootstrap interval over rounds. FAIL needs the ratio to reach the fail threshold (the larger of the "
    "threshold and 3x the round-to-round noise), the interval's lower end above 1 in both blocks and pooled, "
    "and a Holm-corrected one-sided p-value below 1 - confidence; PASS needs the upper end below the "
    "threshold. Any change in the work channel (routing, checksums, FLOPs, all-to-all bytes, peak memory) "
    "FAILs whatever the timing."
)


def _interval(verdict) -> tuple[str, str, str]:
    ev = verdict.evidence
    if ev is None or ev.pooled.ratio is None:
        return "-", "-", "-"
    pooled = ev.pooled
    interval = pooled.interval_text(3)
    noise = "-" if pooled.noise is None else f"{pooled.noise:.1%}"
    return f"{pooled.ratio:.3f}", interval, noise


def _contention(run) -> str:
    def one(record):
        pressure = record.get("cpu_pressure_avg10")
        text = f"load {record.get('load_1m', float('nan')):.2f}"
        return text + (f", cpu pressure {pressure:.1f}%" if pressure is not None else "")

    if not run.contention_before:
        return ""
    return f"{one(run.contention_before)} -> {one(run.contention_after or run.contention_before)}"


def rows(verdicts, runs) -> list[list[str]]:
    out = []
    for verdict, run in zip(verdicts, runs, strict=True):
        ratio, interval, noise = _interval(verdict)
        fail_at = "-" if verdict.fail_threshold is None else f"{verdict.fail_threshold:.1%}"
        p = "-" if verdict.p_holm is None else f"{verdict.p_holm:.2g}"
        out.append([item_key_of(verdict), verdict.verdict, ratio, interval, noise, f"{verdict.threshold:.0%}",
                    fail_at, p, str(len(run.rounds) // 2), f"{run.wall_s:.0f}", _contention(run)])
    return out


def item_key_of(verdict) -> str:
    return f"{verdict.benchmark}/{verdict.system}"


HEADER = ["item", "verdict", "ratio", "interval", "noise", "threshold", "fail at", "p (Holm)", "rounds/block",
          "wall s", "contention (before -> after)"]


def lines(verdicts, runs) -> list[str]:
    """One line per item, then the reason of every item that did not pass."""
    out = []
    for row, verdict in zip(rows(verdicts, runs), verdicts, strict=True):
        item, word, ratio, interval, noise, threshold, fail_at, p, rounds, wall, load = row
        out.append(f"{word:<12} {item}: ratio {ratio} {interval}, noise {noise}, threshold {threshold} "
                   f"(fail at {fail_at}), p {p}, {rounds} rounds/block, {wall} s | {load}")
        if verdict.verdict != "PASS":
            out.append(f"             {verdict.reason}")
        for problem in verdict.work_problems:
            out.append(f"             work: {problem}")
    return out


def markdown(verdicts, runs, title: str, baseline_text: str, exit_code: int, notes: list[str]) -> str:
    counts = {word: sum(v.verdict == word for v in verdicts) for word in ("PASS", FAIL, INCONCLUSIVE)}
    head = f"## moebench gate: {title}\n\nBaseline: {baseline_text}. " + ", ".join(
        f"{n} {word}" for word, n in counts.items() if n) + f"; exit code {exit_code}.\n"
    details = []
    for verdict in verdicts:
        if verdict.verdict != "PASS":
            details.append(f"- **{item_key_of(verdict)}** {verdict.verdict}: {verdict.reason}")
            details.extend(f"  - {problem}" for problem in verdict.work_problems)
    body = [head, markdown_table(HEADER, rows(verdicts, runs)), ""]
    if details:
        body += ["", *details, ""]
    body += [f"_Method:_ {METHOD}", *(f"\n{n}" for n in notes)]
    return "\n".join(body) + "\n"

