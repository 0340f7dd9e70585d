"""Runs planned trials in rounds, each round in a fresh child process, and
turns the rounds into the results file's trial records.

Rounds interleave the systems (round 1: A, B, C; round 2: A, B, C; ...), so
a slow spell on a shared machine hits every system rather than one. Each
round has a timeout after which its whole process tree is killed (SIGTERM,
then SIGKILL after a grace period): the child runs in its own session, and
torchrun puts every worker in a session of its own too, so the tree is
collected before anything is signalled (harness/procs.py). A round that fails never
stops the run; on one node, a trial whose round did not succeed runs no
further rounds (its failure is deterministic and a timeout is expensive).
Multi-node runs keep every node on the same schedule and so run every round.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from harness import procs
from harness.journal import Journal
from harness.launch import REPO_DIR, LaunchConfig, child_env, trial_command
from harness.progress import RunProgress
from harness.report import DEFAULT_BASELINES as BASELINE_PREFERENCE  # same choice as the reports
from harness.trial_spec import TrialSpec

GRACE_S = procs.GRACE_S  # between SIGTERM and SIGKILL
STDERR_TAIL_LINES = 8


@dataclass
class RunOptions:
    repeats: int = 3
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    grace_s: float = GRACE_S
    order_seed: int = 0  # seeds the random order of trials inside each round (round_orders)
    progress: TextIO = field(default_factory=lambda: sys.stderr)
    journal: Journal | None = None  # each finished round is appended here (harness/journal.py)


# ----------------------------------------------------------------- processes

# The launch-and-reap path lives in harness/procs.py; these names stay importable from here.
kill_tree, is_alive, descendants = procs.kill_tree, procs.is_alive, procs.descendants


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
    """Run one round of `spec` in a child process; the child's result dict, or one saying why there is none.

    A round the memory guard refuses is never launched (status too_large, harness/memory_guard.py); a
    child killed by SIGKILL that no timeout killed was, most likely, killed by the kernel's OOM killer."""
    from harness import memory_guard

    verdict = memory_guard.guard(spec)
    if verdict.fits is False:
        return {**_empty_round("too_large", verdict.message), "wall_s": 0.0, "exit_code": None,
                "memory_guard": verdict.message}
    tag = f"round{sequence:04d}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    stdout_path, stderr_path = workdir / f"{tag}.stdout", workdir / f"{tag}.stderr"
    spec_path.write_text(spec.to_json())
    config = launch_config(spec, options)
    argv = trial_command(config, spec_path, out_path, sequence, spec.timeout_s)
    started = time.monotonic()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        # timeout or Ctrl-C: the whole tree (torchrun and its workers) is killed; Ctrl-C is re-raised
        rc = procs.run(argv, spec.timeout_s, grace_s=options.grace_s, cwd=REPO_DIR, env=child_env(config),
                       stdout=out, stderr=err).returncode
    wall = time.monotonic() - started
    result = _read_result(out_path, workdir, tag)
    if rc is None:
        result = _empty_round("timeout", f"no result after {spec.timeout_s:g} s; process tree killed")
    elif result is None and options.node_rank != 0 and rc == 0:
        result = _empty_round("ok", "result written on node 0")
        result["remote"] = True
    elif result is None and memory_guard.killed_by_sigkill(rc, _tail(stderr_path, memory_guard.STDERR_LINES)):
        result = _empty_round("oom", "trial process killed by signal 9 (SIGKILL) before its timeout, most likely "
                                     "by the kernel's out-of-memory killer")
    elif result is None:
        tail = _tail(stderr_path)
        result = _empty_round("error", f"trial process exited with code {rc} without a result"
                                       + (f"; stderr tail:\n{tail}" if tail else ""))
    result["wall_s"] = wall
    result["exit_code"] = rc
    result["memory_guard"] = verdict.message
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


def planned_threads(spec: TrialSpec) -> int:
    """Threads each rank will run with (as asked, else this node's cores shared by its ranks)."""
    return launch_config(spec, RunOptions()).threads()


def trial_setup(spec: TrialSpec) -> dict:
    """The method settings that change what a trial measures (part of its identity, harness/identity.py)."""
    return {"device": spec.knobs.device, "warmup": spec.warmup, "steps": spec.steps, "malloc": spec.malloc,
            "threads_per_rank": planned_threads(spec), "nnodes": spec.parallel.nnodes,
            "input_pool": spec.input_pool}


