"""Turn results files into the comparison tables (Markdown + CSV) and a bar chart.

Why this shape: a reader compares systems side by side on identical work, so
rows are the work (workload, flavour, level, mode, routing, parallel layout,
dtype, capacity factor) and columns are systems. Every table carries what is
needed to judge it: the machine, the code commit, the date, the timing method
and the exact command that produced the numbers. A system whose output failed
the equivalence check does not get a speedup unless asked for explicitly.
"""
from __future__ import annotations

import json
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness import schema, stats
from harness.convert import PYTEST_BENCHMARK, detect_format
from harness.errors import UsageError
from harness.files import describe_json_error
from harness.identity import differences, system_label, work_identity, work_key, workload_label
from harness.tables import markdown_table

KEY_COLUMNS = ["workload", "flavor", "level", "mode", "routing", "ws", "ep", "dtype", "cf"]
ROW_KEY = [*KEY_COLUMNS, "work"]  # the work key separates rows whose visible columns agree but whose work differs
DEFAULT_BASELINES = ("tutel_native", "torch_reference")
CHECK_FAILED_MARK = "†"
CROSS_RUN_MARK = "‡"
MISSING = "—"
LOG_SCALE_RANGE = 30  # use a log y-axis when the slowest bar is this many times the fastest


@dataclass
class ReportOptions:
    paths: list[str] = field(default_factory=lambda: ["results"])
    baseline: str | None = None
    out_dir: str = "reports"
    include_unchecked: bool = False
    title: str = "moebench"
    command_line: list[str] = field(default_factory=list)  # the report command itself, for the footer


@dataclass
class Report:
    iteration_markdown: str
    speedup_markdown: str
    written: list[Path]
    baseline: str | None
    skipped: list[Skipped] = field(default_factory=list)


# ---------------------------------------------------------------- loading

def find_result_files(paths: list[str]) -> list[Path]:
    """Results files named directly, plus every *.json under named directories."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.json") if p.is_file())
            if not found:
                raise UsageError(f"no results files (*.json) found under {path}/")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"no results found: {path} does not exist")
    if not files:
        raise UsageError("no results files given")
    return list(dict.fromkeys(files))


@dataclass(frozen=True)
class Skipped:
    """A results file the report left out, and why: one bad file must not cost the tables of the rest.

    `reason` reads after "PATH is" ("not valid JSON (...)", "empty", ...)."""
    path: Path
    reason: str

    def warning(self) -> str:
        return f"moebench report: warning: skipping {self.path}: {self.reason}"

    def sentence(self) -> str:
        return f"{self.path} is {self.reason}"


class _Unusable(Exception):
    """A results file the report cannot use; the message is the Skipped reason."""


def load_results(files: list[Path]) -> tuple[list[dict], list[Skipped]]:
    """The valid results documents among `files`, and the files left out with their reasons."""
    docs: list[dict] = []
    skipped: list[Skipped] = []
    for path in files:
        try:
            docs.append(_read_results(path))
        except _Unusable as exc:
            skipped.append(Skipped(path, str(exc)))
    return docs, skipped


def _read_results(path: Path) -> dict:
    data = _read_json(path)
    _check_ours(data)
    try:
        schema.validate(data)
    except schema.NewerVersionError as exc:
        raise _Unusable(f"from a newer moebench ({exc})") from None
    except schema.SchemaError as exc:
        raise _Unusable(f"not a valid moebench results file: {exc}") from None
    return data


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _Unusable(f"unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise _Unusable("not text (not UTF-8), so not a results file") from None
    if not text.strip():
        raise _Unusable("empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Unusable(describe_json_error(exc, text)) from None


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _check_ours(data) -> None:
    """Other JSON (pytest-benchmark output, a gate report) is not ours: say what it is, not which key it lacks."""
    if not isinstance(data, dict):
        raise _Unusable(f"not a moebench results file (it holds a JSON {_JSON_KINDS.get(type(data), 'value')}, "
                        "not an object)")
    if data.get("schema") == schema.SCHEMA_NAME:
        return
    if detect_format(data) == PYTEST_BENCHMARK:
        raise _Unusable("a pytest-benchmark file, not moebench results (`moebench convert` turns it into one)")
    raise _Unusable(f"not a moebench results file (no \"schema\": \"{schema.SCHEMA_NAME}\")")


def _nothing_usable(skipped: list[Skipped]) -> UsageError:
    """One line however many files were left out: the first few reasons, then a count."""
    if len(skipped) == 1:
        return UsageError(skipped[0].sentence())
    shown = "; ".join(s.sentence() for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return UsageError(f"none of the {len(skipped)} results files is usable: {shown}{more}")


def _format_cf(knobs: dict) -> str:
    cf = (knobs or {}).get("capacity_factor")
    return "dropless" if cf is None else f"{cf:g}"


def _median_calibration_ms(rounds: list[dict]) -> float | None:
    """Median calibration matmul time before the trial's rounds: a machine-speed check for the reader."""
    values = [r["calibration_before_s"] for r in rounds if r.get("calibration_before_s") is not None]
    return None if not values else stats.summarize(values)["median"] * 1000.0


