"""Report tables from hand-built results documents (no runner involved)."""
import pandas as pd
import pytest

from harness.errors import UsageError
from harness.identity import trial_id
from harness.report import ReportOptions, build_report, format_ms
from harness.schema import load as schema_load
from harness.schema import write_atomic
from tests.test_schema import make_document, make_trial

# 10, 12, 14 ms: median 12, q1 11, q3 13 (linear interpolation), IQR 2
REF = (0.010, 0.012, 0.014)


def write(tmp_path, name, trials, **doc_kwargs):
    return write_atomic(make_document(trials, **doc_kwargs), tmp_path / "results" / name)


def report(tmp_path, **kwargs):
    options = ReportOptions(paths=[str(tmp_path / "results")], out_dir=str(tmp_path / "reports"), **kwargs)
    return build_report(options)


def table_rows(markdown: str) -> list[list[str]]:
    """The data rows of the first Markdown table, as stripped cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def header(markdown: str) -> list[str]:
    return [c.strip() for c in next(li for li in markdown.splitlines() if li.startswith("|")).strip("|").split("|")]


def cell(markdown: str, system: str, row: int = 0) -> str:
    return table_rows(markdown)[row][header(markdown).index(system)]


def test_iteration_cells_show_median_and_iqr_or_status(tmp_path):
    write(tmp_path, "a.json", [
        make_trial("torch_reference", REF),
        make_trial("deepspeed_moe", (0.030, 0.031, 0.032, 0.033, 0.034)),
        make_trial("tutel", status="oom"),
        make_trial("torch_reference", (0.5, 0.6, 0.7), workload="gpt2-xl-moe"),
    ])
    rep = report(tmp_path)
    rows = table_rows(rep.iteration_markdown)
    assert [r[0] for r in rows] == ["gpt2-xl-moe", "mixtral-8x7b"]
    assert cell(rep.iteration_markdown, "torch_reference", 1) == "12.0 ± 2.0"
    assert cell(rep.iteration_markdown, "deepspeed_moe", 1) == "32.0 ± 2.0"  # q1 31, q3 33
    assert cell(rep.iteration_markdown, "tutel", 1) == "oom"
    assert cell(rep.iteration_markdown, "torch_reference", 0) == "600 ± 100"
    assert cell(rep.iteration_markdown, "deepspeed_moe", 0) == "—"
    assert "interquartile range" in rep.iteration_markdown


def test_exposed_communication_beside_the_time_and_in_the_csv(tmp_path):
    trial = make_trial("deepspeed_moe", (0.030, 0.031, 0.032, 0.033, 0.034))
    trial["exposed_comm_s"] = [0.004, 0.005, 0.006, 0.005, 0.004]  # median 5 ms
    write(tmp_path, "a.json", [make_trial("torch_reference", REF), trial])
    rep = report(tmp_path)
    assert cell(rep.iteration_markdown, "deepspeed_moe") == "32.0 ± 2.0 (comm 5.0)"
    assert cell(rep.iteration_markdown, "torch_reference") == "12.0 ± 2.0"  # none recorded: no mention
    csv = pd.read_csv(tmp_path / "reports" / "iteration_time.csv")
    assert csv.set_index("system").loc["deepspeed_moe", "exposed_ms"] == pytest.approx(5.0)
    assert "exposed communication" in rep.iteration_markdown


def test_speedup_is_baseline_over_system_with_interval(tmp_path):
    write(tmp_path, "a.json", [
        make_trial("torch_reference", (0.020, 0.020, 0.020)),
        make_trial("deepspeed_moe", (0.010, 0.010, 0.010)),
        make_trial("megatron_core", (0.040, 0.042, 0.038, 0.041)),
        make_trial("tutel", status="skipped"),
    ])
    rep = report(tmp_path)
    assert rep.baseline == "torch_reference"
    assert header(rep.speedup_markdown)[9] == "torch_reference"  # baseline is the first system column
    assert cell(rep.speedup_markdown, "torch_reference") == "1.00 (baseline)"
    assert cell(rep.speedup_markdown, "deepspeed_moe") == "**2.00** [2.00, 2.00]"  # every round 2x: a point
    text = cell(rep.speedup_markdown, "megatron_core")
    # rounds 1-3 pair up (megatron's 4th has no baseline round): 20/40, 20/42, 20/38; geometric mean 0.5
    expected = (20 / 40 * 20 / 42 * 20 / 38) ** (1 / 3)
    assert text.startswith(f"**{expected:.2f}** [")
    csv = pd.read_csv(tmp_path / "reports" / "speedup.csv")
    mega = csv[csv.system == "megatron_core"].iloc[0]
    assert mega.speedup == pytest.approx(expected)
    assert mega.pairs == 3 and mega.verdict == "slower"
    assert 20 / 42 <= mega.ci_low <= mega.speedup <= mega.ci_high <= 20 / 38
    assert cell(rep.speedup_markdown, "tutel") == "skipped"


def test_default_baseline_prefers_tutel_native(tmp_path):
    write(tmp_path, "a.json", [make_trial("torch_reference", (0.02,) * 3), make_trial("tutel_native", (0.01,) * 3)])
    rep = report(tmp_path)
    assert rep.baseline == "tutel_native"
    assert cell(rep.speedup_markdown, "torch_reference") == "**0.50** [0.50, 0.50]"


def test_explicit_baseline_and_unknown_baseline(tmp_path):
    write(tmp_path, "a.json", [make_trial("torch_reference", (0.02,) * 3), make_trial("deepspeed_moe", (0.01,) * 3)])
    rep = report(tmp_path, baseline="deepspeed_moe")
    assert cell(rep.speedup_markdown, "torch_reference") == "**0.50** [0.50, 0.50]"
    with pytest.raises(UsageError, match="baseline system 'tutel' is not in the results; systems present: "
                                         "deepspeed_moe, torch_reference"):
        report(tmp_path, baseline="tutel")


def test_no_default_baseline_gives_a_note_not_a_table(tmp_path):
    write(tmp_path, "a.json", [make_trial("deepspeed_moe", (0.01,) * 3)])
    rep = report(tmp_path)
    assert rep.baseline is None
    assert "No speedup table" in rep.speedup_markdown and "--baseline" in rep.speedup_markdown


def test_failed_check_is_left_out_unless_asked(tmp_path):
    write(tmp_path, "a.json", [
        make_trial("torch_reference", (0.020,) * 3),
        make_trial("megatron_core", (0.010,) * 3, check_passed=False),
        make_trial("deepspeed_moe", (0.010,) * 3, check_passed=None),  # not checked: shown normally
    ])
    rep = report(tmp_path)
    assert cell(rep.speedup_markdown, "megatron_core") == "check failed"
    assert cell(rep.speedup_markdown, "deepspeed_moe") == "**2.00** [2.00, 2.00]"
    assert cell(rep.iteration_markdown, "megatron_core") == "10.0 ± 0.0 †"
    rep = report(tmp_path, include_unchecked=True)
    assert cell(rep.speedup_markdown, "megatron_core") == "**2.00** [2.00, 2.00] †"
    assert "†: the output failed the equivalence check" in rep.speedup_markdown


def test_failed_baseline_check_blocks_the_row(tmp_path):
    write(tmp_path, "a.json", [
        make_trial("torch_reference", (0.020,) * 3, check_passed=False),
        make_trial("deepspeed_moe", (0.010,) * 3),
    ])
    assert cell(report(tmp_path).speedup_markdown, "deepspeed_moe") == "baseline check failed"


def test_newest_run_wins_and_the_footer_says_so(tmp_path):
    write(tmp_path, "old.json", [make_trial("torch_reference", (0.020,) * 3), make_trial("deepspeed_moe", (0.05,) * 3)],
          run_id="20261129T000000Z-aaaaaa", created="2026-11-29T00:00:00Z")
    write(tmp_path, "new.json", [make_trial("deepspeed_moe", (0.010,) * 3)],
          run_id="20261129T050000Z-bbbbbb", created="2026-11-29T05:00:00Z", dirty=True,
          command_line=["./moebench", "run", "--systems", "deepspeed_moe"])
    rep = report(tmp_path)
    assert cell(rep.iteration_markdown, "deepspeed_moe") == "10.0 ± 0.0"
    # the baseline comes from the older run: no rounds pair up, so no interval
    assert cell(rep.speedup_markdown, "deepspeed_moe") == "2.00 unpaired ‡"
    assert "'unpaired ‡': baseline and system come from different runs" in rep.speedup_markdown
    for md in (rep.iteration_markdown, rep.speedup_markdown):
        assert "1 trial(s) also appeared in an older run (the same trial id" in md
        assert "`./moebench run --systems deepspeed_moe`" in md
        assert "2026-11-29T05:00:00Z" in md
        assert "git 0123456789ab (dirty" in md


def test_mixed_machines_are_flagged(tmp_path):
    write(tmp_path, "a.json", [make_trial("torch_reference", REF)], run_id="20261129T000000Z-aaaaaa")
    other = make_document([make_trial("deepspeed_moe", REF)], run_id="20261129T010000Z-cccccc",
                          created="2026-11-29T01:00:00Z")
    other["environment"]["cpu_model"] = "Other CPU"
    write_atomic(other, tmp_path / "results" / "b.json")
    md = report(tmp_path).iteration_markdown
    assert "machine: Other CPU" in md and "(runs 20261129T010000Z-cccccc)" in md
    assert "WARNING: these results come from different machines" in md


def test_footer_names_machine_method_and_commands(tmp_path):
    write(tmp_path, "a.json", [make_trial("torch_reference", REF)])
    rep = report(tmp_path, command_line=["python", "-m", "harness", "report", "results"])
    md = rep.iteration_markdown
    assert "Test CPU 9000, 2 CPUs, torch threads 2, GPU none" in md
    assert "timer perf_counter; warm-up 2 steps; 5 timed steps x 2 rounds; systems interleaved across rounds: yes" in md
    assert "calibration: 1024^3 fp32 matmul" in md
    assert "`./moebench run --workload mixtral-8x7b`" in md
    assert "report: `python -m harness report results`" in md
    assert "(none here)" in md
    assert "WARNING" not in md


def test_outputs_are_written(tmp_path):
    write(tmp_path, "a.json", [make_trial("torch_reference", REF), make_trial("deepspeed_moe", status="error")])
    rep = report(tmp_path)
    out = tmp_path / "reports"
    assert sorted(p.name for p in rep.written) == sorted(
        ["iteration_time.md", "iteration_time.csv", "speedup.md", "speedup.csv", "iteration_time.png"])
    assert (out / "iteration_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out / "iteration_time.csv")
    ref = csv[csv.system == "torch_reference"].iloc[0]
    assert [ref.median_ms, ref.q1_ms, ref.q3_ms] == pytest.approx([12.0, 11.0, 13.0])
    assert (ref.n, ref.status) == (3, "ok")
    assert ref.calibration_ms == pytest.approx(50.0)  # the round's 0.05 s calibration matmul
    assert csv[csv.system == "deepspeed_moe"].iloc[0].status == "error"


def test_loading_errors_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        build_report(ReportOptions(paths=[str(tmp_path / "nope")], out_dir=str(tmp_path / "r")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no results files \(\*\.json\) found"):
        build_report(ReportOptions(paths=[str(tmp_path / "empty")], out_dir=str(tmp_path / "r")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="bad.json is not valid JSON"):
        build_report(ReportOptions(paths=[str(bad)], out_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()  # nothing written on a failed load


@pytest.mark.parametrize("value, text", [(1234.5, "1234"), (12.34, "12.3"), (1.234, "1.23"), (0.1234, "0.123")])
def test_format_ms_keeps_about_three_figures(value, text):
    assert format_ms(value) == text


def test_rows_sort_numbers_by_value_and_csv_carries_throughput(tmp_path):
    small = make_trial("torch_reference", REF, world_size=2)
    large = make_trial("torch_reference", REF, world_size=16)
    large["throughput"] = {"tokens_per_s": 5000.0, "executed_tflops": 0.25, "useful_tflops": 0.2}
    write(tmp_path, "a.json", [large, small])
    rep = report(tmp_path)
    ws_column = header(rep.iteration_markdown).index("ws")
    assert [row[ws_column] for row in table_rows(rep.iteration_markdown)] == ["2", "16"]
    csv = pd.read_csv(tmp_path / "reports" / "iteration_time.csv").set_index("ws")
    assert (csv.loc[16, "tokens_per_s"], csv.loc[16, "useful_tflops"]) == (5000.0, 0.2)
    assert pd.isna(csv.loc[2, "useful_tflops"])


def test_summary_speedup_equals_the_report_speedup(tmp_path):
    """The run summary (runner.format_table) and the report compute the speedup with one function."""
    from harness import runner

    base = make_trial("tutel_native", (0.010, 0.012, 0.011, 0.013, 0.010, 0.011))
    other = make_trial("deepspeed_moe", (0.014, 0.015, 0.016, 0.015, 0.013, 0.016))
    path = write(tmp_path, "a.json", [base, other])
    rep = report(tmp_path)
    csv = pd.read_csv(tmp_path / "reports" / "speedup.csv")
    speed = csv[csv.system == "deepspeed_moe"].iloc[0]
    table = runner.format_table(schema_load(path)["trials"])
    row = next(line for line in table.splitlines() if " deepspeed_moe " in line)
    assert f"{speed.speedup:.2f}x" in row and f"[{speed.ci_low:.2f}, {speed.ci_high:.2f}]" in row
    assert f"{speed.speedup:.2f}" in cell(rep.speedup_markdown, "deepspeed_moe")


def test_different_work_under_one_name_is_not_merged(tmp_path):
    """An overridden preset field (--experts 16) gives a separate row and a note naming the difference."""
    stock = make_trial("torch_reference", (0.010,) * 3)
    override = make_trial("torch_reference", (0.020,) * 3)
    override["workload_spec"] = {"name": "mixtral-8x7b", "num_experts": 16}
    override["id"] = trial_id(override)
    write(tmp_path, "a.json", [stock], run_id="20261129T000000Z-aaaaaa", created="2026-11-29T00:00:00Z")
    write(tmp_path, "b.json", [override], run_id="20261129T050000Z-bbbbbb", created="2026-11-29T05:00:00Z")
    rep = report(tmp_path)
    rows = table_rows(rep.iteration_markdown)
    assert len(rows) == 2 and all("(work " in r[0] for r in rows)
    assert sorted(r[header(rep.iteration_markdown).index("torch_reference")] for r in rows) == [
        "10.0 ± 0.0", "20.0 ± 0.0"]
    assert "different setups shown as separate rows" in rep.iteration_markdown
    assert "workload.num_experts: None, 16" in rep.iteration_markdown
    assert "older run" not in rep.iteration_markdown.split("different setups")[0].splitlines()[-1]