def _round_entry(number: int, result: dict) -> dict:
    check = result.get("check")
    return {"round": number, "status": result["status"], "median_s": _median(result["samples_s"]),
            "position": result.get("position"), "sequence": result.get("sequence"),
            "check_passed": None if check is None else bool(check.get("passed")),
            "calibration_before_s": result.get("calibration_before_s"),
            "calibration_after_s": result.get("calibration_after_s"), "wall_s": result["wall_s"],
            "load_before": result.get("load_before"), "load_after": result.get("load_after"),
            "threads_measured": result.get("threads_measured"), "tuning": result.get("tuning"),
            "exposed_comm_median_s": _median(result.get("exposed_comm_s") or []),
            "teardown_error": result.get("teardown_error")}


def _combined_check(rounds: list[dict]) -> dict | None:
    """Round 0's full check, failed if any later round's checksum verification failed."""
    checks = [(i + 1, r["check"]) for i, r in enumerate(rounds) if r.get("check") is not None]
    if not checks:
        return None
    first = dict(checks[0][1])
    failed = [number for number, c in checks[1:] if not c.get("passed")]
    first["rounds_checked"] = [number for number, _ in checks]
    if failed:
        first["passed"] = False
        note = f"checksum verification failed in round(s) {', '.join(map(str, failed))}"
        first["note"] = "; ".join(n for n in (first.get("note"), note) if n)
    return first


def trial_record(spec: TrialSpec, rounds: list[dict]) -> dict:
    """The results file's trial dict. Comparisons use its per-round medians (paired by round,
    harness/stats.py); samples pooled over the successful rounds describe the trial."""
    from harness.identity import trial_id, work_key
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
        "setup": trial_setup(spec),
        "status": status, "message": message,
        "samples_s": samples, "per_rank_samples_s": per_rank,
        # per timed step, beside samples_s: time the step's thread spent blocked in collectives
        # (harness/exposed_comm.py); None for one rank or on a GPU
        "exposed_comm_s": ([s for r in ok for s in r["exposed_comm_s"]]
                           if ok and all(r.get("exposed_comm_s") for r in ok) else None),
        "rounds": [_round_entry(i + 1, r) for i, r in enumerate(rounds)],
        "summary": summary, "throughput": throughput,
        "flops": flops, "routing_stats": last.get("routing_stats"),
        "phase_times_s": _median_phases([r.get("phase_times_s") for r in ok]),
        "tuning": last.get("tuning"),  # the last round's; every round's is in its round entry
        # the router the trial ran (softmax unless the workload declares another) and who computed
        # the shared expert: "native" (the system), "harness" (systems/shared_expert.py) or None
        "router": spec.workload.layer.router_label(),
        "shared_expert": last.get("shared_expert"),
        "check": _combined_check(rounds),
        "peak_memory_bytes": max(memory) if memory else None,
        # what the peak covers (the system's own steps; harness/trial.py), the whole process's peak
        # (check included), and the memory guard's estimate before launch (harness/memory_guard.py)
        "peak_memory_scope": last.get("peak_memory_scope"),
        "process_peak_memory_bytes": max((r["process_peak_memory_bytes"] for r in rounds
                                          if r.get("process_peak_memory_bytes") is not None), default=None),
        "memory_guard": rounds[0].get("memory_guard") if rounds else None,
        "timer": last.get("timer"), "threads_per_rank": last.get("threads"),
    }
    if spec.plugins:  # a plugin system: which class ran is part of its identity (harness/identity.py)
        record["plugins"] = list(spec.plugins)
    return {"id": trial_id(record), "work_key": work_key(record), **record}


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
    from harness.identity import system_label

    ws = spec.parallel.world_size
    where = f" ws{ws}-ep{spec.parallel.ep}" if ws > 1 else ""
    label = system_label({"system": spec.system, "knobs": {"options": spec.knobs.options}})
    return f"{label} {spec.workload.name}/{spec.workload.flavor} {spec.level} {spec.mode}{where}"


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


