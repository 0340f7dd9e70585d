"""Runs planned trials in rounds, each round in a fresh child process, and
turns the rounds into the results file's trial records.

Rounds interleave the systems (round 1: A, B, C; round 2: A, B, C; ...), so
a slow spell on a shared machine hits every system rather than one. Each
round has a timeout after which its whole process tree is killed (SIGTERM,
then SIGKILL after a grace period): the child runs in its own session, and
torchrun puts every worker in a session of its own too, so the tree is
collected from /proc before anything is signalled. A round that fails never
stops the run; on one node, a trial whose round did not succeed runs no
further rounds (its failure is deterministic and a timeout is expensive).
Multi-node runs keep every node on the same schedule and so run every round.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from harness.launch import REPO_DIR, LaunchConfig, child_env, trial_command
from harness.report import DEFAULT_BASELINES as BASELINE_PREFERENCE  # same choice as the reports
from harness.trial_spec import TrialSpec

GRACE_S = 5.0  # between SIGTERM and SIGKILL
STDERR_TAIL_LINES = 8


@dataclass
class RunOptions:
    repeats: int = 3
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    grace_s: float = GRACE_S
    progress: TextIO = field(default_factory=lambda: sys.stderr)


# ----------------------------------------------------------------- processes

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return fields[0], int(fields[1])


def is_alive(pid: int) -> bool:
    """Running or sleeping (a zombie has finished: it only waits to be reaped)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    own_group = os.getpgrp()
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
            if pgid != own_group:
                os.killpg(pgid, sig)
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def kill_tree(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM the child's tree (every process group in it), SIGKILL what is left after grace_s."""
    pids = {proc.pid} | descendants(proc.pid)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pids |= descendants(proc.pid) if proc.poll() is None else set()
        if not any(is_alive(p) for p in pids):
            break
        time.sleep(0.05)
    pids |= descendants(proc.pid) if proc.poll() is None else set()
    _signal_all({p for p in pids if is_alive(p)}, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------- one round

def launch_config(spec: TrialSpec, options: RunOptions) -> LaunchConfig:
    parallel = spec.parallel
    return LaunchConfig(
        nproc_per_node=parallel.world_size // parallel.nnodes, nnodes=parallel.nnodes,
        node_rank=options.node_rank, rdzv_endpoint=options.rdzv_endpoint,
        threads_per_rank=parallel.threads_per_rank,
    )


def _empty_round(status: str, message: str) -> dict:
    return {"status": status, "message": message, "samples_s": [], "per_rank_samples_s": None,
            "calibration_before_s": None, "calibration_after_s": None}


def run_round(spec: TrialSpec, workdir: Path, sequence: int, options: RunOptions) -> dict:
    """Run one round of `spec` in a child process; the child's result dict, or one saying why there is none."""
    tag = f"round{sequence:04d}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    stdout_path, stderr_path = workdir / f"{tag}.stdout", workdir / f"{tag}.stderr"
    spec_path.write_text(spec.to_json())
    config = launch_config(spec, options)
    argv = trial_command(config, spec_path, out_path, sequence, spec.timeout_s)
    started = time.monotonic()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO_DIR, env=child_env(config), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc, options.grace_s)
            rc = None
        except BaseException:  # Ctrl-C: the child's own session does not get the terminal's SIGINT
            kill_tree(proc, options.grace_s)
            raise
    wall = time.monotonic() - started
    result = _read_result(out_path, workdir, tag)
    if rc is None:
        result = _empty_round("timeout", f"no result after {spec.timeout_s:g} s; process tree killed")
    elif result is None and options.node_rank != 0 and rc == 0:
        result = _empty_round("ok", "result written on node 0")
        result["remote"] = True
    elif result is None:
        tail = _tail(stderr_path)
        result = _empty_round("error", f"trial process exited with code {rc} without a result"
                                       + (f"; stderr tail:\n{tail}" if tail else ""))
    result["wall_s"] = wall
    result["exit_code"] = rc
    return result


def _read_result(out_path: Path, workdir: Path, tag: str) -> dict | None:
    """The writer's result; else the first failing rank's own file; else None."""
    import json

    candidates = [out_path] + sorted(workdir.glob(f"{tag}.out.json.rank*"))
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())
    return None


