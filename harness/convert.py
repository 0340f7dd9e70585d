"""Converting between moebench results documents and pytest-benchmark JSON files (`moebench convert`).

One moebench trial is one pytest-benchmark benchmark, and the other way round:

* ours -> theirs: the trial id becomes the benchmark's fullname, name and param,
  so a converted file is matched by id in ``--benchmark-compare``. The group is
  the trial's work (its id without the system, with the work key), so systems
  that ran the same work share a group. ``stats.data`` is the trial's raw
  samples (every step of every successful round), and the statistics are
  pytest-benchmark's own (its ``Stats`` class on those samples). The whole
  trial record, apart from the samples, travels in ``extra_info["moebench_trial"]``
  together with the per-round samples and medians, so converting back gives
  the trial again. Trials without samples (skipped, failed) cannot be
  pytest-benchmark benchmarks; they are listed under ``converted_from`` and kept
  in the top-level ``"moebench"`` entry, which pytest-benchmark ignores.
* theirs -> ours: the benchmark's fullname becomes the trial id and
  ``stats.data`` the samples. The whole pytest session was one process, so each
  trial has one round. A benchmark of ``benchmarks/test_gate_suite.py`` carries
  its trial spec and work channel in ``extra_info``, and its trial is built from
  them (workload, knobs, FLOPs, routing); any other benchmark's moebench fields
  are placeholders, listed in the trial's ``converted_from.placeholders``. The
  original benchmark entry (without ``stats.data``) and the file's
  ``machine_info``, ``commit_info``, ``datetime`` and ``version`` are kept under
  ``"pytest_benchmark"``, so converting back gives the original file again.

Nothing is invented silently: every field a conversion could not fill from the
input is named in the output's ``converted_from`` note.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import statistics

from harness import files, schema
from harness.errors import UsageError
from harness.identity import stable_hash

MOEBENCH = "moebench"
PYTEST_BENCHMARK = "pytest-benchmark"
FORMATS = (PYTEST_BENCHMARK, MOEBENCH)

STASH = "moebench"  # in a pytest-benchmark file: top level and extra_info["moebench_trial"]
PB_STASH = "pytest_benchmark"  # in a moebench document: top level and per trial
TRIAL_KEY = "moebench_trial"
SPEC_KEY = "moebench_spec"  # extra_info of benchmarks/test_gate_suite.py
ENV_KEY = "moebench_environment"  # machine_info added by benchmarks/conftest.py
UNKNOWN = "unknown"
STAT_FIELDS = ("min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", "iqr_outliers",
               "stddev_outliers", "outliers", "ld15iqr", "hd15iqr", "ops", "total")
NUMERIC_STATS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ops", "total")


# ----------------------------------------------------------------- reading

def read_json(path) -> dict:
    """The JSON object in `path`; any problem is one UsageError line naming the file."""
    data = files.read_json(path, "input file")
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, neither a moebench results document nor a "
                         "pytest-benchmark file (both are JSON objects)")
    return data


def detect_format(data: dict) -> str | None:
    """MOEBENCH, PYTEST_BENCHMARK, or None for neither."""
    if data.get("schema") == schema.SCHEMA_NAME:
        return MOEBENCH
    if isinstance(data.get("benchmarks"), list) and ("machine_info" in data or "version" in data):
        return PYTEST_BENCHMARK
    return None


def _fail(where: str, message: str):
    raise UsageError(f"not a readable pytest-benchmark file: {where}: {message}")


def check_pytest_benchmark(data: dict) -> None:
    """What the conversion relies on, each problem one line naming the place (benchmarks[2].stats.median)."""
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list):
        _fail("benchmarks", "missing, or not a list")
    for key in ("machine_info", "commit_info"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            _fail(key, f"expected an object, got {type(data[key]).__name__}")
    seen: dict[str, int] = {}
    for i, bench in enumerate(benchmarks):
        where = f"benchmarks[{i}]"
        if not isinstance(bench, dict):
            _fail(where, f"expected an object, got {type(bench).__name__}")
        for key in ("name", "fullname"):
            if not isinstance(bench.get(key), str) or not bench[key]:
                _fail(f"{where}.{key}", "missing, or not a non-empty string")
        if bench["fullname"] in seen:
            _fail(f"{where}.fullname", f"{bench['fullname']!r} repeats benchmarks[{seen[bench['fullname']]}]")
        seen[bench["fullname"]] = i
        if bench.get("extra_info") is not None and not isinstance(bench["extra_info"], dict):
            _fail(f"{where}.extra_info", "not an object")
        stats = bench.get("stats")
        if not isinstance(stats, dict):
            _fail(f"{where}.stats", "missing, or not an object")
        for key in ("median", "rounds"):
            if not schema.is_num(stats.get(key)):
                _fail(f"{where}.stats.{key}", f"missing, or not a number (got {stats.get(key)!r:.40})")
        data_ = stats.get("data")
        if data_ is not None:
            if not isinstance(data_, list):
                _fail(f"{where}.stats.data", "not a list")
            for j, v in enumerate(data_):
                if not schema.is_num(v) or not v > 0 or v == float("inf"):
                    _fail(f"{where}.stats.data[{j}]", f"a sample must be a finite positive number, got {v!r}")


# ----------------------------------------------------------------- ours -> theirs

def pytest_benchmark_stats(samples: list[float]) -> dict:
    """pytest-benchmark's statistics of `samples`, computed by pytest-benchmark itself."""
    try:
        from pytest_benchmark.stats import Stats
    except ImportError:
        raise UsageError("converting to pytest-benchmark needs the pytest-benchmark package "
                         "(it is in requirements/cpu.txt)") from None
    stats = Stats()
    for value in samples:
        stats.update(value)
    return stats.as_dict()