def _trial_row(doc: dict, trial: dict) -> dict:
    summary = trial.get("summary") or {}
    check = trial.get("check")
    throughput = trial.get("throughput") or {}
    to_ms = 1000.0
    return {
        "run_id": doc["run_id"], "created_utc": doc["created_utc"], "id": trial["id"],
        "system": system_label(trial), "work": trial.get("work_key") or work_key(trial),
        "identity": work_identity(trial), "rounds": list(trial.get("rounds") or []),
        "workload": workload_label(trial, with_flavor=False), "flavor": trial["flavor"], "level": trial["level"],
        "mode": trial["mode"],
        "routing": trial["routing"], "ws": trial["parallel"]["world_size"], "ep": trial["parallel"]["ep"],
        "dtype": trial["dtype"], "cf": _format_cf(trial.get("knobs")), "status": trial["status"],
        "message": trial["message"],
        "n": summary.get("n"),
        "median_ms": summary["median"] * to_ms if summary else None,
        "q1_ms": summary["q1"] * to_ms if summary else None,
        "q3_ms": summary["q3"] * to_ms if summary else None,
        "iqr_ms": summary["iqr"] * to_ms if summary else None,
        "exposed_ms": statistics.median(trial["exposed_comm_s"]) * to_ms if trial.get("exposed_comm_s") else None,
        **_prediction_columns(trial.get("prediction"), summary),
        "outliers": (summary["outliers_low"] + summary["outliers_high"]) if summary else None,
        "check_passed": None if check is None else bool(check["passed"]),
        "calibration_ms": _median_calibration_ms(trial.get("rounds") or []),
        "tokens_per_s": throughput.get("tokens_per_s"),
        "useful_tflops": throughput.get("useful_tflops"),
        "executed_tflops": throughput.get("executed_tflops"),
        "samples_s": list(trial["samples_s"]),
    }


def _prediction_columns(prediction: dict | None, summary: dict | None) -> dict:
    """The model's step time (`run --predict`) and its signed error against the measured median."""
    if not prediction:
        return {"predicted_ms": None, "prediction_error": None, "testbed": None}
    measured = summary["median"] if summary else None
    return {"predicted_ms": prediction["step_s"] * 1000.0, "testbed": prediction["testbed"],
            "prediction_error": prediction["step_s"] / measured - 1 if measured else None}


def trials_frame(docs: list[dict]):
    """All trials as one pandas frame. A trial id hashes the trial's whole identity (harness/identity.py),
    so only the *same* experiment repeated in a newer run supersedes an older one; different work
    never merges.

    Returns (frame, number of superseded trials).
    """
    import pandas as pd

    # Collective micro-benchmarks (level "comm") calibrate the performance model; they are not iterations.
    rows = [_trial_row(doc, trial) for doc in docs for trial in doc["trials"] if trial["level"] != "comm"]
    if not rows:
        raise UsageError("the results files contain no trials")
    frame = pd.DataFrame(rows).sort_values(["created_utc", "run_id"], kind="stable")
    newest = frame.drop_duplicates(subset="id", keep="last")
    return newest.reset_index(drop=True), len(frame) - len(newest)


# ---------------------------------------------------------------- tables

def format_ms(value: float, like: float | None = None) -> str:
    """About three significant figures, chosen from `like` (the median) so a cell's two numbers align."""
    ref = abs(like if like is not None else value)
    decimals = 0 if ref >= 100 else 1 if ref >= 10 else 2 if ref >= 1 else 3
    return f"{value:.{decimals}f}"