def round_orders(n_trials: int, repeats: int, seed: int) -> list[list[int]]:
    """The order of the trials inside each round: a fresh seeded random permutation per round,
    so a trial's position in the round (first after a cold start, last after a hot one) is not
    confounded with the system. The same (n, repeats, seed) always gives the same orders."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.permutation(n_trials)] for _ in range(repeats)]


def run_trials(specs: list[TrialSpec], options: RunOptions) -> list[dict]:
    """Every spec for options.repeats interleaved rounds, in a seeded random order inside each round;
    one trial record per spec, in the order given.

    With options.journal, each finished round is appended to it before the next starts, and the
    rounds it already holds (a resumed run) are not run again: the records come out the same."""
    n, repeats = len(specs), options.repeats
    journal = options.journal
    rounds: list[dict[int, dict]] = [{} for _ in specs]  # trial -> {round index: result}
    for entry in journal.rounds if journal else ():
        rounds[entry["trial"]][entry["round"]] = entry["result"]
    multi_node = any(s.parallel.nnodes > 1 for s in specs)
    # A trial whose round failed runs no further rounds (single node); round 0 verified its checksums.
    stopped = set() if multi_node else {i for i, done in enumerate(rounds)
                                        if any(r["status"] != "ok" for r in done.values())}
    verified = {i: done[0]["check"]["checksum"] for i, done in enumerate(rounds)
                if 0 in done and (done[0].get("check") or {}).get("passed")
                and done[0]["check"].get("checksum") is not None}
    progress = RunProgress(n * repeats, options.progress, done=sum(map(len, rounds)))
    progress.plan({i: repeats - len(rounds[i]) for i in range(n)})
    for i in stopped:
        progress.stopped_early(i)
    orders = round_orders(n, repeats, options.order_seed)
    try:
        with tempfile.TemporaryDirectory(prefix="moebench-") as tmp:
            for r, order in enumerate(orders):
                for position, i in enumerate(order):
                    if i in stopped or r in rounds[i]:
                        continue
                    spec, sequence, first = specs[i], r * n + position, r == 0
                    round_spec = spec.with_changes(check=spec.check and first,
                                                   verify=None if first else verified.get(i),
                                                   launcher_node_rank=options.node_rank)
                    label = describe(spec)
                    progress.starting(label)
                    result = run_round(round_spec, Path(tmp), sequence, options)
                    result.update(position=position, sequence=sequence)
                    if journal is not None:
                        journal.append(i, r, result)
                    rounds[i][r] = result
                    checksum = (result.get("check") or {}).get("checksum")
                    if first and checksum is not None and result["check"].get("passed"):
                        verified[i] = checksum
                    progress.finished(i, label, _outcome(result), result.get("wall_s") or 0.0)
                    if result["status"] != "ok" and not multi_node:
                        stopped.add(i)
                        progress.stopped_early(i)
    finally:
        progress.close()
    return [trial_record(spec, [done[r] for r in sorted(done)]) for spec, done in zip(specs, rounds, strict=True)]


MALLOC_NOTES = {
    "reuse": "host allocator: glibc told to keep freed memory (no mmap for large blocks, trim above 2 GiB), so "
             "steps do not page-fault (harness/host_memory.py)",
    "system": "host allocator: glibc defaults",
}

COMPARISON_NOTE = (
    "comparisons: paired per-round ratios of round medians (rounds in which both trials succeeded); speedup = "
    "geometric mean of baseline/system round ratios; interval = {confidence:.0%} bootstrap over rounds "
    "(scipy.stats.bootstrap, BCa on the mean log-ratio, {resamples} resamples, seed {seed}); no interval below "
    "{min_pairs} pairs ('too few rounds'); Wilcoxon signed-rank p-value from {min_wilcoxon} pairs; noise = stdev "
    "of the per-round log-ratios")


def comparison_note() -> str:
    from harness import stats

    return COMPARISON_NOTE.format(confidence=stats.CONFIDENCE, resamples=stats.N_RESAMPLES, seed=stats.BOOT_SEED,
                                  min_pairs=stats.MIN_PAIRS_FOR_INTERVAL, min_wilcoxon=stats.MIN_PAIRS_FOR_WILCOXON)


def method(warmup: int, steps: int, rounds: int, timer: str = "perf_counter", malloc: str = "reuse",
           order_seed: int = 0, orders: list[list[str]] | None = None) -> dict:
    from harness.timing import CALIBRATION_DESCRIPTION

    return {
        "timer": timer, "warmup": warmup, "steps": steps, "rounds": rounds, "interleaved": True,
        "calibration": CALIBRATION_DESCRIPTION,
        "order": {"policy": "seeded random permutation of the trials inside each round", "seed": order_seed,
                  "per_round": orders},
        "comparison": comparison_note(),
        "notes": ("each trial round in a fresh process; rounds interleave the systems in a seeded random order "
                  f"(seed {order_seed}); step time = slowest rank's (barrier before each timed step); each timed "
                  "step takes the next batch of a fixed seeded input pool shared by all systems; backward uses a "
                  "fixed contiguous upstream gradient; forward mode = forward half of a training step (autograd "
                  "on); model level optimizer = AdamW, fused kernel where the device has one; equivalence: full "
                  "check against torch_reference in each trial's first round, checksum of the verified values in "
                  "every later round; summary statistics pool the steps of successful rounds, comparisons pair "
                  f"rounds; {MALLOC_NOTES[malloc]}"),
    }


def write_results(trials: list[dict], method_dict: dict, command_line: list[str], out_dir: Path,
                  run_id: str | None = None, created_utc: str | None = None) -> Path:
    """The validated results file OUT/RUN_ID.json; a run's own id and start time when it has them."""
    from harness import schema

    doc = schema.new_document(command_line, method_dict, trials, run_id=run_id, created_utc=created_utc)
    return schema.write_atomic(doc, Path(out_dir) / f"{doc['run_id']}.json")