def _pytest_benchmark_version() -> str:
    try:
        from pytest_benchmark import __version__
    except ImportError:
        return UNKNOWN
    return __version__


def _trial_group(trial: dict) -> str:
    """The trial's work: its id without the system part, tagged with the work key."""
    from harness.identity import work_key

    knobs = trial.get("knobs") or {}
    cf = knobs.get("capacity_factor")
    parallel = trial["parallel"]
    parts = [trial["workload"], trial["flavor"], trial["level"], trial["mode"], trial["routing"], trial["dtype"],
             "dropless" if cf is None else f"cf{cf:g}" if isinstance(cf, int | float) else str(cf),
             f"ws{parallel['world_size']}-ep{parallel['ep']}"]
    return "/".join(str(p) for p in parts) + "#" + (trial.get("work_key") or work_key(trial))


def round_samples(trial: dict, steps: int) -> list[list[float]] | None:
    """The samples of each successful round (samples_s pools them in round order), when they split evenly."""
    ok = [r for r in trial["rounds"] if r.get("status") == "ok"]
    samples = trial["samples_s"]
    if not ok or steps <= 0 or len(samples) != steps * len(ok):
        return None
    return [samples[i * steps:(i + 1) * steps] for i in range(len(ok))]


def _stashed_benchmark(trial: dict) -> dict | None:
    """The original pytest-benchmark entry of a trial converted from one, else None."""
    stash = trial.get(PB_STASH)
    return stash if isinstance(stash, dict) and isinstance(stash.get("stats"), dict) else None


def _benchmark_from_trial(trial: dict, method: dict) -> dict:
    samples = list(trial["samples_s"])
    stash = _stashed_benchmark(trial)
    if stash is not None:  # it came from pytest-benchmark: the original entry, with the samples as its data
        entry = copy.deepcopy(stash)
        if samples:  # the same numbers as the original's for the same data (pytest-benchmark's Stats)
            entry["stats"].update(pytest_benchmark_stats(samples), data=samples)
        return entry
    from harness.identity import system_label

    record = {k: v for k, v in trial.items() if k != "samples_s"}
    stats = pytest_benchmark_stats(samples)
    return {
        "group": _trial_group(trial),
        "name": trial["id"],
        "fullname": trial["id"],
        "params": {"system": system_label(trial), "workload": f"{trial['workload']}/{trial['flavor']}",
                   "level": trial["level"], "mode": trial["mode"]},
        "param": trial["id"],
        "extra_info": {
            TRIAL_KEY: record,
            "round_medians_s": [r.get("median_s") for r in trial["rounds"]],
            "round_samples_s": round_samples(trial, int(method.get("steps") or 0)),
        },
        "options": {"timer": trial.get("timer") or method.get("timer"), "warmup": bool(method.get("warmup")),
                    "warmup_steps": method.get("warmup"), "steps_per_round": method.get("steps"),
                    "rounds": len(trial["rounds"]), "source": "moebench"},
        "stats": {**stats, "data": samples, "iterations": 1},
    }