def _system_order(frame, baseline: str | None) -> list[str]:
    systems = sorted(frame["system"].unique())
    if baseline in systems:
        systems.remove(baseline)
        systems.insert(0, baseline)
    return systems


def _row_keys(frame) -> list[tuple]:
    def natural(key: tuple) -> tuple:  # numbers by value (ws 2 before ws 16), words alphabetically
        return tuple((0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in key)

    return sorted({tuple(r) for r in frame[ROW_KEY].itertuples(index=False)}, key=natural)


def _by_key(frame) -> dict[tuple, dict[str, dict]]:
    table: dict[tuple, dict[str, dict]] = {}
    for record in frame.to_dict("records"):
        table.setdefault(tuple(record[c] for c in ROW_KEY), {})[record["system"]] = record
    return table


def _ambiguous(frame) -> set[tuple]:
    """Visible keys (KEY_COLUMNS) shared by rows of different work: those rows name their work key."""
    counts: dict[tuple, set] = {}
    for key in _row_keys(frame):
        counts.setdefault(key[:-1], set()).add(key[-1])
    return {visible for visible, works in counts.items() if len(works) > 1}


def display_key(key: tuple, ambiguous: set[tuple]) -> list[str]:
    cells = [str(v) for v in key[:-1]]
    if key[:-1] in ambiguous:
        cells[0] += f" (work {key[-1][:8]})"
    return cells


def setup_notes(frame) -> list[str]:
    """One line per group of rows whose visible columns agree but whose work differs, naming the difference:
    they are different experiments and are never merged."""
    notes = []
    for visible in sorted(_ambiguous(frame), key=str):
        rows = frame[[tuple(r) == visible for r in frame[KEY_COLUMNS].itertuples(index=False)]]
        firsts = rows.drop_duplicates(subset="work")
        diff = differences(list(firsts["identity"]))
        named = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in diff.items()) or "unrecorded fields"
        notes.append(f"- {'/'.join(map(str, visible))}: {len(firsts)} different setups shown as separate rows "
                     f"(work {', '.join(w[:8] for w in firsts['work'])}); they differ in {named}.")
    return notes


def iteration_cell(record: dict | None) -> str:
    if record is None:
        return MISSING
    if record["status"] != "ok":
        return record["status"]
    cell = f"{format_ms(record['median_ms'])} ± {format_ms(record['iqr_ms'], like=record['median_ms'])}"
    exposed = record.get("exposed_ms")
    if exposed is not None and exposed == exposed:  # NaN: the frame's missing value
        cell += f" (comm {format_ms(exposed, like=record['median_ms'])})"
    error = record.get("prediction_error")
    if error is not None and error == error:
        cell += f" [model {format_ms(record['predicted_ms'], like=record['median_ms'])}, {error:+.0%}]"
    return cell + (f" {CHECK_FAILED_MARK}" if record["check_passed"] is False else "")


def iteration_table(frame, systems: list[str]) -> list[list[str]]:
    """Rows of display strings: key columns then one cell per system."""
    by_key, ambiguous = _by_key(frame), _ambiguous(frame)
    return [display_key(key, ambiguous) + [iteration_cell(by_key[key].get(s)) for s in systems]
            for key in _row_keys(frame)]


@dataclass
class SpeedupCell:
    text: str
    speedup: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    marked: bool = False
    paired: stats.PairedRatio | None = None
    verdict: str = ""  # "faster" | "slower" | "no difference shown" | "too few rounds" | "unpaired" | ""


def _verdict(paired: stats.PairedRatio) -> str:
    if not paired.has_interval:
        return stats.TOO_FEW_ROUNDS
    return "faster" if paired.above_one() else "slower" if paired.below_one() else "no difference shown"


