"""Results documents: validation names the broken path, writes are atomic, loads fail in one line;
the published JSON Schema (docs/results.schema.json) is what the models generate and agrees with them.

make_trial / make_document build documents by hand (no runner) and are
reused by the report tests.
"""
import copy
import functools
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

from harness import environment, results_model, schema
from harness.errors import UsageError
from harness.identity import trial_id
from harness.schema import SchemaError, load, validate, write_atomic
from harness.stats import summarize

METHOD = {"timer": "perf_counter", "warmup": 2, "steps": 5, "rounds": 2, "interleaved": True,
          "calibration": "1024^3 fp32 matmul before/after each trial", "notes": ""}
ENVIRONMENT = {"python": "3.11.7", "torch": "2.13.0", "packages": {"deepspeed": "0.19.8", "tutel": None},
               "platform": "Linux", "hostname": "box", "cpu_model": "Test CPU 9000", "cpu_count": 2,
               "torch_threads": 2, "gpu": None}


def make_trial(system="torch_reference", samples=(0.010, 0.011, 0.012), status="ok", workload="mixtral-8x7b",
               flavor="debug", level="layer", mode="forward_backward", routing="learned", world_size=1, ep=1,
               capacity_factor=1.25, dtype="float32", check_passed=True) -> dict:
    samples = [float(s) for s in samples] if status == "ok" else []
    trial = {
        "system": system, "workload": workload, "flavor": flavor, "level": level, "mode": mode, "routing": routing,
        "workload_spec": {"name": workload}, "parallel": {"world_size": world_size, "ep": ep, "tp": 1, "dp": 1},
        "knobs": {"capacity_factor": capacity_factor, "dtype": dtype, "device": "cpu", "seed": 0, "options": {}},
        "dtype": dtype, "seed": 0, "status": status, "message": "" if status == "ok" else f"{system} {status}",
        "samples_s": samples, "per_rank_samples_s": [samples] if samples else None,
        # One round per sample (each sample stands for a round's median), so paired statistics have rounds.
        "rounds": [{"round": i + 1, "status": status, "median_s": s, "calibration_before_s": 0.05,
                    "calibration_after_s": 0.051, "wall_s": 1.5} for i, s in enumerate(samples or [None])],
        "summary": summarize(samples) if samples else None,
        "throughput": None, "flops": {"executed": 2.0e9, "useful": 1.6e9}, "routing_stats": None,
        "phase_times_s": None,
        "check": None if check_passed is None else {"passed": check_passed, "max_rel_err_y": 1e-7,
                                                    "max_rel_err_dx": 1e-7, "counts_equal": True,
                                                    "tolerance": 1e-5, "note": ""},
        "peak_memory_bytes": None,
    }
    trial["id"] = trial_id(trial)
    return trial


def make_document(trials, run_id="20261129T000000Z-aaaaaa", created="2026-11-29T00:00:00Z",
                  commit="0123456789abcdef0123456789abcdef01234567", dirty=False, command_line=None) -> dict:
    return {
        "schema": schema.SCHEMA_NAME, "schema_version": schema.SCHEMA_VERSION, "run_id": run_id,
        "created_utc": created, "git": {"commit": commit, "dirty": dirty},
        "command_line": command_line or ["./moebench", "run", "--workload", "mixtral-8x7b"],
        "environment": copy.deepcopy(ENVIRONMENT), "method": dict(METHOD), "trials": list(trials),
    }


def valid_document():
    return make_document([make_trial(), make_trial(system="deepspeed_moe", status="skipped"),
                          make_trial(system="megatron_core", samples=(0.02, 0.021, 0.019, 0.5))])


def test_valid_document_round_trips(tmp_path):
    doc = valid_document()
    validate(doc)
    path = write_atomic(doc, tmp_path / "sub" / f"{doc['run_id']}.json")
    assert path.exists()
    assert load(path) == doc
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_trial_id_names_every_dimension():
    t = make_trial(system="deepspeed_moe", world_size=2, ep=2, capacity_factor=None, dtype="bfloat16", mode="forward")
    readable, digest = trial_id(t).split("#")
    assert readable == "deepspeed_moe/mixtral-8x7b/debug/layer/forward/learned/bfloat16/dropless/ws2-ep2"
    assert len(digest) == 12 and trial_id(t) == trial_id(copy.deepcopy(t))  # stable
    assert trial_id(make_trial(capacity_factor=1.25)).split("#")[0].endswith("/float32/cf1.25/ws1-ep1")