def _iso_utc(created_utc: str) -> str:
    """moebench's "...Z" UTC time as the +00:00 ISO form pytest-benchmark writes."""
    try:
        return dt.datetime.fromisoformat(created_utc.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return created_utc


def _machine_info(env: dict) -> dict:
    """pytest-benchmark's machine_info from what a moebench environment records; the rest stays out."""
    return {
        "node": env.get("hostname"),
        "python_version": env.get("python"),
        "python_implementation_version": env.get("python"),
        "platform": env.get("platform"),
        "cpu": {"brand_raw": env.get("cpu_model"), "count": env.get("cpu_count")},
        ENV_KEY: env,
    }


def _commit_info(git: dict) -> dict:
    return {"id": git.get("commit") or "unversioned", "time": git.get("time"), "author_time": None,
            "dirty": bool(git.get("dirty")), "project": "moebench", "branch": git.get("branch") or "(unknown)",
            "moebench_git": git}


def to_pytest_benchmark(doc: dict, source: str = "") -> dict:
    """A pytest-benchmark JSON file's content from a moebench results document."""
    try:
        schema.validate(doc)
    except schema.SchemaError as exc:
        raise UsageError(f"not a valid moebench results document: {exc}") from None
    method = doc["method"]
    benchmarks, omitted = [], []
    for trial in doc["trials"]:
        (benchmarks if trial["samples_s"] or _stashed_benchmark(trial) else omitted).append(trial)
    benchmarks = [_benchmark_from_trial(t, method) for t in benchmarks]
    restored = doc.get(PB_STASH) if isinstance(doc.get(PB_STASH), dict) else None
    lossy = [
        "pytest-benchmark has no rounds in fresh processes: stats.data pools every timed step of every "
        "successful round; the per-round medians and samples are in extra_info (round_medians_s, round_samples_s)",
        "q1, q3, iqr, outliers, ld15iqr and hd15iqr are pytest-benchmark's definitions (its Stats class), not "
        "moebench's (numpy linear quantiles; the moebench summary is in extra_info.moebench_trial.summary)",
        "machine_info holds only what moebench records (node, Python, platform, CPU model and count); the full "
        f"environment is machine_info.{ENV_KEY}",
        "the moebench fields of each trial (workload, knobs, check, routing, FLOPs, rounds) are in "
        f"extra_info.{TRIAL_KEY}; pytest-benchmark does not read them",
    ]
    restored_count = sum(1 for t in doc["trials"] if _stashed_benchmark(t) is not None)
    if restored_count:
        lossy.append(f"{restored_count} benchmark(s) came from pytest-benchmark: their original entries are restored, "
                     "the statistics recomputed from the samples by pytest-benchmark (the same numbers for the same "
                     "data)")
    if omitted:
        lossy.append(f"{len(omitted)} trial(s) without samples are not pytest-benchmark benchmarks; they are "
                     "kept under \"moebench\".omitted_trials")
    out = {
        "machine_info": copy.deepcopy(restored["machine_info"]) if restored and "machine_info" in restored
        else _machine_info(doc["environment"]),
        "commit_info": copy.deepcopy(restored["commit_info"]) if restored and "commit_info" in restored
        else _commit_info(doc["git"]),
        "benchmarks": benchmarks,
        "datetime": restored["datetime"] if restored and "datetime" in restored else _iso_utc(doc["created_utc"]),
        "version": restored["version"] if restored and "version" in restored else _pytest_benchmark_version(),
    }
    if restored:  # any other top-level keys the original pytest-benchmark file had
        for key, value in restored.items():
            out.setdefault(key, copy.deepcopy(value))
    out["converted_from"] = {
        "format": schema.SCHEMA_NAME, "schema_version": doc["schema_version"], "run_id": doc["run_id"],
        "source": source, "benchmarks": len(benchmarks),
        "omitted_trials": [{"id": t["id"], "status": t["status"], "message": t["message"]} for t in omitted],
        "lossy": lossy,
    }
    out[STASH] = {"document": {k: v for k, v in doc.items() if k != "trials"}, "omitted_trials": omitted}
    return out


# ----------------------------------------------------------------- theirs -> ours

def _parse_time(value) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _environment(machine_info: dict, placeholders: list[str]) -> dict:
    if isinstance(machine_info.get(ENV_KEY), dict):  # saved by benchmarks/conftest.py: the real record
        return copy.deepcopy(machine_info[ENV_KEY])
    cpu = machine_info.get("cpu") if isinstance(machine_info.get("cpu"), dict) else {}

    def known(value, key, default):
        if value is None or value == "":
            placeholders.append(f"environment.{key}")
            return default
        return value

    platform = "-".join(str(machine_info[k]) for k in ("system", "release", "machine") if machine_info.get(k))
    count = cpu.get("count")
    placeholders.extend(["environment.torch", "environment.packages", "environment.torch_threads"])
    return {
        "python": known(machine_info.get("python_version"), "python", UNKNOWN),
        "torch": UNKNOWN, "packages": {},
        "platform": known(platform or machine_info.get("platform"), "platform", UNKNOWN),
        "hostname": known(machine_info.get("node"), "hostname", UNKNOWN),
        "cpu_model": known(cpu.get("brand_raw") or machine_info.get("processor"), "cpu_model", UNKNOWN),
        "cpu_count": known(count if schema.is_int(count) else None, "cpu_count", 0),
        "torch_threads": 0, "gpu": None,
    }


def _git(commit_info: dict) -> dict:
    commit = commit_info.get("id")
    dirty = commit_info.get("dirty")
    git = {"commit": commit if isinstance(commit, str) and commit not in ("unversioned", "unknown", "") else None,
           "dirty": dirty if isinstance(dirty, bool) else None}
    if isinstance(commit_info.get("moebench_git"), dict):  # it was ours to begin with
        git = {**commit_info["moebench_git"], **{k: v for k, v in git.items() if k not in commit_info["moebench_git"]}}
    for key in ("branch", "project", "time"):
        if commit_info.get(key) is not None:
            git.setdefault(key, commit_info[key])
    return git


def _one_round(samples: list[float], wall_s: float, timer) -> dict:
    return {"status": "ok", "message": "", "samples_s": samples, "per_rank_samples_s": None,
            "calibration_before_s": None, "calibration_after_s": None, "wall_s": wall_s, "timer": timer}


def _wall_s(bench: dict, samples: list[float]) -> tuple[float, bool]:
    """(the round's wall time, whether it is only the timed part)."""
    extra = bench.get("extra_info") or {}
    if schema.is_num(extra.get("wall_s")):
        return float(extra["wall_s"]), False
    stats = bench["stats"]
    iterations = stats.get("iterations") if schema.is_int(stats.get("iterations")) else 1
    return float(sum(samples)) * iterations, True


def _trial_from_suite(bench: dict, samples: list[float], notes: list[str]) -> dict:
    """A benchmarks/test_gate_suite.py benchmark: the real trial record from its spec and work channel."""
    from harness.identity import work_key
    from harness.runner import trial_record
    from harness.trial_spec import TrialSpec

    extra = bench["extra_info"]
    try:
        spec = TrialSpec.from_dict(extra[SPEC_KEY])
        spec.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"benchmark {bench['fullname']!r}: extra_info.{SPEC_KEY} is not a trial spec this "
                         f"moebench reads ({type(exc).__name__}: {exc})") from None
    if samples and len(samples) != spec.steps:  # what this round timed (pytest-benchmark's rounds)
        notes.append(f"setup.steps is the {len(samples)} steps pytest-benchmark timed (the suite's benchmark "
                     f"times {spec.steps} steps per side per round)")
        spec = spec.with_changes(steps=len(samples))
    wall, timed_only = _wall_s(bench, samples)
    result = {**_one_round(samples, wall, (bench.get("options") or {}).get("timer")),
              "flops": extra.get("flops"), "tokens_per_step": extra.get("tokens_per_step"),
              "routing_stats": extra.get("routing_stats"), "threads": extra.get("threads"),
              "threads_measured": extra.get("threads_measured")}
    if not samples:
        result.update(status="skipped", samples_s=[])
    record = trial_record(spec, [result])
    if schema.is_int(extra.get("threads")):  # measured where it ran, not planned where it is converted
        record["setup"]["threads_per_rank"] = extra["threads"]
        record["work_key"] = work_key(record)
    record["work"] = extra.get("work")
    record["suite"] = {k: extra.get(k) for k in ("suite", "benchmark")}
    if timed_only:
        notes.append("rounds[0].wall_s is the sum of the timed samples")
    return record