def speedup_cell(base: dict | None, record: dict | None, is_baseline: bool, include_unchecked: bool) -> SpeedupCell:
    """Paired speedup (harness/stats.py speedup, the run summary's too); the ratio is bold only where its
    interval lies wholly on one side of 1."""
    if record is None:
        return SpeedupCell(MISSING)
    if record["status"] != "ok":
        return SpeedupCell(record["status"])
    if base is None:
        return SpeedupCell("no baseline")
    if base["status"] != "ok":
        return SpeedupCell(f"baseline {base['status']}")
    unchecked = record["check_passed"] is False or base["check_passed"] is False
    if unchecked and not include_unchecked:
        return SpeedupCell("check failed" if record["check_passed"] is False else "baseline check failed")
    mark = f" {CHECK_FAILED_MARK}" if unchecked else ""
    if is_baseline:
        return SpeedupCell(f"1.00 (baseline){mark}", 1.0, 1.0, 1.0, unchecked)
    if base["run_id"] != record["run_id"]:
        ratio = base["median_ms"] / record["median_ms"]
        return SpeedupCell(f"{ratio:.2f} unpaired {CROSS_RUN_MARK}{mark}", ratio, None, None, unchecked,
                           verdict="unpaired")
    paired = stats.speedup(base, record)
    if paired.ratio is None:
        return SpeedupCell(f"no common round{mark}", marked=unchecked, paired=paired)
    verdict = _verdict(paired)
    ratio_text = f"**{paired.ratio:.2f}**" if verdict in ("faster", "slower") else f"{paired.ratio:.2f}"
    text = f"{ratio_text} {paired.interval_text()}"
    if paired.p_value is not None:
        text += f" p={paired.p_value:.2g}"
    return SpeedupCell(text + mark, paired.ratio, paired.ci_low, paired.ci_high, unchecked, paired, verdict)


def speedup_cells(frame, systems: list[str], baseline: str, include_unchecked: bool) -> dict[tuple, dict]:
    by_key = _by_key(frame)
    return {
        key: {s: speedup_cell(by_key[key].get(baseline), by_key[key].get(s), s == baseline, include_unchecked)
              for s in systems}
        for key in _row_keys(frame)
    }


# ---------------------------------------------------------------- footers

def _machine(env: dict) -> str:
    gpu = env.get("gpu")
    gpu_text = "none" if gpu is None else f"{gpu.get('count')} x {gpu.get('name')} (CUDA {gpu.get('cuda')})"
    return (f"{env['cpu_model']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}, GPU {gpu_text}, "
            f"host {env['hostname']}, torch {env['torch']}")


def _method(method: dict) -> str:
    text = (f"timer {method['timer']}; warm-up {method['warmup']} steps; {method['steps']} timed steps x "
            f"{method['rounds']} rounds; systems interleaved across rounds: {'yes' if method['interleaved'] else 'no'}"
            f"; calibration: {method['calibration']}")
    return text + (f"; {method['notes']}" if method.get("notes") else "")


def _git(git: dict) -> str:
    if git.get("commit") is None:
        return "not a git checkout"
    return git["commit"][:12] + (" (dirty: uncommitted changes)" if git.get("dirty") else "")


def _distinct(docs: list[dict], describe) -> list[str]:
    """Each distinct description once; with several, name the runs each applies to."""
    groups: dict[str, list[str]] = {}
    for doc in docs:
        groups.setdefault(describe(doc), []).append(doc["run_id"])
    if len(groups) == 1:
        return list(groups)
    return [f"{text} (runs {', '.join(ids)})" for text, ids in groups.items()]


def provenance(docs: list[dict], frame, superseded: int, report_command: list[str]) -> str:
    """Machine, code, date, method and commands behind the shown trials, as a Markdown list."""
    used = set(frame["run_id"])
    docs = sorted((d for d in docs if d["run_id"] in used), key=lambda d: (d["created_utc"], d["run_id"]))
    lines = ["**Provenance**", ""]
    machines = _distinct(docs, lambda d: _machine(d["environment"]))
    lines += [f"- machine: {text}" for text in machines]
    if len(machines) > 1:
        lines.append("- WARNING: these results come from different machines; compare systems within one machine only.")
    lines += [f"- code: git {text}" for text in _distinct(docs, lambda d: _git(d["git"]))]
    lines += [f"- method: {text}" for text in _distinct(docs, lambda d: _method(d["method"]))]
    for doc in docs:
        count = int((frame["run_id"] == doc["run_id"]).sum())
        lines.append(f"- run `{doc['run_id']}` ({doc['created_utc']}, {count} trial(s) shown): "
                     f"`{shlex.join(doc['command_line'])}`")
    lines += setup_notes(frame)
    if superseded:
        lines.append(f"- {superseded} trial(s) also appeared in an older run (the same trial id: identical work, "
                     "system and method); the newest run's result is shown.")
    else:
        lines.append("- When several runs contain the same trial id, the newest run's result is shown (none here).")
    if report_command:
        lines.append(f"- report: `{shlex.join(report_command)}`")
    return "\n".join(lines)


