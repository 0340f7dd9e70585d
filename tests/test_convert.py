"""`moebench convert` between moebench results documents and pytest-benchmark JSON files, on real files.

The fixtures make real inputs: a `moebench run` results document (debug flavour,
3 rounds of 2 steps), a pytest-benchmark file from a tiny pytest-benchmark test
(--benchmark-json with raw samples, --benchmark-autosave without), and an
autosave of benchmarks/test_gate_suite.py on a one-item debug suite. They run
concurrently, and pytest-benchmark's own compare path reads what we convert.
"""
from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, convert, schema
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

TINY_TEST = '''
import time

import pytest


@pytest.mark.parametrize("n", [1, 2])
def test_sleep(benchmark, n):
    benchmark.extra_info["n"] = n
    benchmark.pedantic(time.sleep, args=(0.001 * n,), rounds=5, warmup_rounds=1)


def test_sum(benchmark):
    benchmark.pedantic(sum, args=(range(1000),), rounds=7, iterations=3)
'''

TINY_SUITE = '''
[suite]
name = "tiny"

[[benchmark]]
name = "tiny-debug"
workload = "mixtral-8x7b"
flavor = "debug"
systems = ["tutel_native"]
warmup = 1
quartets = 1
'''


def _pytest_in(rootdir) -> list:
    """`python -m pytest` with its rootdir pinned: pytest guesses the rootdir from every existing path on
    the command line, a plugin option's value included, so a benchmark's fullname would otherwise depend
    on which files a concurrent run had already created."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={rootdir}"]


def _start(argv, cwd) -> subprocess.Popen:
    return subprocess.Popen([str(a) for a in argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The three real input files, produced concurrently."""
    tmp = tmp_path_factory.mktemp("convert")
    tiny = tmp / "tiny"
    tiny.mkdir()
    (tiny / "test_tiny.py").write_text(TINY_TEST)
    (tmp / "tiny_suite.toml").write_text(TINY_SUITE)
    py = sys.executable
    procs = {
        "run": _start([py, "-m", "harness", "run", "--workload", "mixtral-8x7b", "--flavor", "debug", "--systems",
                       "torch_reference", "--repeats", "3", "--steps", "2", "--warmup", "0", "--out", tmp / "results"],
                      REPO),
        "tiny": _start([*_pytest_in(tiny), "test_tiny.py", f"--benchmark-json={tmp / 'tiny.json'}",
                        "--benchmark-autosave", f"--benchmark-storage={tmp / 'tiny_store'}"], tiny),
        "gate": _start([*_pytest_in(REPO), "benchmarks/test_gate_suite.py",
                        f"--moebench-suite={tmp / 'tiny_suite.toml'}",
                        "--benchmark-autosave", f"--benchmark-storage={tmp / 'gate_store'}"], REPO),
    }
    done = {name: _ok(_finish(proc)) for name, proc in procs.items()}
    (results,) = sorted((tmp / "results").glob("*.json"))
    (tiny_autosave,) = sorted((tmp / "tiny_store").glob("*/0001_*.json"))
    (gate_autosave,) = sorted((tmp / "gate_store").glob("*/0001_*.json"))
    return {"dir": tmp, "tiny_dir": tiny, "results": results, "tiny_json": tmp / "tiny.json",
            "tiny_autosave": tiny_autosave, "gate_autosave": gate_autosave, "gate_stdout": done["gate"].stdout}