def _placeholder_trial(bench: dict, samples: list[float], notes: list[str]) -> dict:
    """Any other pytest-benchmark benchmark: moebench fields it does not have are placeholders, named."""
    from harness.stats import summarize

    name = bench["name"]
    workload = bench.get("group") or name.split("[")[0]
    wall, timed_only = _wall_s(bench, samples)
    rounds = [{"round": 1, "status": "ok", "median_s": statistics.median(samples),
               "calibration_before_s": None, "calibration_after_s": None, "wall_s": wall}] if samples else []
    if timed_only and samples:
        notes.append("rounds[0].wall_s is the sum of the timed samples")
    notes.append("placeholders (pytest-benchmark has no such field): level, mode, routing, dtype, seed, parallel, "
                 "knobs; system is the benchmark's name, workload its group (or test function)")
    return {
        "system": name, "workload": str(workload), "flavor": PYTEST_BENCHMARK,
        "level": "layer", "mode": "forward", "routing": "none",
        "workload_spec": {"name": str(workload), "flavor": PYTEST_BENCHMARK, "fullname": bench["fullname"],
                          "params": bench.get("params")},
        "parallel": {"world_size": 1, "ep": 1}, "knobs": {"capacity_factor": None, "dtype": UNKNOWN,
                                                          "device": None, "seed": 0, "options": {}},
        "dtype": UNKNOWN, "seed": 0, "status": "ok", "message": "",
        "samples_s": samples, "per_rank_samples_s": None, "rounds": rounds,
        "summary": summarize(samples) if samples else None, "throughput": None, "flops": None,
        "phase_times_s": None, "check": None, "peak_memory_bytes": None,
        "timer": (bench.get("options") or {}).get("timer"),
    }