# ----------------------------------------------------------------- records

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def trial_record(spec: TrialSpec, rounds: list[dict]) -> dict:
    """The results file's trial dict: samples pooled over the successful rounds."""
    from harness.schema import trial_id
    from harness.stats import summarize

    ok = [r for r in rounds if r["status"] == "ok" and not r.get("remote")]
    failed = [(i, r) for i, r in enumerate(rounds) if r["status"] != "ok"]
    samples = [s for r in ok for s in r["samples_s"]]
    per_rank = None
    if ok and all(r.get("per_rank_samples_s") for r in ok):
        per_rank = [sum((r["per_rank_samples_s"][k] for r in ok), []) for k in range(len(ok[0]["per_rank_samples_s"]))]
    if failed:
        index, first = failed[0]
        status = first["status"]
        message = first["message"] if len(rounds) == 1 else f"round {index + 1}: {first['message']}"
    else:
        status, message = "ok", ""
    summary = summarize(samples) if samples else None
    last = ok[-1] if ok else {}
    flops = last.get("flops")
    throughput = None
    if summary and last.get("tokens_per_step"):
        median = summary["median"]

        def tflops(key):
            return None if not flops or flops.get(key) is None else flops[key] / median / 1e12

        throughput = {"tokens_per_s": last["tokens_per_step"] / median,
                      "executed_tflops": tflops("executed"), "useful_tflops": tflops("useful")}
    memory = [r["peak_memory_bytes"] for r in rounds if r.get("peak_memory_bytes") is not None]
    record = {
        "system": spec.system, "workload": spec.workload.name, "flavor": spec.workload.flavor,
        "level": spec.level, "mode": spec.mode, "routing": spec.routing,
        "workload_spec": spec.workload.to_dict(),
        "parallel": {**dataclasses.asdict(spec.parallel), "dp": spec.parallel.dp},
        "knobs": dataclasses.asdict(spec.knobs), "dtype": spec.knobs.dtype, "seed": spec.knobs.seed,
        "status": status, "message": message,
        "samples_s": samples, "per_rank_samples_s": per_rank,
        "rounds": [
            {"round": i + 1, "status": r["status"], "median_s": _median(r["samples_s"]),
             "calibration_before_s": r.get("calibration_before_s"),
             "calibration_after_s": r.get("calibration_after_s"), "wall_s": r["wall_s"],
             "load_before": r.get("load_before"), "load_after": r.get("load_after")}
            for i, r in enumerate(rounds)
        ],
        "summary": summary, "throughput": throughput,
        "flops": flops, "routing_stats": last.get("routing_stats"),
        "phase_times_s": _median_phases([r.get("phase_times_s") for r in ok]),
        "check": next((r["check"] for r in rounds if r.get("check") is not None), None),
        "peak_memory_bytes": max(memory) if memory else None,
        "timer": last.get("timer"), "threads_per_rank": last.get("threads"),
    }
    record["id"] = trial_id(record)
    return {"id": record.pop("id"), **record}


def _median_phases(per_round: list[dict | None]) -> dict | None:
    rounds = [p for p in per_round if p]
    if not rounds:
        return None
    return {k: statistics.median(p[k] for p in rounds if k in p) for k in rounds[0]}


def skipped_record(spec: TrialSpec, reason: str) -> dict:
    """A trial that was never launched (its system cannot run here at all)."""
    return trial_record(spec, [{**_empty_round("skipped", reason), "wall_s": 0.0}])


# ----------------------------------------------------------------- the run

def describe(spec: TrialSpec) -> str:
    ws = spec.parallel.world_size
    where = f" ws{ws}-ep{spec.parallel.ep}" if ws > 1 else ""
    return f"{spec.system} {spec.workload.name}/{spec.workload.flavor} {spec.level} {spec.mode}{where}"


def _outcome(result: dict) -> str:
    if result["status"] == "ok":
        if result.get("remote"):
            return "done (results on node 0)"
        median = _median(result["samples_s"])
        check = result.get("check")
        verdict = "" if check is None else ("  check ok" if check["passed"] else "  CHECK FAILED")
        return f"{median * 1e3:.1f} ms{verdict}"
    first_line = (result["message"].splitlines() or [""])[0]
    return f"{result['status']}: {first_line}"