def _load(path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------- the suite's parametrisation

def test_gate_suite_parametrisation_is_one_test_per_item():
    from benchmarks.test_gate_suite import DEFAULT_SUITE, item_params

    suite = load_suite(DEFAULT_SUITE)
    params = item_params(DEFAULT_SUITE)
    assert [p.id for p in params] == [f"{b.name}/{s}" for b, s in suite.items()]
    assert [tuple(p.values) for p in params] == [(b.name, s) for b, s in suite.items()]
    assert len(params) == sum(len(b.systems) for b in suite.benchmarks) >= 1


# ----------------------------------------------------------------- ours -> theirs -> ours

def test_moebench_document_round_trip_keeps_samples_ids_and_medians(inputs):
    doc = _load(inputs["results"])
    theirs = convert.to_pytest_benchmark(copy.deepcopy(doc), "results.json")
    (trial,), (bench,) = doc["trials"], theirs["benchmarks"]
    assert bench["fullname"] == bench["name"] == bench["param"] == trial["id"]
    assert bench["stats"]["data"] == trial["samples_s"]
    assert bench["stats"]["median"] == pytest.approx(trial["summary"]["median"], rel=1e-12)
    assert bench["stats"]["rounds"] == len(trial["samples_s"]) == 6 and bench["stats"]["iterations"] == 1
    per_round = bench["extra_info"]["round_samples_s"]
    assert len(per_round) == 3 and all(len(r) == 2 for r in per_round)
    assert [statistics.median(r) for r in per_round] == pytest.approx(
        [r["median_s"] for r in trial["rounds"]], rel=1e-12)
    assert theirs["commit_info"]["id"] == doc["git"]["commit"]
    assert theirs["machine_info"][convert.ENV_KEY] == doc["environment"]
    assert theirs["converted_from"]["format"] == schema.SCHEMA_NAME and theirs["converted_from"]["lossy"]

    back = convert.to_moebench(json.loads(json.dumps(theirs)))
    assert back == doc  # everything, the samples and the per-round medians included
    schema.validate(back)


def test_trials_without_samples_are_listed_and_come_back(inputs):
    doc = _load(inputs["results"])
    failed = copy.deepcopy(doc["trials"][0])
    failed.update(id=failed["id"] + "-skipped", status="skipped", message="not here", samples_s=[], summary=None,
                  throughput=None, rounds=[])
    doc["trials"].append(failed)
    theirs = convert.to_pytest_benchmark(copy.deepcopy(doc))
    assert [b["fullname"] for b in theirs["benchmarks"]] == [doc["trials"][0]["id"]]
    assert theirs["converted_from"]["omitted_trials"] == [{"id": failed["id"], "status": "skipped",
                                                           "message": "not here"}]
    assert convert.to_moebench(theirs) == doc


# ----------------------------------------------------------------- theirs -> ours -> theirs

def test_pytest_benchmark_file_becomes_a_valid_document_and_comes_back(inputs):
    data = _load(inputs["tiny_json"])
    doc = convert.to_moebench(copy.deepcopy(data), "tiny.json")
    schema.validate(doc)
    assert [t["id"] for t in doc["trials"]] == [b["fullname"] for b in data["benchmarks"]]
    for trial, bench in zip(doc["trials"], data["benchmarks"], strict=True):
        assert trial["status"] == "ok"
        assert trial["samples_s"] == bench["stats"]["data"]
        assert trial["summary"]["median"] == pytest.approx(bench["stats"]["median"], rel=1e-12)
        assert trial["summary"]["n"] == bench["stats"]["rounds"]
        assert "placeholders" in " ".join(trial["converted_from"]["notes"])
    by_id = {t["id"]: t for t in doc["trials"]}
    assert any("mean of 3 iterations" in n for n in by_id["test_tiny.py::test_sum"]["converted_from"]["notes"])
    assert doc["converted_from"]["format"] == "pytest-benchmark" and doc["converted_from"]["lossy"]
    assert "environment.torch" in doc["converted_from"]["placeholders"]
    assert doc["environment"]["hostname"] == data["machine_info"]["node"]
    assert doc["created_utc"].startswith(data["datetime"][:19])

    back = convert.to_pytest_benchmark(json.loads(json.dumps(doc)))
    assert back["benchmarks"] == data["benchmarks"]  # stats recomputed from the samples: the same numbers
    assert {k: v for k, v in back.items() if k not in ("converted_from", convert.STASH)} == data


def test_autosave_without_raw_samples_converts_with_no_invented_numbers(inputs):
    data = _load(inputs["tiny_autosave"])
    assert all("data" not in b["stats"] for b in data["benchmarks"])
    doc = convert.to_moebench(copy.deepcopy(data))
    schema.validate(doc)
    for trial in doc["trials"]:
        assert trial["status"] == "skipped" and trial["samples_s"] == [] and trial["summary"] is None
        assert "--benchmark-save-data" in trial["message"]
    back = convert.to_pytest_benchmark(json.loads(json.dumps(doc)))
    assert back["benchmarks"] == data["benchmarks"]


def test_gate_suite_autosave_becomes_a_real_trial(inputs):
    """benchmarks/test_gate_suite.py: the item's test id, its group, the work channel and raw samples in the
    autosave (benchmarks/conftest.py adds them), and a converted trial with the real workload and environment."""
    data = _load(inputs["gate_autosave"])
    (bench,) = data["benchmarks"]
    assert bench["fullname"] == "benchmarks/test_gate_suite.py::test_gate_suite[tiny-debug/tutel_native]"
    assert bench["group"] == "tiny-debug"
    assert len(bench["stats"]["data"]) == bench["stats"]["rounds"] == 10  # ROUNDS_PER_QUARTET x quartets (1)
    work = bench["extra_info"]["work"]
    assert {"tokens_per_expert", "flops", "checksums", "dropped"} <= set(work)
    assert work["flops"] > 0 and work["checksums"]["output"]
    doc = convert.to_moebench(copy.deepcopy(data))
    schema.validate(doc)
    (trial,) = doc["trials"]
    assert trial["id"] == bench["fullname"]
    assert (trial["system"], trial["workload"], trial["flavor"]) == ("tutel_native", "mixtral-8x7b", "debug")
    assert trial["samples_s"] == bench["stats"]["data"]
    assert trial["flops"]["executed"] > 0 and trial["throughput"]["tokens_per_s"] > 0
    assert trial["work"] == work and trial["setup"]["steps"] == 10
    assert doc["environment"]["torch"] == data["machine_info"][convert.ENV_KEY]["torch"] != convert.UNKNOWN
    assert doc["method"]["warmup"] == 1 and doc["converted_from"]["placeholders"] == []
    assert convert.to_pytest_benchmark(json.loads(json.dumps(doc)))["benchmarks"] == data["benchmarks"]


# ----------------------------------------------------------------- pytest-benchmark reads what we write

def test_pytest_benchmark_reads_and_compares_against_converted_files(inputs):
    tmp, tiny = inputs["dir"], inputs["tiny_dir"]
    py = sys.executable
    # A moebench results document, converted by the CLI, shown by pytest-benchmark's own compare command.
    converted = tiny / "from_moebench.json"
    _ok(subprocess.run([py, "-m", "harness", "convert", inputs["results"], converted], cwd=REPO,
                       capture_output=True, text=True, timeout=TIMEOUT_S))
    # The tiny run's file through moebench and back, its samples 1000x faster or slower: a real
    # --benchmark-compare must then fail, or pass, on the median.
    doc = convert.to_moebench(_load(inputs["tiny_json"]))
    for name, factor in (("faster", 1e-3), ("slower", 1e3)):
        scaled = copy.deepcopy(doc)
        for trial in scaled["trials"]:
            trial["samples_s"] = [s * factor for s in trial["samples_s"]]
        (tiny / f"{name}.json").write_text(json.dumps(convert.to_pytest_benchmark(scaled)))
    compare = [*_pytest_in(tiny), "test_tiny.py", f"--benchmark-storage={tmp / 'compare_store'}",
               "--benchmark-compare-fail=median:10%"]
    shown = _start([py, "-m", "pytest_benchmark", "compare", converted.name, "--columns=median,rounds",
                    "--time-unit=ms"], tiny)
    faster = _start([*compare, "--benchmark-compare=faster.json"], tiny)
    slower = _start([*compare, "--benchmark-compare=slower.json"], tiny)
    shown, faster, slower = _finish(shown), _finish(faster), _finish(slower)

    trial = _load(inputs["results"])["trials"][0]
    assert _ok(shown).stdout.count(trial["id"]) == 1
    assert f"{trial['summary']['median'] * 1e3:,.4f}" in shown.stdout  # its median, in ms
    for run in (faster, slower):  # each test beside the converted file's entry for it
        assert run.stdout.count("(NOW)") == 3, run.stdout[-3000:]
    assert faster.returncode != 0, faster.stdout[-2000:]
    assert "Performance has regressed" in faster.stdout + faster.stderr
    assert "test_sleep[1]" in faster.stdout + faster.stderr
    _ok(slower)
    assert "Comparing against benchmarks from: slower.json" in slower.stdout + slower.stderr


# ----------------------------------------------------------------- the command line

def test_cli_bad_inputs_are_one_line_exit_2(inputs, tmp_path, capsys):
    results = inputs["results"]
    (tmp_path / "not.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "neither.json").write_text(json.dumps({"hello": "world"}))
    broken = _load(results)
    broken["trials"][0]["status"] = "bogus"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    (tmp_path / "nostats.json").write_text(json.dumps({"machine_info": {}, "benchmarks": [{"name": "a",
                                                                                           "fullname": "x::a"}]}))
    bad_spec = _load(inputs["tiny_json"])
    bad_spec["benchmarks"][0]["extra_info"] = {"moebench_spec": {"system": "tutel_native"}}
    (tmp_path / "bad_spec.json").write_text(json.dumps(bad_spec))
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out.json"
    cases = {
        "missing": ([tmp_path / "missing.json", out], "does not exist"),
        "not json": ([tmp_path / "not.json", out], "not valid JSON"),
        "a list": ([tmp_path / "list.json", out], "JSON list"),
        "neither": ([tmp_path / "neither.json", out], "neither a moebench results document"),
        "invalid moebench": ([tmp_path / "broken.json", out], "trials[0].status"),
        "no stats": ([tmp_path / "nostats.json", out], "benchmarks[0].stats"),
        "bad spec": ([tmp_path / "bad_spec.json", out], "extra_info.moebench_spec is not a trial spec"),
        "already": ([results, out, "--to", "moebench"], "already a moebench file"),
        "unwritable": ([results, tmp_path / "a_file" / "out.json"], "cannot write"),
    }
    # Four through a real `python -m harness convert` process, the rest through the same main() in this one
    # (each process imports torch: seconds apiece on a 2-core machine).
    in_process = ("invalid moebench", "no stats", "bad spec", "already", "unwritable")
    procs = {name: _start([sys.executable, "-m", "harness", "convert", *argv], REPO)
             for name, (argv, _) in cases.items() if name not in in_process}
    outcomes = {name: _finish(proc) for name, proc in procs.items()}
    for name in in_process:
        rc = cli.main(["convert", *(str(a) for a in cases[name][0])])
        captured = capsys.readouterr()
        outcomes[name] = subprocess.CompletedProcess([], rc, captured.out, captured.err)
    for name, done in outcomes.items():
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("moebench convert: error: "), (name, done.stderr)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()


def test_forced_direction_reads_the_input_as_the_other_format(inputs, tmp_path):
    out = tmp_path / "doc.json"
    to, doc = convert.convert_file(inputs["tiny_json"], out, to="moebench")
    assert to == "moebench" and schema.load(out)["trials"] == doc["trials"]
    to, theirs = convert.convert_file(out, tmp_path / "theirs.json", to="pytest-benchmark")
    assert to == "pytest-benchmark" and _load(tmp_path / "theirs.json") == theirs