def _trial_from_benchmark(bench: dict) -> tuple[dict, list[str]]:
    """(trial record, what it could not carry over)."""
    from harness.stats import summarize

    stats = bench["stats"]
    samples = [float(v) for v in stats.get("data") or []]
    extra = bench.get("extra_info") or {}
    notes: list[str] = []
    if isinstance(extra.get(TRIAL_KEY), dict):  # a moebench trial converted earlier: restore it
        trial = copy.deepcopy(extra[TRIAL_KEY])
        trial["samples_s"] = samples
        trial["summary"] = summarize(samples) if samples else None
    elif isinstance(extra.get(SPEC_KEY), dict):
        trial = _trial_from_suite(bench, samples, notes)
    else:
        trial = _placeholder_trial(bench, samples, notes)
    if not samples:
        trial.update(status="skipped", summary=None, samples_s=[], throughput=None,
                     message="no raw samples: the pytest-benchmark file holds only statistics (saved without "
                             "--benchmark-save-data); they are kept under pytest_benchmark.stats")
        notes.append("no stats.data: no samples, status skipped")
    iterations = stats.get("iterations")
    if schema.is_int(iterations) and iterations > 1:
        notes.append(f"each sample is the mean of {iterations} iterations (pytest-benchmark's round)")
    trial["id"] = bench["fullname"]
    if TRIAL_KEY not in extra:  # the original entry, for the way back (a restored trial needs none)
        original = copy.deepcopy(bench)
        original["stats"].pop("data", None)
        trial[PB_STASH] = original
    if notes:
        trial["converted_from"] = {"format": PYTEST_BENCHMARK, "notes": notes}
    return trial, notes


def _first_common(values: list, default):
    """The value all entries share, else `default` (None when there are none)."""
    distinct = {json.dumps(v, sort_keys=True) for v in values}
    return values[0] if len(distinct) == 1 else default


