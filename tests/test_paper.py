"""`moebench paper`: the published figures, the fit on the Tutel column only, and the files it writes."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness import paper
from harness.perfmodel import paper_fsmoe, paper_megatron

ROOT = Path(__file__).resolve().parent.parent


def moebench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_published_rows_are_the_papers():
    times = {r.label: (r.fsmoe_ms, r.tutel_ms) for r in paper_fsmoe.PUBLISHED}
    assert times == {"GPT2-XL": (658.3, 783.7), "Mixtral-7B": (1471.0, 1726.1), "Mixtral-22B": (3340.7, 3807.2),
                     "Mixtral-7B, PP": (1308.7, 1476.9), "Mixtral-22B, PP": (4005.1, 4455.3)}
    assert paper_fsmoe.PUBLISHED_LAYER_SPEEDUP == {"fsmoe-testbed-a": 1.18, "fsmoe-testbed-b": 1.22}
    assert len(paper_fsmoe.layer_grid()) == 1458


def test_the_scale_is_fitted_on_the_tutel_column_only_and_cannot_move_a_speedup():
    rows = paper_fsmoe.published_rows()
    ratios = [r.row.tutel_ms / (r.tutel_s * 1e3) for r in rows]
    assert rows[0].scale == pytest.approx(math.exp(sum(map(math.log, ratios)) / len(ratios)))
    # the FSMoE column played no part: changing it changes no fitted number
    edited = [paper_fsmoe.ModelledRow(**{**r.__dict__, "row": replace(r.row, fsmoe_ms=2 * r.row.fsmoe_ms),
                                         "fsmoe_s": 3 * r.fsmoe_s}) for r in rows]
    assert paper_fsmoe.fit_scale(edited) == pytest.approx(rows[0].scale)
    for r in rows:
        assert r.speedup == pytest.approx(r.tutel_ms / r.fsmoe_ms)
        assert r.tutel_best_s <= r.tutel_s  # the best fixed degree includes degree 1


def test_megatron_layout_is_the_readmes_reference_mapping():
    layout = paper_megatron.LAYOUT
    assert (layout.world, layout.tp, layout.ep, layout.pp, layout.vpp) == (64, 1, 8, 4, 8)
    assert layout.micro_batches * layout.dp * (layout.micro_batch_size or 1) == 256  # global batch
    w = paper_megatron.workload()
    assert (w.seq_len, w.capacity_factor, w.layer.num_experts, w.layer.top_k) == (4096, None, 8, 2)
    row = paper_megatron.modelled()
    assert row.tflops_per_gpu > 0 and row.peak_bytes < row.capacity_bytes  # the published layout fits


def test_paper_megatron_writes_markdown_csv_and_png(tmp_path):
    proc = moebench("paper", "megatron", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "megatron.md").read_text()
    assert "468" in text and "## Assumptions" in text
    rows = list(csv.DictReader((tmp_path / "megatron.csv").open()))
    assert rows[0]["published_tflops_per_gpu"] == "468.0"
    assert float(rows[0]["error"]) == pytest.approx(float(rows[0]["modelled_tflops_per_gpu"]) / 468 - 1, abs=1e-3)
    assert (tmp_path / "megatron.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp"))


def test_fsmoe_table_shows_held_out_errors_and_every_assumption(monkeypatch):
    monkeypatch.setattr(paper_fsmoe, "LAYER_GRID", {**paper_fsmoe.LAYER_GRID, "batch": (4,), "seq": (1024,),
                                                    "model_dim": (2048,)})
    table = paper.fsmoe_table("test")
    assert "modelled FSMoE (held out)" in table.markdown and "## Assumptions" in table.markdown
    published = [r for r in table.csv_rows if r["table"] == "published"]
    assert len(published) == 5
    for r in published:
        assert r["speedup_error"] == pytest.approx(r["modelled_speedup"] / r["published_speedup"] - 1, abs=1e-3)
    assert {r["testbed"] for r in table.csv_rows if r["table"] == "gpu clusters"} == set(paper_fsmoe.GPU_TESTBEDS)


def test_measure_applies_to_fsmoe_only():
    proc = moebench("paper", "megatron", "--measure")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--measure applies to `paper fsmoe` only" in proc.stderr


def test_measured_rows_are_the_paired_speedups_of_the_newest_results(tmp_path):
    from harness import stats
    from harness.commands.paper import _measured_rows
    from harness.files import read_json

    rows, note = _measured_rows(ROOT / "results" / "paper_fsmoe")
    assert {r.workload for r in rows} == {"gpt2-xl-moe", "mixtral-8x7b", "mixtral-8x22b"}
    doc = read_json(sorted((ROOT / "results" / "paper_fsmoe").glob("*.json"))[-1])
    trials = {(t["workload_spec"]["name"], t["system"]): t for t in doc["trials"]}
    for r in rows:
        want = stats.speedup(trials[(r.workload, "tutel_native")], trials[(r.workload, "fsmoe_native")])
        assert r.speedup == pytest.approx(want.ratio) and r.rounds == want.n_pairs >= 3
    assert "AMD EPYC" in note or "CPUs" in note
    assert _measured_rows(tmp_path) == (None, "")  # nothing measured: no section
