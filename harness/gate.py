"""`moebench gate`: is the candidate slower than its baseline, or computing something else?

Method (docs/gate.md has the reasoning and the calibration):

* Each (benchmark, system) of the suite is an item. Its work channel
  (harness/work_channel.py) is compared first: any difference FAILs the item,
  naming the metric and both values, and its timing is skipped.
* Timing runs in two **blocks**, each a fresh set of worker processes
  (harness/gate_process.py), set up and warmed up before anything is timed. A
  **round** is the benchmark's ``quartets`` randomised ABBA (or BAAB) quartets
  of single timed steps inside one block: the two sides alternate step by step,
  so a noisy spell of the shared machine (they last hundreds of milliseconds)
  hits both. Both sides always start a step right after the other side's, so
  that cold start cancels in the ratio. Rounds alternate between the blocks.
* paired (``--baseline-ref``): A is the baseline revision's worker, B the
  candidate's; the round's ratio is B/A of each side's median step. stored: A
  is the normaliser (a GEMM of the benchmark's own size in the same process, or
  a torch_reference worker), B the candidate; the round's value is B/A, compared
  with the stored baseline's values as independent samples.
* After LOOKS rounds per block the verdict rule (harness/gate_verdict.py) is
  applied at Bonferroni-adjusted confidence, so a decision taken early survives
  the final Holm correction; rounds are added until it decides or the item's
  share of the budget is spent (INCONCLUSIVE).
* Contention (1-minute load average, /proc/pressure/cpu) is recorded before
  and after each item and printed with its verdict.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.gate_process import SETUP_TIMEOUT_S, Side, WorkerFailed, WorkerProcess
from harness.gate_verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    UNDECIDED,
    ItemVerdict,
    decide,
    paired_evidence,
    stored_evidence,
)
from harness.work_channel import compare_work

BLOCKS = 2
LOOKS = (4, 6, 9, 13, 19, 28, 40)  # rounds per block at which the rule is applied
BASELINE_ROUNDS = 10  # rounds per block a stored baseline records
PRESSURE_FILE = Path("/proc/pressure/cpu")


def contention() -> dict:
    """1-minute load average and the CPU pressure stall share (PSI "some avg10", %) where the kernel has it."""
    record = {"load_1m": os.getloadavg()[0], "cpu_pressure_avg10": None}
    try:
        for line in PRESSURE_FILE.read_text().splitlines():
            if line.startswith("some"):
                fields = dict(part.split("=") for part in line.split()[1:])
                record["cpu_pressure_avg10"] = float(fields["avg10"])
    except (OSError, ValueError, KeyError):
        pass
    return record


@dataclass
class GateOptions:
    budget_s: float
    confidence: float
    seed: int = 0
    workdir: Path = field(default_factory=lambda: Path("results") / "gate")


@dataclass
class ItemRun:
    """Everything one item measured: kept raw in the gate's results file."""

    benchmark: str
    system: str
    work: dict = field(default_factory=dict)  # side label -> [work record per block]
    rounds: list = field(default_factory=list)  # {"block", "order", "a_s", "b_s", "value"/"pair"}
    contention_before: dict = field(default_factory=dict)
    contention_after: dict = field(default_factory=dict)
    wall_s: float = 0.0
    error: str = ""


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Workers:
    """The worker processes of one item: workers[block][role], all set up before any timing."""

    def __init__(self, roles: dict[str, tuple[Side, dict]], workdir: Path, tag: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.blocks: list[dict[str, WorkerProcess]] = []
        self.setups: list[dict[str, dict]] = []
        try:
            for block in range(BLOCKS):
                self.blocks.append({role: WorkerProcess(side, _threads(), workdir / f"{tag}.b{block}.{role}.log")
                                    for role, (side, _) in roles.items()})
            # The processes start (and import) together; once all are ready their set-ups run one at a time,
            # so whatever a system measures while it builds (a run-time tuner) sees a machine the gate leaves quiet.
            for block in self.blocks:
                for worker in block.values():
                    worker.send({"op": "ping"})
            for block in self.blocks:
                for worker in block.values():
                    worker.receive(SETUP_TIMEOUT_S)
            for block in self.blocks:
                self.setups.append({role: worker.request({"op": "setup", "spec": roles[role][1]}, SETUP_TIMEOUT_S)
                                    for role, worker in block.items()})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for block in self.blocks:
            for worker in block.values():
                worker.close()


def _measure(worker: WorkerProcess, what: str) -> float:
    """One timed step (or one normalising GEMM), right after whatever ran before it."""
    return worker.request({"op": "measure", "what": what, "warmup": 0, "steps": 1})["samples_s"][0]


def abba_round(rng: random.Random, measure_a, measure_b, quartets: int) -> dict:
    """`quartets` randomised ABBA or BAAB quartets of single measurements; each side's median."""
    orders, got = [], {"A": [], "B": []}
    for _ in range(quartets):
        order = rng.choice(("ABBA", "BAAB"))
        orders.append(order)
        for role in order:
            got[role].append((measure_a if role == "A" else measure_b)())
    return {"orders": orders, "a_s": got["A"], "b_s": got["B"],
            "a": statistics.median(got["A"]), "b": statistics.median(got["B"])}


def _item_specs(bench, system: str, plugins: tuple[str, ...], sides: list[Side], candidate_root: Path) -> dict:
    return {side.label: bench.trial_spec(system, tuple(side.plugin(p, candidate_root) for p in plugins)).to_dict()
            for side in sides}


def _run_rounds(workers: Workers, rng, round_fn, evaluate, deadline: float, max_rounds: int) -> tuple[str, list]:
    """Rounds alternating over the blocks until `evaluate` decides or the deadline; (verdict, rounds)."""
    rounds: list[dict] = []
    per_block = 0
    last_round_s = 0.0
    while per_block < max_rounds:
        started = time.monotonic()
        if started + last_round_s > deadline and per_block >= LOOKS[0]:
            return INCONCLUSIVE, rounds
        for b, block in enumerate(workers.blocks):
            rounds.append({"block": b, **round_fn(block)})
        per_block += 1
        last_round_s = time.monotonic() - started
        if per_block in LOOKS or per_block == max_rounds:
            verdict = evaluate(rounds)
            if verdict != UNDECIDED:
                return verdict, rounds
    return INCONCLUSIVE, rounds


def _by_block(rounds: list[dict], key) -> list[list]:
    return [[key(r) for r in rounds if r["block"] == b] for b in range(BLOCKS)]


def gate_paired_item(bench, system: str, plugins: tuple[str, ...], baseline: Side, candidate: Side,
                     options: GateOptions, deadline: float, alpha: float,
                     confidence: float) -> tuple[ItemVerdict, ItemRun]:
    """One item against a baseline revision: work channel, then paired ABBA rounds."""
    run = ItemRun(bench.name, system, contention_before=contention())
    started = time.monotonic()
    rng = random.Random(f"{options.seed}:{bench.name}:{system}")
    specs = _item_specs(bench, system, plugins, [baseline, candidate], candidate.root)
    verdict = ItemVerdict(bench.name, system, INCONCLUSIVE, "", bench.threshold)
    workers = None
    try:
        workers = Workers({"A": (baseline, specs["baseline"]), "B": (candidate, specs["candidate"])},
                          options.workdir, f"{bench.name}.{system}")
        run.work = {"baseline": [s["A"]["work"] for s in workers.setups],
                    "candidate": [s["B"]["work"] for s in workers.setups]}
        problems = compare_work(run.work["baseline"][0], run.work["candidate"][0])
        if problems:
            verdict.verdict, verdict.reason, verdict.work_problems = FAIL, "the work changed", tuple(problems)
            return verdict, run

        def round_fn(block):
            return abba_round(rng, lambda: _measure(block["A"], "system"), lambda: _measure(block["B"], "system"),
                              bench.quartets)

        def evaluate(rounds):
            evidence = paired_evidence(_by_block(rounds, lambda r: (r["a"], r["b"])), confidence)
            return decide(evidence, bench.threshold, alpha)

        decided, run.rounds = _run_rounds(workers, rng, round_fn, evaluate, deadline, LOOKS[-1])
        evidence = paired_evidence(_by_block(run.rounds, lambda r: (r["a"], r["b"])), confidence)
        verdict.verdict, verdict.evidence = decided, evidence
        verdict.fail_threshold = evidence.fail_threshold(bench.threshold)
    except WorkerFailed as exc:
        run.error = str(exc)
        failed_side = "baseline" if str(exc).startswith("baseline") else "candidate"
        verdict.verdict = FAIL if failed_side == "candidate" else INCONCLUSIVE
        verdict.reason = f"{'the candidate' if failed_side == 'candidate' else 'the baseline'} failed: {exc}"
    finally:
        if workers is not None:
            workers.close()
        run.contention_after = contention()
        run.wall_s = time.monotonic() - started
    return verdict, run


def normalised_rounds(bench, system: str, plugins: tuple[str, ...], candidate: Side, normalize: str,
                      options: GateOptions, rng, deadline: float = math.inf,
                      rounds: int = BASELINE_ROUNDS, evaluate=None) -> tuple[str, ItemRun]:
    """The candidate's rounds normalised by the suite's reference: (verdict of `evaluate`, the run)."""
    run = ItemRun(bench.name, system, contention_before=contention())
    started = time.monotonic()
    spec = bench.trial_spec(system, tuple(candidate.plugin(p, candidate.root) for p in plugins)).to_dict()
    roles = {"B": (candidate, spec)}
    if normalize == "torch_reference":
        roles["A"] = (candidate, bench.trial_spec("torch_reference", ()).to_dict())
    workers = Workers(roles, options.workdir, f"{bench.name}.{system}")
    try:
        run.work = {"candidate": [s["B"]["work"] for s in workers.setups]}

        def round_fn(block):
            ref_worker, what = (block["A"], "system") if "A" in block else (block["B"], "gemm")
            result = abba_round(rng, lambda: _measure(ref_worker, what), lambda: _measure(block["B"], "system"),
                                bench.quartets)
            return {**result, "value": result["b"] / result["a"]}

        if evaluate is None:
            def evaluate(done):
                return UNDECIDED

        decided, run.rounds = _run_rounds(workers, rng, round_fn, evaluate, deadline, rounds)
        return decided, run
    finally:
        workers.close()
        run.contention_after = contention()
        run.wall_s = time.monotonic() - started


def gate_stored_item(bench, system: str, plugins: tuple[str, ...], candidate: Side, stored: dict, normalize: str,
                     options: GateOptions, deadline: float, alpha: float,
                     confidence: float) -> tuple[ItemVerdict, ItemRun]:
    """One item against a stored baseline's normalised rounds."""
    rng = random.Random(f"{options.seed}:{bench.name}:{system}")
    verdict = ItemVerdict(bench.name, system, INCONCLUSIVE, "", bench.threshold)
    stored_values = [r["value"] for r in stored["rounds"]]

    def evaluate(rounds):
        return decide(stored_evidence(_by_block(rounds, lambda r: r["value"]), stored_values, confidence),
                      bench.threshold, alpha)

    try:
        decided, run = normalised_rounds(bench, system, plugins, candidate, normalize, options, rng,
                                         deadline=deadline, rounds=LOOKS[-1], evaluate=evaluate)
    except WorkerFailed as exc:
        verdict.verdict, verdict.reason = FAIL, f"the candidate failed: {exc}"
        return verdict, ItemRun(bench.name, system, error=str(exc))
    problems = compare_work(stored["work"], run.work["candidate"][0])
    if problems:
        verdict.verdict, verdict.reason, verdict.work_problems = FAIL, "the work changed", tuple(problems)
        return verdict, run
    evidence = stored_evidence(_by_block(run.rounds, lambda r: r["value"]), stored_values, confidence)
    verdict.verdict, verdict.evidence = decided, evidence
    verdict.fail_threshold = evidence.fail_threshold(bench.threshold)
    return verdict, run


def item_key(bench, system: str) -> str:
    return f"{bench.name}/{system}"


def run_gate(suite, sides: dict[str, Side], options: GateOptions, stored: dict | None = None,
             progress=print) -> tuple[list[ItemVerdict], list[ItemRun]]:
    """Every item of the suite, sequentially, sharing the budget; then the Holm correction."""
    from harness.gate_verdict import apply_holm

    items = suite.items()
    alpha = (1 - options.confidence) / len(items)  # Bonferroni while deciding; Holm at the end
    confidence = 1 - alpha
    verdicts, runs = [], []
    gate_started = time.monotonic()
    for n, (bench, system) in enumerate(items):
        left = options.budget_s - (time.monotonic() - gate_started)
        deadline = time.monotonic() + max(0.0, left) / (len(items) - n)
        if stored is None:
            verdict, run = gate_paired_item(bench, system, suite.system_plugins, sides["baseline"],
                                            sides["candidate"], options, deadline, alpha, confidence)
        else:
            key = item_key(bench, system)
            if key not in stored["items"]:
                verdict = ItemVerdict(bench.name, system, INCONCLUSIVE,
                                      "the stored baseline has no such item (rerun `moebench baseline`)",
                                      bench.threshold)
                run = ItemRun(bench.name, system)
            else:
                verdict, run = gate_stored_item(bench, system, suite.system_plugins, sides["candidate"],
                                                stored["items"][key], suite.normalize, options, deadline, alpha,
                                                confidence)
        verdicts.append(verdict)
        runs.append(run)
        progress(f"  {item_key(bench, system)}: {verdict.verdict} ({len(run.rounds) // BLOCKS} rounds per block, "
                 f"{run.wall_s:.0f} s)")
    apply_holm(verdicts, options.confidence)
    for verdict in verdicts:
        if verdict.verdict == INCONCLUSIVE and not verdict.reason:
            verdict.reason = "the time budget ran out before the interval decided"
        if verdict.verdict == PASS and not verdict.reason:
            verdict.reason = f"slowdown below {verdict.threshold:.0%} at the stated confidence"
        if verdict.verdict == FAIL and not verdict.reason:
            verdict.reason = (f"slower by at least the fail threshold {verdict.fail_threshold:.1%}, "
                              "confirmed by both blocks")
    return verdicts, runs


def gate_record(suite, verdicts: list[ItemVerdict], runs: list[ItemRun], baseline_text: str, exit_code: int,
                started, command_line: list[str]) -> dict:
    """The gate's results document: verdicts, every raw round and work record, machine and code."""
    from dataclasses import asdict

    from harness.environment import collect_environment, git_info
    from harness.gate_process import MOEBENCH_ROOT
    from harness.schema import new_run_id, utc_stamp

    return {
        "schema": "moebench-gate", "schema_version": 1, "run_id": new_run_id(started),
        "created_utc": utc_stamp(started),
        "command_line": command_line, "suite": suite.name, "suite_file": str(suite.path),
        "baseline": baseline_text, "exit_code": exit_code, "git": git_info(MOEBENCH_ROOT),
        "environment": collect_environment(),
        "method": {"blocks": BLOCKS, "looks": list(LOOKS), "confidence": suite.confidence,
                   "noise_multiple": 3.0,
                   "round": "quartets of randomised ABBA/BAAB single timed steps; each side's median"},
        "verdicts": [v.to_dict() for v in verdicts], "runs": [asdict(r) for r in runs],
    }


def write_gate_results(record: dict, out_dir: Path, summary_path: Path, summary: str) -> Path:
    """The results document (atomically) and the Markdown summary next to it."""
    from harness.files import write_json_atomic, write_text_atomic

    path = write_json_atomic(record, Path(out_dir) / f"gate-{record['run_id']}.json")
    write_text_atomic(summary, summary_path)
    return path