def to_moebench(data: dict, source: str = "", command_line: list[str] | None = None) -> dict:
    """A moebench results document from a pytest-benchmark file's content."""
    check_pytest_benchmark(data)
    stash = data.get(STASH) if isinstance(data.get(STASH), dict) else {}
    converted = [_trial_from_benchmark(b) for b in data["benchmarks"]]
    trials = [t for t, _ in converted]
    trials += copy.deepcopy(stash.get("omitted_trials") or [])
    if isinstance(stash.get("document"), dict):  # a moebench document converted earlier: restore it
        doc = {**copy.deepcopy(stash["document"]), "trials": trials}
        _validated(doc)
        return doc

    machine_info = data.get("machine_info") or {}
    commit_info = data.get("commit_info") or {}
    placeholders: list[str] = []
    environment = _environment(machine_info, placeholders)
    when = _parse_time(data.get("datetime"))
    if when is None:
        placeholders.append("created_utc (the file has no datetime: the conversion's time)")
        when = dt.datetime.now(dt.UTC)
    specs = [(b.get("extra_info") or {}).get(SPEC_KEY) for b in data["benchmarks"]]
    specs = [s for s in specs if isinstance(s, dict)]
    warmup = _first_common([s.get("warmup") for s in specs], None) if specs and len(specs) == len(trials) else None
    if not schema.is_int(warmup):
        placeholders.append("method.warmup (pytest-benchmark does not record warm-up rounds)")
        warmup = 0
    timed = [len(t["samples_s"]) for t in trials if t["samples_s"]]
    steps = _first_common(timed, None) if timed else None
    if not schema.is_int(steps):
        placeholders.append("method.steps (the benchmarks timed different numbers of rounds)")
        steps = 0
    timers = [(b.get("options") or {}).get("timer") for b in data["benchmarks"]]
    timer = _first_common(timers, None) if timers else None
    if not isinstance(timer, str):
        placeholders.append("method.timer")
        timer = UNKNOWN
    ids = [t["id"] for t in trials]
    lossy = [
        "one pytest process timed every benchmark: each trial has one round, so paired comparisons over rounds "
        "(moebench report, gate) have too few rounds",
        "pytest-benchmark rounds are moebench timed steps; iterations > 1 make each sample a mean of iterations",
        "no calibration matmul, equivalence check, load average or peak memory were recorded",
        "the original benchmark entries (without stats.data) and machine_info, commit_info, datetime and version "
        f"are kept under {PB_STASH}",
    ]
    doc = {
        "schema": schema.SCHEMA_NAME,
        "schema_version": schema.SCHEMA_VERSION,
        "run_id": f"{when.strftime('%Y%m%dT%H%M%SZ')}-{stable_hash([data.get('datetime'), ids], 6)}",
        "created_utc": schema.utc_stamp(when),
        "git": _git(commit_info),
        "command_line": [str(a) for a in (command_line or ["moebench", "convert", source])],
        "environment": environment,
        "method": {
            "timer": timer, "warmup": warmup, "steps": steps, "rounds": 1, "interleaved": False,
            "calibration": "none (pytest-benchmark times no calibration matmul)",
            "notes": (f"converted from a pytest-benchmark {data.get('version', UNKNOWN)} file: every benchmark ran "
                      "once, in one pytest process, one after another (not interleaved); its rounds are the "
                      "timed steps of this document's single round"),
        },
        "trials": trials,
        PB_STASH: {k: copy.deepcopy(v) for k, v in data.items() if k != "benchmarks"},
        "converted_from": {
            "format": PYTEST_BENCHMARK, "version": data.get("version"), "source": source,
            "lossy": lossy, "placeholders": placeholders,
            "trials_with_notes": [t["id"] for t, notes in converted if notes],  # each says what in converted_from
        },
    }
    _validated(doc)
    return doc


def _validated(doc: dict) -> None:
    try:
        schema.validate(doc)
    except schema.SchemaError as exc:
        raise UsageError(f"the converted document is not a valid moebench results document: {exc}") from None


# ----------------------------------------------------------------- files

def convert_file(in_path, out_path, to: str | None = None, command_line: list[str] | None = None) -> tuple[str, dict]:
    """Read `in_path`, convert it (direction from its content, or `to`), write `out_path` atomically;
    (the output format, the output)."""
    from harness.files import write_json_atomic

    if to is not None and to not in FORMATS:
        raise UsageError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    data = read_json(in_path)
    found = detect_format(data)
    if to is None:
        if found is None:
            raise UsageError(f"{in_path} is neither a moebench results document (no \"schema\": "
                             f"\"{schema.SCHEMA_NAME}\") nor a pytest-benchmark JSON file (no \"benchmarks\" list "
                             "with \"machine_info\")")
        to = PYTEST_BENCHMARK if found == MOEBENCH else MOEBENCH
    elif found == to:
        raise UsageError(f"{in_path} is already a {to} file; nothing to convert")
    source = str(in_path)
    try:
        if to == PYTEST_BENCHMARK:
            if data.get("schema") != schema.SCHEMA_NAME:
                raise UsageError("it has no \"schema\": \"moebench.results\"")
            out = to_pytest_benchmark(data, source)
        else:
            out = to_moebench(data, source, command_line)
    except UsageError as exc:
        raise UsageError(f"{in_path}: {exc}") from None
    try:
        write_json_atomic(out, out_path, indent=1)
    except OSError as exc:
        raise UsageError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return to, out