ITERATION_LEGEND = (
    "Cells: median step time in ms ± the interquartile range (q3 − q1, in ms; not a standard deviation), over all "
    "timed steps pooled across rounds; a step's time is its slowest rank's. A status word (skipped, error, timeout, "
    f"oom, nonfinite) means the trial produced no time (see the CSV's message column); {MISSING} means not run; "
    f"{CHECK_FAILED_MARK} marks a system whose output failed the equivalence check against the reference. "
    "(comm X): on multi-rank CPU runs, the median exposed communication of a step in ms: the time the step's "
    "thread spent blocked in torch.distributed collectives and their waits, i.e. communication no compute "
    "overlapped (harness/exposed_comm.py), on the rank whose step was the slowest. [model X, +E%]: the "
    "performance model's predicted step (run --predict; the testbed is in the CSV) and its error against the "
    "measured median (docs/performance-model.md)."
)


def speedup_legend(baseline: str, include_unchecked: bool) -> str:
    text = (f"Speedup = {baseline} time / system time (above 1: faster than {baseline}), the geometric mean of "
            "the per-round ratios of round medians over the rounds both trials completed in one interleaved run; "
            f"[low, high] is a {stats.CONFIDENCE:.0%} bootstrap interval over rounds (BCa, {stats.N_RESAMPLES} "
            f"resamples, seed {stats.BOOT_SEED}); '{stats.TOO_FEW_ROUNDS}' below {stats.MIN_PAIRS_FOR_INTERVAL} "
            f"pairs; p = two-sided Wilcoxon signed-rank test from {stats.MIN_PAIRS_FOR_WILCOXON} pairs. A ratio is "
            "**bold** only where its whole interval lies on one side of 1; otherwise no difference is shown. "
            f"'unpaired {CROSS_RUN_MARK}': baseline and system come from different runs, so no rounds pair up; the "
            "ratio of pooled medians is shown without an interval. ")
    if include_unchecked:
        return text + f"{CHECK_FAILED_MARK}: the output failed the equivalence check; shown on request anyway."
    return text + ("'check failed': left out because its output differed from the reference "
                   "(--include-unchecked shows it, marked).")


# ---------------------------------------------------------------- chart

def _tick_label(key: tuple) -> str:
    row = dict(zip(ROW_KEY, key, strict=True))
    cf = row["cf"] if row["cf"] == "dropless" else f"cf{row['cf']}"
    return (f"{row['workload']}/{row['flavor']}\n{row['level']} {row['mode']}\n"
            f"{row['routing']} ws{row['ws']}-ep{row['ep']} {row['dtype']} {cf}")


