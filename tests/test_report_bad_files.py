"""`report` leaves out results files it cannot use (one warning line each) and builds the tables from the rest.

Documents are built by hand (tests/test_schema.py); no benchmark runs.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.report import ReportOptions, build_report
from harness.schema import write_atomic
from tests.test_schema import make_document, make_trial

REPO = Path(__file__).resolve().parents[1]
PYTEST_BENCHMARK_FILE = {"machine_info": {"node": "box"}, "commit_info": {}, "benchmarks": [], "version": "5.1.0"}

# file name -> (content, what its warning must say)
BAD_FILES = {
    "truncated.json": (None, "looks truncated"),  # the good document, cut in half (filled in by write_bad)
    "corrupt.json": ("{'schema': moebench}\n", "not valid JSON (line 1, column 2"),
    "newer.json": (None, "from a newer moebench (schema_version 2 is newer than this harness reads (1))"),
    "pytest_benchmark.json": (json.dumps(PYTEST_BENCHMARK_FILE), "a pytest-benchmark file, not moebench results"),
}
MORE_BAD_FILES = {
    "empty.json": ("", "empty"),
    "other.json": (json.dumps({"hello": "world"}), 'not a moebench results file (no "schema": "moebench.results")'),
    "list.json": ("[1, 2]", "not a moebench results file (it holds a JSON array, not an object)"),
    "invalid.json": (None, "not a valid moebench results file: trials[0].status: 'bogus' is not one of"),
}


def good_document() -> dict:
    return make_document([make_trial("torch_reference", (0.020,) * 3), make_trial("deepspeed_moe", (0.010,) * 3)])


def variant(**changes) -> str:
    doc = good_document()
    doc.update(changes)
    return json.dumps(doc)


def write_bad(directory: Path, files: dict) -> dict[str, str]:
    """Write each bad file; name -> the text its warning must contain."""
    generated = {"truncated.json": json.dumps(good_document(), indent=1)[:700], "newer.json": variant(schema_version=2),
                 "invalid.json": variant(trials=[make_trial("torch_reference", status="ok") | {"status": "bogus"}])}
    for name, (content, _) in files.items():
        (directory / name).write_text(generated[name] if content is None else content, encoding="utf-8")
    return {name: expected for name, (_, expected) in files.items()}


def warnings_by_file(stderr: str) -> dict[str, str]:
    lines = stderr.strip().splitlines()
    prefix = "moebench report: warning: skipping "
    assert all(line.startswith(prefix) for line in lines), stderr
    by_file = {Path(line[len(prefix):].split(": ", 1)[0]).name: line for line in lines}
    assert len(by_file) == len(lines), stderr  # one line per file
    return by_file


def test_a_named_file_that_does_not_exist_is_still_a_usage_error(tmp_path):
    results = tmp_path / "results"
    write_atomic(good_document(), results / "good.json")
    with pytest.raises(UsageError, match="missing.json does not exist"):
        build_report(ReportOptions(paths=[str(results / "good.json"), str(results / "missing.json")],
                                   out_dir=str(tmp_path / "reports")))


def test_no_usable_file_is_one_usage_error_naming_each(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    expected = write_bad(results, BAD_FILES)
    with pytest.raises(UsageError) as info:
        build_report(ReportOptions(paths=[str(results)], out_dir=str(tmp_path / "reports")))
    message = str(info.value)
    assert message.startswith(f"none of the {len(expected)} results files is usable: ") and "\n" not in message
    assert f"{results / 'corrupt.json'} is not valid JSON" in message and "; and 1 more" in message
    assert capsys.readouterr().err == ""  # the error says it all; no warnings besides
    assert not (tmp_path / "reports").exists()


def test_cli_report_skips_bad_files_and_writes_the_rest(tmp_path):
    """The command as a user runs it: exit 0, the tables from the good file, one warning per bad file."""
    results = tmp_path / "results"
    write_atomic(good_document(), results / "good.json")
    expected = write_bad(results, BAD_FILES | MORE_BAD_FILES)
    done = subprocess.run([sys.executable, "-m", "harness", "report", str(results), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    by_file = warnings_by_file(done.stderr)
    assert sorted(by_file) == sorted(expected)
    for name, text in expected.items():
        assert f"skipping {results / name}: " in by_file[name] and text in by_file[name], by_file[name]
    assert "**2.00** [2.00, 2.00]" in done.stdout
    for name in ("iteration_time.md", "iteration_time.csv", "speedup.md", "speedup.csv", "iteration_time.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_cli_report_with_only_bad_files_is_one_line_exit_2(tmp_path, capsys):
    from harness.cli import main  # in-process: the same code path as `python -m harness`, without the start-up

    results = tmp_path / "results"
    results.mkdir()
    write_bad(results, {name: BAD_FILES[name] for name in ("corrupt.json", "newer.json")})
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith("moebench report: error: none of the 2 results files is usable: ")
    assert "corrupt.json is not valid JSON" in lines[0] and "newer.json is from a newer moebench" in lines[0]
    assert not (tmp_path / "out").exists()