def corrupt(mutate):
    doc = valid_document()
    mutate(doc)
    return doc


CORRUPTIONS = [
    (lambda d: d["trials"][2].update(status="bogus"), "trials[2].status: 'bogus' is not one of ok, skipped"),
    (lambda d: d["trials"][0].update(level="cluster"), "trials[0].level: 'cluster' is not one of layer, model"),
    (lambda d: d["trials"][0].update(mode="inference"), "trials[0].mode: 'inference' is not one of"),
    (lambda d: d["trials"][0].update(routing="random"), "trials[0].routing: 'random' is not one of"),
    (lambda d: d["trials"][0].pop("mode"), "trials[0]: missing required key 'mode'"),
    (lambda d: d["trials"][0]["samples_s"].__setitem__(1, -0.5), "trials[0].samples_s[1]: sample must be"),
    (lambda d: d["trials"][0]["samples_s"].__setitem__(0, float("nan")), "trials[0].samples_s[0]"),
    (lambda d: d["trials"][0]["samples_s"].__setitem__(0, "fast"), "trials[0].samples_s[0]"),
    (lambda d: d["trials"][0].update(summary=None), "trials[0].summary: status is ok but summary is null"),
    (lambda d: d["trials"][0]["summary"].pop("iqr"), "trials[0].summary: missing required key 'iqr'"),
    (lambda d: d["trials"][0]["summary"].update(n=7), "trials[0].summary.n: 7 does not match the 3 samples"),
    (lambda d: d["trials"][0].update(seed=True), "trials[0].seed: expected int, got bool"),
    (lambda d: d["trials"][0]["check"].update(passed="yes"), "trials[0].check.passed: expected bool"),
    (lambda d: d["trials"][0]["rounds"][0].pop("wall_s"), "trials[0].rounds[0]: missing required key 'wall_s'"),
    (lambda d: d["trials"][0]["parallel"].pop("ep"), "trials[0].parallel: missing required key 'ep'"),
    (lambda d: d["trials"][1].update(id=d["trials"][0]["id"]), "trials[1].id: "),
    (lambda d: d["environment"].update(cpu_count="2"), "environment.cpu_count: expected int, got str"),
    (lambda d: d["environment"]["packages"].update(torch=2), "environment.packages.torch: expected str or null"),
    (lambda d: d["method"].pop("warmup"), "method: missing required key 'warmup'"),
    (lambda d: d["git"].update(dirty="no"), "git.dirty: expected bool or null"),
    (lambda d: d["command_line"].append(3), "command_line[4]: expected str"),
    (lambda d: d.update(schema_version=2), "schema_version 2 is newer than this harness reads (1)"),
    (lambda d: d.update(schema_version=0), "schema_version: unsupported version 0 (this harness reads 1)"),
    (lambda d: d.update(schema_version="1"), "schema_version: unsupported version '1'"),
    (lambda d: d.update(schema="something.else"), "schema: expected 'moebench.results'"),
    (lambda d: d.update(trials={}), "document.trials: expected list, got dict"),
    (lambda d: d.pop("trials"), "document: missing required key 'trials'"),
    (lambda d: d["trials"][0].update(status="interrupted"), "trials[0].status: 'interrupted' is not one of"),
    (lambda d: d["trials"][0].update(status=None), "trials[0].status: expected str, got null"),
    (lambda d: d["trials"][0].update(samples_s=[], per_rank_samples_s=None),
     "trials[0].samples_s: status is ok but there are no samples"),
    (lambda d: d["trials"][0].update(per_rank_samples_s=[[0.01, True]]), "trials[0].per_rank_samples_s[0][1]: sample"),
    (lambda d: d["trials"][0]["rounds"][0].update(median_s="1"), "trials[0].rounds[0].median_s: expected number or"),
    (lambda d: d["trials"][0]["flops"].update(useful=False), "trials[0].flops.useful: expected number or null, got"),
    (lambda d: d["trials"][0].update(phase_times_s={"fwd": None}), "trials[0].phase_times_s.fwd: expected number, got"),
    (lambda d: d["trials"][0].update(routing_stats=[]), "trials[0].routing_stats: expected dict or null, got list"),
    (lambda d: d["trials"][0].update(peak_memory_bytes=1.5), "trials[0].peak_memory_bytes: expected int or null"),
    (lambda d: d["trials"].append([]), "trials[3]: expected dict, got list"),
    (lambda d: d.update(git=None), "document.git: expected dict, got null"),
    (lambda d: d["git"].pop("commit"), "git: missing required key 'commit'"),
    (lambda d: d.update(schema_version=None), "schema_version: unsupported version None"),
    (lambda d: d.pop("schema"), "schema: expected 'moebench.results', got None"),
]


