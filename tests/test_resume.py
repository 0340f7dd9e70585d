"""Runs that lose nothing: the journal, SIGTERM mid-run and --resume, a validation failure at the end,
`moebench rerun`, and the progress display.

The end-to-end test starts two real runs of the same plan at once: one is sent SIGTERM once its
journal holds two rounds and is then resumed; the other runs uninterrupted. Both must end with the
same trials, each with every round.
"""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import cli, journal, run_plan, runner, schema
from harness.progress import RunProgress, format_duration
from harness.trial_spec import TrialSpec

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3
RUN = ["run", "--workload", "mixtral-8x7b", "--flavor", "debug", "--systems", "torch_reference,tutel_native",
       "--repeats", str(REPEATS), "--steps", "1", "--warmup", "0", "--threads-per-rank", "1"]


def _harness(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _journal_rounds(out: Path) -> int:
    paths = list(out.glob(f"*{journal.SUFFIX}"))
    return len(paths[0].read_text().splitlines()) - 1 if paths else 0


def _results(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and an interrupted-then-resumed one, run side by side."""
    base = tmp_path_factory.mktemp("resume")
    whole, cut = base / "whole", base / "cut"
    uninterrupted = _harness([*RUN, "--out", whole])
    interrupted = _harness([*RUN, "--out", cut])
    deadline = time.monotonic() + 240
    while _journal_rounds(cut) < 2 and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    children = psutil.Process(interrupted.pid).children(recursive=True)
    interrupted.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    _, cut_err = interrupted.communicate(timeout=60)
    stop_s = time.monotonic() - stopped_at
    leftovers = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    kept = _journal_rounds(cut)
    (journal_file,) = cut.glob(f"*{journal.SUFFIX}")
    run_id = journal_file.name[: -len(journal.SUFFIX)]
    resumed = _harness(["run", "--resume", run_id, "--out", cut])
    resumed_out, resumed_err = resumed.communicate(timeout=300)
    whole_out, whole_err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, whole_err
    return {"whole": _results(whole), "cut": _results(cut), "cut_rc": interrupted.returncode, "cut_err": cut_err,
            "stop_s": stop_s, "leftovers": leftovers, "kept": kept, "run_id": run_id, "cut_dir": cut,
            "resumed_rc": resumed.returncode, "resumed_out": resumed_out, "resumed_err": resumed_err,
            "whole_dir": whole}


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_says_how_to_resume(runs):
    assert runs["cut_rc"] == 128 + signal.SIGTERM
    assert 2 <= runs["kept"] < 2 * REPEATS
    assert runs["leftovers"] == [] and runs["stop_s"] < 30
    (line,) = [ln for ln in runs["cut_err"].splitlines() if "interrupted" in ln]
    assert f"{runs['kept']} of {2 * REPEATS} planned rounds are kept" in line
    assert f"--resume {runs['run_id']}" in line


@pytest.mark.slow
def test_resumed_run_ends_with_the_trials_of_an_uninterrupted_one(runs):
    assert runs["resumed_rc"] == 0, runs["resumed_err"]
    whole, cut = runs["whole"], runs["cut"]
    assert cut["run_id"] == runs["run_id"]
    assert sorted(t["id"] for t in cut["trials"]) == sorted(t["id"] for t in whole["trials"])
    for trial in cut["trials"]:
        assert trial["status"] == "ok", trial["message"]
        assert [r["round"] for r in trial["rounds"]] == list(range(1, REPEATS + 1))
        assert len(trial["samples_s"]) == REPEATS and trial["check"]["passed"]
        assert trial["check"]["rounds_checked"] == list(range(1, REPEATS + 1))
    assert cut["method"]["order"]["per_round"] == whole["method"]["order"]["per_round"]
    orders = runner.round_orders(2, REPEATS, seed=0)  # both runs follow the seeded order, resumed or not
    for doc in (whole, cut):
        for i, trial in enumerate(doc["trials"]):
            assert [r["position"] for r in trial["rounds"]] == [order.index(i) for order in orders]
            sequences = [r * 2 + order.index(i) for r, order in enumerate(orders)]
            assert [r["sequence"] for r in trial["rounds"]] == sequences
            assert all(r["check_passed"] for r in trial["rounds"]) and trial["setup"]["input_pool"] >= 2
    assert cut["method"]["resumed"][0]["rounds_kept"] == runs["kept"]
    assert "resumed" not in whole["method"]
    assert not list(runs["cut_dir"].glob(f"*{journal.SUFFIX}"))  # written and valid: the journal is gone
    assert f"resuming {runs['run_id']}: {runs['kept']} finished rounds kept" in runs["resumed_err"]
    schema.validate(cut)


@pytest.mark.slow
def test_rerun_reproduces_a_trial_from_its_record(runs, tmp_path):
    (path,) = runs["whole_dir"].glob("*.json")
    original = next(t for t in runs["whole"]["trials"] if t["system"] == "tutel_native")
    rerun = _harness(["rerun", path, "tutel_native", "--repeats", "1", "--out", tmp_path])
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    again = _results(tmp_path)["trials"][0]
    assert again["id"] == original["id"]  # the same experiment, rebuilt from the record alone
    assert again["routing_stats"] == original["routing_stats"]
    assert again["check"]["checksum"] == original["check"]["checksum"]
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["trial id"].rstrip().endswith("same")
    assert rows["verified checksums"].rstrip().endswith("identical")


def test_resume_refuses_what_it_cannot_honour(runs, capsys):
    done = runs["run_id"]
    cases = [
        (["run", "--resume", "nosuchrun", "--out", str(runs["cut_dir"])], "no run 'nosuchrun' to resume"),
        (["run", "--resume", done, "--out", str(runs["cut_dir"])], "is complete already"),
        (["run", "--resume", done, "--repeats", "3"], "drop --repeats"),
        (["rerun", str(next(runs["whole_dir"].glob("*.json"))), "no_such_trial"], "no trial 'no_such_trial'"),
        (["rerun", str(next(runs["whole_dir"].glob("*.json"))), "mixtral"], "matches 2 trials"),
    ]
    for argv, fragment in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (argv, err)


# ----------------------------------------------------------------- the journal on its own

def _plan_with_rounds(out: Path, rounds_done: int) -> tuple[dict, journal.Journal]:
    """A one-trial plan whose journal already holds `rounds_done` finished rounds (no process runs)."""
    from core.values import MoEKnobs, ParallelSpec
    from workloads.flavors import get_workload

    workload = get_workload("mixtral-8x7b", "debug")
    spec = TrialSpec("torch_reference", workload, "layer", "forward_backward", "learned",
                     MoEKnobs(capacity_factor=workload.capacity_factor), ParallelSpec(threads_per_rank=1),
                     warmup=0, steps=2)
    plan = run_plan.new_plan([spec], {}, repeats=2, order_seed=0, warmup=0, steps=2, malloc="reuse", node_rank=0,
                             rdzv_endpoint=None, command_line=["moebench", "run"])
    book = journal.create(journal.journal_path(out, plan["run_id"]), plan)
    for r in range(rounds_done):
        book.append(0, r, {"status": "ok", "message": "", "samples_s": [0.01, 0.012], "per_rank_samples_s": None,
                           "calibration_before_s": 0.001, "calibration_after_s": 0.001, "wall_s": 1.5,
                           "exit_code": 0, "position": 0, "sequence": r})
    return plan, book


def test_torn_last_line_is_dropped_and_cut_off_by_the_next_append(tmp_path):
    _, book = _plan_with_rounds(tmp_path, 1)
    with open(book.path, "a") as f:
        f.write('{"trial": 0, "round": 1, "resu')  # killed mid-write
    again = journal.read(book.path)
    assert len(again.rounds) == 1 and len(again.warnings) == 1 and "torn last line" in again.warnings[0]
    again.append(0, 1, again.rounds[0]["result"])
    assert [e["round"] for e in journal.read(book.path).rounds] == [0, 1]
    assert journal.read(book.path).warnings == []


def test_a_journal_is_never_overwritten_and_a_foreign_file_is_refused(tmp_path):
    plan, book = _plan_with_rounds(tmp_path, 0)
    with pytest.raises(ValueError, match="exists already"):
        journal.create(book.path, plan)
    foreign = tmp_path / f"x{journal.SUFFIX}"
    foreign.write_text('{"benchmarks": []}\n')
    with pytest.raises(ValueError, match="not a moebench run journal"):
        journal.read(foreign)


def test_validation_failure_at_the_end_keeps_every_round_and_resume_writes_the_file(tmp_path, monkeypatch,
                                                                                      capsys):
    plan, book = _plan_with_rounds(tmp_path, 2)  # every planned round finished: nothing left to run

    def invalid(doc):
        raise schema.SchemaError("trials[0].status: injected by the test")

    monkeypatch.setattr(schema, "validate", invalid)
    outcome = run_plan.carry_out(plan, book, tmp_path, progress=io.StringIO())
    err = capsys.readouterr().err
    assert outcome.exit_code == 1 and outcome.results_path is None
    assert "internal error" in err and "injected by the test" in err and str(book.path) in err
    assert len(journal.read(book.path).rounds) == 2 and not list(tmp_path.glob("*.json"))
    monkeypatch.undo()
    assert cli.main(["run", "--resume", plan["run_id"], "--out", str(tmp_path)]) == 0
    doc = _results(tmp_path)
    assert doc["run_id"] == plan["run_id"] and doc["trials"][0]["samples_s"] == [0.01, 0.012, 0.01, 0.012]
    assert not book.path.exists()


def test_resume_on_another_setup_is_refused(tmp_path, capsys):
    plan, book = _plan_with_rounds(tmp_path, 1)
    lines = book.path.read_text().splitlines()
    header = json.loads(lines[0])
    header["fingerprint"]["torch"] = "0.0.1"
    book.path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert cli.main(["run", "--resume", plan["run_id"], "--out", str(tmp_path)]) == 2
    assert "started with torch '0.0.1'" in capsys.readouterr().err


# ----------------------------------------------------------------- progress

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_time_left_uses_each_trials_own_rounds():
    progress = RunProgress(6, io.StringIO(), live=False)
    progress.plan({0: 3, 1: 3})
    progress.finished(0, "a", "ok", 2.0)
    progress.finished(0, "a", "ok", 4.0)
    # trial 0: 1 round left at its own mean 3 s; trial 1: 3 rounds at the run's mean so far, 3 s
    assert progress.estimate_left_s() == pytest.approx(12.0)
    progress.stopped_early(1)
    assert progress.total == 3 and progress.estimate_left_s() == pytest.approx(3.0)
    assert format_duration(3725) == "1h02m05s" and format_duration(59.6) == "1m00s"


def test_plain_lines_without_a_terminal_and_a_live_bar_on_one():
    plain = io.StringIO()
    progress = RunProgress(2, plain)
    progress.plan({0: 2})
    progress.finished(0, "tutel_native x", "8.0 ms  check ok", 1.0)
    assert plain.getvalue().startswith("[1/2] tutel_native x ... 8.0 ms  check ok  (elapsed ")
    assert "about 0m01s left" in plain.getvalue()
    terminal = _Terminal()
    live = RunProgress(2, terminal)
    live.plan({0: 2})
    live.starting("tutel_native x")
    live.finished(0, "tutel_native x", "8.0 ms", 1.0)
    live.close()
    shown = terminal.getvalue()
    assert live.live and "[1/2] tutel_native x ... 8.0 ms" in shown and "1/2 rounds" in shown and "\r" in shown
