"""The layer performance model (harness/perfmodel/layer.py), its validation and `moebench predict`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.perfmodel.layer import LayerCase, SYSTEMS, predict_layer
from harness.perfmodel.testbed import load_testbed
from harness.perfmodel.validation import Checked, pairwise_order_agreement

ROOT = Path(__file__).resolve().parent.parent

FLAT = """
[testbed]
name = "flat"
devices_per_node = 8
[overhead]
per_call_s = { value = 1e-12, kind = "assumed", source = "test: next to nothing" }
[memory]
capacity_bytes = { value = 1e9, kind = "assumed", source = "test" }
bandwidth_bytes_per_s = { value = 1e10, kind = "assumed", source = "test" }
[[gemm]]
dtype = "float32"
flops = { value = 1e10, kind = "assumed", source = "test" }
[[collective]]
op = "all_to_all"
scope = "intra_node"
latency_s = { value = 1e-4, kind = "assumed", source = "test" }
bus_bandwidth_bytes_per_s = { value = 1e8, kind = "assumed", source = "test" }
"""


@pytest.fixture
def flat(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text(FLAT)
    return load_testbed(path)


def case(system: str, **changes) -> LayerCase:
    base = dict(system=system, tokens=64, model_dim=32, ffn_dim=16, num_experts=4, top_k=2, gemms_per_expert=3,
                capacity_factor=None)
    return LayerCase(**{**base, **changes})


def test_a_sequential_layer_costs_what_the_formulas_say(flat):
    """Megatron-Core at one rank, dropless: T 64, M 32, H 16, E 4, k 2, SwiGLU; 1e10 FLOP/s and B/s."""
    p = predict_layer(flat, case("megatron_core"))
    T, M, H, E, k, g, rate = 64, 32, 16, 4, 2, 3, 1e10
    rows = T * k
    want = {
        "gate": 3 * 2 * T * E * M / rate,  # forward + data and weight gradients
        "route": 2 * 3 * T * E * 4 / rate,
        "encode": 2 * (T * M + rows * M) * 4 / rate,
        "decode": 2 * ((rows * M + T * M) * 4 + rows * 4) / rate,
        "experts and all-to-all": 3 * 2 * rows * M * H * g / rate,
        "activation": 3 * g * rows * H * 4 / rate,
        "expert loop": 2 * 7 * E * 1e-12,  # SequentialMLP's 7 non-GEMM ops and module calls per expert
    }
    assert p.phases_s.keys() == want.keys()
    for name, seconds in want.items():
        assert p.phases_s[name] == pytest.approx(seconds, rel=1e-6, abs=1e-10), name
    assert p.total_s == pytest.approx(sum(want.values()), rel=1e-6)
    assert p.exposed_comm_s == 0 and p.degrees == {"forward": 1, "backward": 1}


def test_padded_systems_compute_every_capacity_slot_live_ones_the_routed_rows(flat):
    padded, live = case("deepspeed_moe", capacity_factor=2.0), case("megatron_core", capacity_factor=2.0)
    assert padded.rows_sent(SYSTEMS["deepspeed_moe"]) == 4 * 64 == 2 * live.rows_sent(SYSTEMS["megatron_core"])
    dropping = case("megatron_core", capacity_factor=0.5)
    assert dropping.rows_sent(SYSTEMS["megatron_core"]) == 4 * 16  # capacity drops half of the 128 rows
    assert predict_layer(flat, padded).phases_s["experts and all-to-all"] > \
        predict_layer(flat, live).phases_s["experts and all-to-all"]


def test_tutel_searches_the_best_degree_and_fsmoe_takes_given_degrees(flat):
    big = dict(tokens=4096, model_dim=256, ffn_dim=512, ep=2)
    auto = predict_layer(flat, case("tutel_native", tune=True, **big))
    fixed = {d: predict_layer(flat, case("tutel_native", overlap_degree=d, **big)).total_s for d in (1, 2, 4, 8)}
    assert auto.total_s == pytest.approx(min(fixed.values()))
    assert auto.degrees["forward"] == min(fixed, key=fixed.get)
    assert predict_layer(flat, case("tutel_native", **big)).total_s == pytest.approx(fixed[1])  # no tuner: d = 1
    given = predict_layer(flat, case("fsmoe_native", forward_degree=2, backward_degree=8, **big))
    assert given.degrees == {"forward": 2, "backward": 8}
    for p in (auto, given):
        assert 0 < p.exposed_comm_s < p.total_s


def test_more_ranks_than_the_testbed_holds_or_an_unknown_system_is_refused(flat):
    with pytest.raises(ValueError, match="do not fit"):
        flat.collective_seconds("all_to_all", 1e6, 16)
    with pytest.raises(ValueError, match="system for the performance model"):
        predict_layer(flat, case("my_moe"))


def test_order_agreement_counts_pairs_within_a_comparison_only():
    rows = [Checked("a", "x", "g1", 1.0, 2.0), Checked("b", "y", "g1", 2.0, 3.0), Checked("c", "z", "g1", 3.0, 1.0),
            Checked("d", "x", "g2", 1.0, 1.0)]
    assert pairwise_order_agreement(rows) == (1, 3)  # x<y kept; x<z and y<z inverted; g2 has no pair
    assert rows[0].error == pytest.approx(1.0)


def moebench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_predict_prints_every_system_on_a_gpu_testbed():
    proc = moebench("predict", "--testbed", "h100-node", "--workload", "mixtral-8x7b", "--flavor", "full",
                    "--ep", "8", "--nproc-per-node", "8", "--dtype", "bfloat16",
                    "--systems", "tutel_native,deepspeed_moe,fsmoe_native", "--variant", "tutel_native:overlap_degree=1")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("mixtral-8x7b/full")]
    assert len(lines) == 4 and any("overlap_degree=1" in line for line in lines)
    assert "datasheet" in proc.stdout and "measured" in proc.stdout
    # the full Mixtral layer's 8 experts over 8 GPUs: 1 expert of 3 x 4096 x 14336 bf16 per rank, plus
    # gradients and activations: a few GiB, well inside 80 GB
    import re

    for line in lines:
        workload, system, ms, exposed, degrees, peak_gib, phases = re.split(r"\s{2,}", line.strip())
        assert float(ms) > 0 and 0 <= float(exposed) < float(ms)
        assert 0.5 < float(peak_gib) < 80, line


@pytest.mark.parametrize("args,message", [
    (("--level", "block"), "predicts layer or model"),
    (("--mode", "forward"), "predicts forward_backward at layer level"),
    (("--dtype", "float64"), "float32, bfloat16, float16"),
    (("--testbed", "h900-node"), "unknown testbed"),
    (("--systems", "nonesuch"), "system for the performance model"),
    (("--nproc-per-node", "16", "--ep", "16", "--experts", "16"), "do not fit"),
])
def test_predict_bad_input_is_one_line_exit_2(args, message):
    proc = moebench("predict", "--testbed", "h100-node", *args) if "--testbed" not in args else \
        moebench("predict", *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr


def test_every_measured_layer_trial_of_a_results_file_gets_a_prediction(flat):
    import json

    from harness.perfmodel.validation import checked_trials, summary

    doc = json.loads((ROOT / "results/fine_grained/20261204T162551Z-12b8df.json").read_text())  # fp32 layer run
    wanted = [t for t in doc["trials"] if t["status"] == "ok" and t["system"] in SYSTEMS]
    checked, skipped = checked_trials([doc], flat)
    assert len(checked) == len(wanted) > 3 and not skipped
    assert all(c.predicted_s > 0 and c.measured_s > 0 for c in checked)
    s = summary(checked)
    assert s["trials"] == len(checked) and 0 <= s["order_agree"] <= s["order_pairs"]


def test_ranks_sharing_cores_compute_slower_and_overlap_nothing(tmp_path):
    """shared_cores = 2: four one-thread ranks get half their rates, and the all-to-alls add up
    with the GEMMs instead of hiding behind them: at d = 4, each of 4 chunks pays its latencies."""
    (tmp_path / "flat.toml").write_text(FLAT)
    (tmp_path / "cpu.toml").write_text('[testbed]\nname = "cpu"\nextends = "flat.toml"\ndevices_per_node = 8\n'
                                       'shared_cores = 2\n')
    flat, cpu = load_testbed(tmp_path / "flat.toml"), load_testbed(tmp_path / "cpu.toml")
    assert cpu.compute_share(4, 1) == 0.5 and cpu.compute_share(2, 1) == 1.0 and flat.compute_share(4, 1) == 1.0
    T, M, H, E, k, g = 256, 32, 16, 4, 2, 3
    rows, flops, lat, bw = T * k, 1e10, 1e-4, 1e8
    one_rank = predict_layer(cpu, case("tutel_native", tokens=T, ep=1, threads=1))
    four = predict_layer(cpu, case("tutel_native", tokens=T, ep=4, threads=1, overlap_degree=4))
    assert four.phases_s["gate"] == pytest.approx(2 * one_rank.phases_s["gate"], rel=1e-6)  # half the rate
    d, share = 4, 0.5
    a2a_chunk = lat + 4 * rows * M / d * (3 / 4) / bw  # latency + fp32 bytes leaving the rank / bus bandwidth
    gemm_chunk = g * 1e-12 / share + 2 * rows * M * H * g / d / (flops * share)  # calls + MACs, forward
    want_forward = d * (2 * a2a_chunk + gemm_chunk)
    want_backward = d * (2 * a2a_chunk + g * 1e-12 / share + 2 * 2 * rows * M * H * g / d / (flops * share))
    assert four.phases_s["experts and all-to-all"] == pytest.approx(want_forward + want_backward, rel=1e-6)
    assert four.exposed_comm_s == pytest.approx(2 * d * 2 * a2a_chunk, rel=1e-6)
    overlapped = predict_layer(flat, case("tutel_native", tokens=T, ep=4, threads=1, overlap_degree=4))
    assert overlapped.phases_s["experts and all-to-all"] < four.phases_s["experts and all-to-all"]


def test_run_predict_stores_the_model_beside_each_trial_and_the_report_shows_its_error(tmp_path):
    import csv
    import json

    from harness.perfmodel.trials import case_from_record
    from harness.results_model import validate

    out = tmp_path / "results"
    proc = moebench("run", "--workload", "mixtral-8x7b", "--flavor", "debug", "--systems", "tutel_native,deepspeed_moe",
                    "--repeats", "1", "--warmup", "0", "--steps", "2", "--predict", "h100-node", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "predicted 2 trial(s) on testbed h100-node" in proc.stderr
    (path,) = out.glob("*.json")
    doc = json.loads(path.read_text())
    validate(doc)
    h100 = load_testbed("h100-node")
    for trial in doc["trials"]:
        p = trial["prediction"]
        assert p["testbed"] == "h100-node" and p["model"] == "harness/perfmodel/layer.py"
        assert p["step_s"] == pytest.approx(predict_layer(h100, case_from_record(trial)).total_s, rel=1e-12)
        assert p["step_s"] == pytest.approx(sum(p["phases_s"].values()), rel=1e-9)
    report = moebench("report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "iteration_time.csv").open()))
    assert len(rows) == 2
    for row in rows:
        trial = next(t for t in doc["trials"] if t["id"] == row["id"])
        assert float(row["predicted_ms"]) == pytest.approx(trial["prediction"]["step_s"] * 1e3)
        assert float(row["prediction_error"]) == pytest.approx(trial["prediction"]["step_s"]
                                                                / trial["summary"]["median"] - 1)
        assert row["testbed"] == "h100-node"
    assert "[model " in (tmp_path / "report" / "iteration_time.md").read_text()


def test_run_predict_with_an_unknown_testbed_stops_before_running(tmp_path):
    proc = moebench("run", "--workload", "mixtral-8x7b", "--flavor", "debug", "--systems", "tutel_native",
                    "--predict", "nosuch-testbed", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nosuch-testbed" in proc.stderr
    assert not list(tmp_path.iterdir())