@pytest.mark.parametrize("mutate, message", CORRUPTIONS)
def test_each_corruption_names_its_path(mutate, message):
    with pytest.raises(SchemaError) as info:
        validate(corrupt(mutate))
    assert str(info.value).startswith(message)  # the path comes first
    assert "\n" not in str(info.value)


def test_non_ok_trial_may_have_no_samples_or_summary():
    doc = make_document([make_trial(status="oom"), make_trial(system="x", status="error"),
                         make_trial(system="y", status="too_large")])  # the memory guard refused to launch it
    validate(doc)


def test_extra_keys_are_allowed_everywhere():
    """A newer writer may add fields; this harness must still read the document."""
    doc = valid_document()
    doc["new_top_level"] = {"x": 1}
    doc["git"]["branch"] = "main"
    doc["environment"]["numa"] = [0, 1]
    doc["trials"][0]["plugins"] = ["my_moe_plugin.py"]
    doc["trials"][0]["summary"]["p99"] = 0.5
    doc["trials"][0]["rounds"][0]["load"] = {"loadavg": 0.1}
    validate(doc)


def test_schema_error_is_not_bad_input():
    """A document that fails validation at the end of a run is the harness's bug, not the user's input."""
    assert not issubclass(SchemaError, ValueError)
    assert issubclass(schema.NewerVersionError, SchemaError)
    with pytest.raises(schema.NewerVersionError):
        validate(corrupt(lambda d: d.update(schema_version=7)))