# ----------------------------------------------------------------- the table

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def default_baseline(trials: list[dict]) -> str:
    systems = {t["system"] for t in trials if t["summary"]}
    return next((s for s in BASELINE_PREFERENCE if s in systems), BASELINE_PREFERENCE[-1])


def format_table(trials: list[dict], baseline: str | None = None) -> str:
    """One row per trial: median ms, IQR, and the paired speedup over the baseline in the same work.

    The speedup and its interval come from harness/stats.py speedup() on the per-round medians, the
    same function the reports use, so the two always agree. A system whose equivalence check failed
    gets no speedup ("check failed"): its time is not comparable work."""
    from harness import stats
    from harness.identity import system_label, work_key, workload_label
    from harness.tables import text_table

    baseline = baseline or default_baseline(trials)
    header = ("workload", "level/mode", "capacity", "parallel", "system", "status", "median ms", "IQR ms",
              "exposed comm ms", "speedup", "95% CI", "rounds", "check", "calib ms")
    rows, notes = [], []
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(t.get("work_key") or work_key(t), []).append(t)
    for group in groups.values():
        timed = [t for t in group if t["summary"]]
        base = next((t for t in timed if t["system"] == baseline and not t["knobs"]["options"]),
                    next((t for t in timed if t["system"] == baseline), timed[0] if timed else None))
        if base is not None and base["system"] != baseline:
            notes.append(f"{group[0]['workload']}: baseline is {system_label(base)} ({baseline} has no timing)")
        for t in group:
            summary = t["summary"]
            check = "-" if t["check"] is None else ("pass" if t["check"]["passed"] else "FAIL")
            speedup, interval, pairs = "-", "-", "-"
            if summary and base is not None:
                paired = stats.speedup(base, t)
                pairs = str(paired.n_pairs)
                if t is base:
                    speedup, interval = "1.00x", "baseline"
                elif paired.ratio is not None:
                    speedup, interval = f"{paired.ratio:.2f}x", paired.interval_text()
            if check == "FAIL":
                speedup, interval = "check failed", "-"
            cal = [r["calibration_before_s"] for r in t["rounds"] if r["calibration_before_s"] is not None]
            cf = t["knobs"]["capacity_factor"]
            par = t["parallel"]
            rows.append((workload_label(t), f"{t['level']}/{t['mode']}",
                         "dropless" if cf is None else f"cf {cf:g}", f"ws{par['world_size']}/ep{par['ep']}",
                         system_label(t), t["status"], _ms(summary["median"] if summary else None),
                         _ms(summary["iqr"] if summary else None), _ms(_median(t.get("exposed_comm_s") or [])),
                         speedup, interval, pairs, check,
                         _ms(_median(cal))))
    lines = [text_table(header, rows)]
    lines.append(f"speedup = geometric mean over paired rounds of baseline/system round medians (baseline: "
                 f"{baseline}; >1 is faster); 95% CI = bootstrap over rounds ('too few rounds' below "
                 "3 pairs); rounds = pairs used; calib = median calibration matmul before each round; exposed "
                 "comm = median time a step's thread spent blocked in collectives (multi-rank CPU runs)")
    lines.extend(notes)
    for t in trials:
        if t["status"] not in ("ok",):
            lines.append(f"{system_label(t)} {t['workload']}: {t['status']}: {(t['message'].splitlines() or [''])[0]}")
    return "\n".join(lines)