def plot_iteration_times(frame, systems: list[str], path: Path, title: str) -> Path:
    """Grouped bars (one group per work row, one bar per system), error bars spanning q1..q3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    by_key = _by_key(ok)
    keys = _row_keys(ok)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) * max(1, len(systems)) ** 0.5 + 2), 4.5))
    if not keys:
        ax.text(0.5, 0.5, "no successful trials", ha="center", va="center", transform=ax.transAxes)
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        xs, heights, err_low, err_high, marks = [], [], [], [], []
        for i, key in enumerate(keys):
            record = by_key[key].get(system)
            if record is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            heights.append(record["median_ms"])
            err_low.append(record["median_ms"] - record["q1_ms"])
            err_high.append(record["q3_ms"] - record["median_ms"])
            marks.append(record["check_passed"] is False)
        if xs:
            ax.bar(xs, heights, width, yerr=[err_low, err_high], capsize=3, label=system)
            for x, height, failed in zip(xs, heights, marks, strict=True):
                if failed:
                    ax.annotate(CHECK_FAILED_MARK, (x, height), ha="center", va="bottom", fontsize=10)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_tick_label(k) for k in keys], fontsize=7)
    ax.set_ylabel("median step time (ms); error bars: q1..q3")
    if (ok["check_passed"] == False).any():  # noqa: E712 (pandas element-wise comparison)
        ax.text(0.99, 0.01, f"{CHECK_FAILED_MARK} equivalence check failed", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=7)
    medians = ok["median_ms"].tolist()
    if medians and max(medians) / min(medians) > LOG_SCALE_RANGE:
        ax.set_yscale("log")
    ax.set_title(title)
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the report

def choose_baseline(frame, requested: str | None) -> str | None:
    present = set(frame["system"])
    if requested is not None:
        if requested not in present:
            raise UsageError(f"baseline system {requested!r} is not in the results; "
                             f"systems present: {', '.join(sorted(present))}")
        return requested
    return next((name for name in DEFAULT_BASELINES if name in present), None)


def _csv_iteration(frame):
    columns = ["id", *KEY_COLUMNS, "work", "system", "status", "n", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "outliers",
               "exposed_ms", "predicted_ms", "prediction_error", "testbed", "calibration_ms", "tokens_per_s", "useful_tflops", "executed_tflops", "check_passed", "run_id",
               "created_utc", "message"]
    table = frame[columns].sort_values(["id"])
    return table.astype({"n": "Int64", "outliers": "Int64", "check_passed": "boolean"})


def _csv_speedup(cells: dict, baseline: str):
    import pandas as pd

    def paired(cell, name):
        return None if cell.paired is None else getattr(cell.paired, name)

    rows = [dict(zip(ROW_KEY, key, strict=True)) | {
        "system": system, "baseline": baseline, "speedup": cell.speedup, "ci_low": cell.ci_low,
        "ci_high": cell.ci_high, "pairs": paired(cell, "n_pairs"), "p_value": paired(cell, "p_value"),
        "noise": paired(cell, "noise"), "interval_method": paired(cell, "interval_method"),
        "verdict": cell.verdict, "check_failed_shown": cell.marked, "cell": cell.text}
        for key, per_system in cells.items() for system, cell in per_system.items()]
    return pd.DataFrame(rows, columns=[*ROW_KEY, "system", "baseline", "speedup", "ci_low", "ci_high", "pairs",
                                       "p_value", "noise", "interval_method", "verdict", "check_failed_shown",
                                       "cell"])


def build_report(options: ReportOptions) -> Report:
    """The tables from every usable results file; each file left out is one warning line on stderr."""
    docs, skipped = load_results(find_result_files(options.paths))
    if not docs:
        raise _nothing_usable(skipped)
    for item in skipped:
        print(item.warning(), file=sys.stderr)
    frame, superseded = trials_frame(docs)
    baseline = choose_baseline(frame, options.baseline)
    systems = _system_order(frame, baseline)
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    footer = provenance(docs, frame, superseded, options.command_line)

    header = [*KEY_COLUMNS, *systems]
    iteration_md = "\n\n".join([
        f"# {options.title}: iteration time (ms)", markdown_table(header, iteration_table(frame, systems)),
        ITERATION_LEGEND, footer]) + "\n"
    written = [out_dir / "iteration_time.md", out_dir / "iteration_time.csv"]
    written[0].write_text(iteration_md, encoding="utf-8")
    _csv_iteration(frame).to_csv(written[1], index=False)

    if baseline is None:
        speedup_md = (f"# {options.title}: speedup\n\nNo speedup table: none of the default baselines "
                      f"({', '.join(DEFAULT_BASELINES)}) is in the results; pick one with --baseline.\n")
        cells = {}
    else:
        cells = speedup_cells(frame, systems, baseline, options.include_unchecked)
        ambiguous = _ambiguous(frame)
        rows = [display_key(key, ambiguous) + [cells[key][s].text for s in systems] for key in cells]
        speedup_md = "\n\n".join([
            f"# {options.title}: speedup over {baseline}", markdown_table(header, rows),
            speedup_legend(baseline, options.include_unchecked), footer]) + "\n"
    written += [out_dir / "speedup.md", out_dir / "speedup.csv"]
    written[2].write_text(speedup_md, encoding="utf-8")
    _csv_speedup(cells, baseline or "").to_csv(written[3], index=False)
    written.append(plot_iteration_times(frame, systems, out_dir / "iteration_time.png", options.title))
    return Report(iteration_md, speedup_md, written, baseline, skipped)