def test_failed_write_leaves_no_partial_or_temp_file(tmp_path):
    doc = valid_document()
    doc["trials"][0]["knobs"]["options"] = {"not json": {1, 2}}  # a set cannot be serialised
    target = tmp_path / "run.json"
    with pytest.raises(TypeError):
        write_atomic(doc, target)
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    first = valid_document()
    write_atomic(first, target)
    before = target.read_bytes()

    def crash(fd):
        raise OSError("disk fell off")

    monkeypatch.setattr(os, "fsync", crash)
    second = valid_document()
    second["run_id"] = "20261129T000001Z-bbbbbb"
    with pytest.raises(OSError, match="disk fell off"):
        write_atomic(second, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_invalid_document_is_not_written(tmp_path):
    doc = corrupt(lambda d: d["trials"][0].update(status="bogus"))
    with pytest.raises(SchemaError):
        write_atomic(doc, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": "moebench.results",\n "trials": [')
    with pytest.raises(UsageError, match=r"broken.json is not valid JSON \(line 2"):
        load(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(corrupt(lambda d: d["trials"][0].update(status="bogus"))))
    with pytest.raises(UsageError) as info:
        load(wrong)
    assert "wrong.json" in str(info.value) and "trials[0].status" in str(info.value)
    assert "\n" not in str(info.value)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(corrupt(lambda d: d.update(schema_version=2))))
    with pytest.raises(UsageError, match=r"newer.json was written by a newer moebench: schema_version 2 is newer "
                                         r"than this harness reads \(1\)"):
        load(newer)


def test_run_ids_sort_by_time_and_differ():
    ids = {schema.new_run_id() for _ in range(20)}
    assert len(ids) == 20
    for run_id in ids:
        stamp, _, suffix = run_id.partition("-")
        assert len(stamp) == 16 and stamp.endswith("Z") and len(suffix) == 6
        int(suffix, 16)


def test_new_document_fills_environment_and_validates():
    doc = schema.new_document(["moebench", "run"], METHOD, [make_trial()])
    validate(doc)
    env = doc["environment"]
    assert env["cpu_count"] >= 1 and env["torch_threads"] >= 1 and env["torch"]
    assert set(env["packages"]) >= {"deepspeed", "megatron-core", "tutel", "pandas", "numpy"}
    assert doc["created_utc"].endswith("Z") and doc["run_id"][:8] == doc["created_utc"][:10].replace("-", "")


def test_package_version_is_none_when_absent():
    assert environment.package_version("surely-not-installed-moebench-pkg") is None
    assert environment.package_version("pytest")


def test_cpu_model_reads_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\n\nprocessor\t: 1\n")
    assert environment.cpu_model(str(cpuinfo)) == "Example CPU @ 2.0GHz"


def test_git_info_outside_a_repo_is_null(tmp_path):
    assert environment.git_info(tmp_path) == {"commit": None, "dirty": None}


def test_git_info_reports_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    info = environment.git_info(tmp_path)
    assert len(info["commit"]) == 40 and info["dirty"] is False
    (tmp_path / "a.txt").write_text("two")
    assert environment.git_info(tmp_path) == {"commit": info["commit"], "dirty": True}


def test_git_dirty_means_changed_tracked_files_not_new_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    (tmp_path / "results.json").write_text("{}")  # a new results file: the code is still clean
    assert environment.git_info(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    info = environment.git_info(tmp_path)
    assert info["dirty"] is True and len(info["commit"]) == 40


# ---------------------------------------------------------------- the published JSON Schema

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs" / "results.schema.json"


@functools.cache
def published_validator():
    schema_doc = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema_doc)
    return jsonschema.Draft202012Validator(schema_doc)


def repository_results_files() -> list[Path]:
    """Results documents committed to the repository: every results/*.json, and any other committed
    JSON file under results/ or reports/ that says it is one (gate records and baselines are not)."""
    listed = subprocess.run(["git", "ls-files", "results", "reports"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    found = []
    for name in listed:
        path = REPO / name
        if path.suffix != ".json":
            continue
        if path.parent == REPO / "results":
            found.append(path)  # a run's own file: it must be a results document
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # not JSON, so not a results document
            continue
        if isinstance(data, dict) and data.get("schema") == schema.SCHEMA_NAME:
            found.append(path)
    return found


def test_published_schema_is_what_the_models_generate():
    """Regenerate with `python -m harness.results_model --write` after changing a model."""
    assert PUBLISHED.read_text(encoding="utf-8") == results_model.json_schema_text()
    generated = results_model.json_schema()
    assert generated["description"].startswith("One moebench run")
    assert "too_large" in generated["$defs"]["Trial"]["properties"]["status"]["enum"]


def test_write_command_rewrites_the_schema_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "results.schema.json"
    target.write_text("stale")
    monkeypatch.setattr(results_model, "SCHEMA_FILE", target)
    assert results_model.main(["--write"]) == 0
    assert target.read_text(encoding="utf-8") == PUBLISHED.read_text(encoding="utf-8")
    assert str(target) in capsys.readouterr().out


@pytest.mark.parametrize("path", repository_results_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_repository_results_validate_both_ways(path):
    doc = json.loads(path.read_text(encoding="utf-8"))
    validate(doc)
    published_validator().validate(doc)


def test_hand_built_documents_validate_both_ways():
    validator = published_validator()
    for doc in (valid_document(), make_document([make_trial(status="too_large")]), make_document([])):
        validate(doc)
        validator.validate(doc)


BROKEN = [
    ("wrong status", lambda d: d["trials"][0].update(status="bogus")),
    ("string sample", lambda d: d["trials"][0]["samples_s"].__setitem__(0, "0.01")),
    ("no trials key", lambda d: d.pop("trials")),
]


@pytest.mark.parametrize("mutate", [m for _, m in BROKEN], ids=[name for name, _ in BROKEN])
def test_broken_documents_fail_both_ways(mutate):
    """The published schema is not vacuous: what the harness rejects, a plain JSON Schema validator rejects too."""
    doc = corrupt(mutate)
    with pytest.raises(SchemaError):
        validate(doc)
    assert not published_validator().is_valid(doc)


# Rules a JSON Schema cannot state (documented in its description), and a value JSON cannot hold.
NOT_IN_JSON_SCHEMA = ("summary.n: 7 does not match", "trials[1].id: ", "got nan")


@pytest.mark.parametrize("mutate, message", CORRUPTIONS)
def test_published_schema_rejects_what_validate_rejects(mutate, message):
    """Every corruption above fails the JSON Schema too, except the known gaps, which pass it."""
    doc = corrupt(mutate)
    with pytest.raises(SchemaError) as info:
        validate(doc)
    harness_only = any(text in str(info.value) for text in NOT_IN_JSON_SCHEMA)
    assert published_validator().is_valid(doc) == harness_only, info.value