def run_trials(specs: list[TrialSpec], options: RunOptions) -> list[dict]:
    """Every spec for options.repeats interleaved rounds; one trial record per spec, in order."""
    n, repeats = len(specs), options.repeats
    rounds: list[list[dict]] = [[] for _ in specs]
    stopped: set[int] = set()
    multi_node = any(s.parallel.nnodes > 1 for s in specs)
    with tempfile.TemporaryDirectory(prefix="moebench-") as tmp:
        for r in range(repeats):
            for i, spec in enumerate(specs):
                sequence = r * n + i
                if i in stopped:
                    continue
                round_spec = spec.with_changes(check=spec.check and r == 0, launcher_node_rank=options.node_rank)
                result = run_round(round_spec, Path(tmp), sequence, options)
                rounds[i].append(result)
                print(f"[{sequence + 1}/{n * repeats}] {describe(spec)} ... {_outcome(result)}",
                      file=options.progress, flush=True)
                if result["status"] != "ok" and not multi_node:
                    stopped.add(i)
    return [trial_record(spec, spec_rounds) for spec, spec_rounds in zip(specs, rounds, strict=True)]


MALLOC_NOTES = {
    "reuse": "host allocator: glibc told to keep freed memory (no mmap for large blocks, trim above 2 GiB), so "
             "steps do not page-fault (harness/host_memory.py)",
    "system": "host allocator: glibc defaults",
}


def method(warmup: int, steps: int, rounds: int, timer: str = "perf_counter", malloc: str = "reuse") -> dict:
    from harness.timing import CALIBRATION_DESCRIPTION

    return {
        "timer": timer, "warmup": warmup, "steps": steps, "rounds": rounds, "interleaved": True,
        "calibration": CALIBRATION_DESCRIPTION,
        "notes": ("each trial round in a fresh process; rounds interleave the systems; step time = slowest "
                  "rank's (barrier before each timed step); backward uses a fixed contiguous upstream "
                  "gradient; forward mode = forward half of a training step (autograd on); model level "
                  "optimizer = AdamW, fused kernel where the device has one; samples pooled over successful "
                  f"rounds; {MALLOC_NOTES[malloc]}"),
    }


def write_results(trials: list[dict], method_dict: dict, command_line: list[str], out_dir: Path) -> Path:
    from harness import schema

    doc = schema.new_document(command_line, method_dict, trials)
    return schema.write_atomic(doc, Path(out_dir) / f"{doc['run_id']}.json")


# ----------------------------------------------------------------- the table

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def default_baseline(trials: list[dict]) -> str:
    systems = {t["system"] for t in trials if t["summary"]}
    return next((s for s in BASELINE_PREFERENCE if s in systems), BASELINE_PREFERENCE[-1])


def format_table(trials: list[dict], baseline: str | None = None) -> str:
    """system x workload: median ms, IQR, speedup vs the baseline in the same run, check verdict.

    A system whose equivalence check failed gets no speedup ("check failed"): its time is not
    comparable work."""
    baseline = baseline or default_baseline(trials)
    header = ("workload", "level/mode", "capacity", "parallel", "system", "status", "median ms", "IQR ms",
              "speedup", "check", "calib ms")
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        key = (t["workload"], t["flavor"], t["level"], t["mode"], t["routing"], t["dtype"],
               t["knobs"]["capacity_factor"], t["parallel"]["world_size"], t["parallel"]["ep"])
        groups.setdefault(key, []).append(t)
    notes = []
    for key, group in groups.items():
        timed = [t for t in group if t["summary"]]
        base = next((t for t in timed if t["system"] == baseline), timed[0] if timed else None)
        if base is not None and base["system"] != baseline:
            notes.append(f"{key[0]}: baseline is {base['system']} ({baseline} has no timing)")
        for t in group:
            summary = t["summary"]
            median = summary["median"] if summary else None
            check = "-" if t["check"] is None else ("pass" if t["check"]["passed"] else "FAIL")
            speedup = f"{base['summary']['median'] / median:.2f}x" if (summary and base) else "-"
            if check == "FAIL":
                speedup = "check failed"
            cal = [r["calibration_before_s"] for r in t["rounds"] if r["calibration_before_s"] is not None]
            cf = t["knobs"]["capacity_factor"]
            rows.append((f"{t['workload']}/{t['flavor']}", f"{t['level']}/{t['mode']}",
                         "dropless" if cf is None else f"cf {cf:g}", f"ws{key[-2]}/ep{key[-1]}",
                         t["system"], t["status"],
                         _ms(median), _ms(summary["iqr"] if summary else None), speedup, check, _ms(_median(cal))))
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"speedup = baseline median / system median (baseline: {baseline}; >1 is faster); "
                 "calib = median calibration matmul before each round")
    lines.extend(notes)
    for t in trials:
        if t["status"] not in ("ok",):
            lines.append(f"{t['system']} {t['workload']}: {t['status']}: {(t['message'].splitlines() or [''])[0]}")
    return "\n".join(lines)
