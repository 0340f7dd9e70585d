"""The whole-iteration model (harness/perfmodel/iteration.py), its memory estimate and FLOP count, on
hand-computed small cases."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from core.values import LayerShape
from harness.perfmodel.iteration import Layout, model_flops_per_iteration, parameter_counts, predict_iteration
from harness.perfmodel.model_memory import peak_memory_terms
from harness.perfmodel import testbed as testbeds
from workloads.spec import ModelShape, Workload

RATE = 1e9  # FLOP/s and B/s of the toy testbed, so a cost in seconds is its work x 1e-9

TOY = """
[testbed]
name = "toy"
devices_per_node = 4
nodes = 2
[memory]
capacity_bytes = { value = 1e9, kind = "assumed", source = "test" }
bandwidth_bytes_per_s = { value = 1e9, kind = "assumed", source = "test" }
[[gemm]]
dtype = "float32"
flops = { value = 1e9, kind = "assumed", source = "test" }
""" + "".join(f"""
[[collective]]
op = "{op}"
scope = "{scope}"
latency_s = {{ value = 1e-3, kind = "assumed", source = "test" }}
bus_bandwidth_bytes_per_s = {{ value = 1e6, kind = "assumed", source = "test" }}
""" for op in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce") for scope in ("intra_node", "inter_node"))

# 4 blocks, MoE in blocks 1 and 3; T = 2 x 4 = 8 tokens, M 8, F = H 16, 2 experts top-1, GELU (g = 2),
# 2 heads of 4 (kv width 8), vocabulary 32.
WORKLOAD = Workload(name="toy", flavor="custom",
                    layer=LayerShape(model_dim=8, ffn_dim=16, num_experts=2, top_k=1, activation="gelu"),
                    model=ModelShape(n_layers=4, n_heads=2, n_kv_heads=2, vocab_size=32, moe_every=2),
                    batch_size=2, seq_len=4, capacity_factor=1.0)


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(TOY)
    return testbeds.load_testbed(path)


def test_attention_costs_what_the_formulas_say(toy):
    p = predict_iteration(toy, WORKLOAD, "torch_reference", Layout(world=1), "float32")
    T, M, kv, S, B, b = 8, 8, 8, 4, 2, 4
    gemms = 3 * (2 * T * (M + 2 * kv) * M + 2 * T * M * M)  # forward + two backward GEMMs
    core = 3 * 2 * 2 * B * S * S * M * 0.5  # causal: half the blocks
    elementwise = 2 * 12 * T * M * b  # forward + one backward pass
    assert p.phases_s["attention"] == pytest.approx(4 * (gemms + core + elementwise) / RATE)
    assert p.phases_s["dense ffn"] == pytest.approx(2 * 3 * 2 * (2 * T * 16 * M) / RATE)


def test_parameter_counts_by_hand():
    counts = parameter_counts(WORKLOAD, Layout(world=1))
    attention = 2 * 8 * 8 + 2 * 8 * 8 + 2 * 8  # Q, O; K, V (kv width 8); two norm weights
    dense = 4 * attention + 2 * (2 * 8 * 16) + 2 * (8 * 2) + 32 * 8  # blocks, 2 dense FFNs, 2 routers, embedding
    assert counts == {"dense": dense, "expert": 2 * 2 * (2 * 8 * 16)}
    halves = parameter_counts(WORKLOAD, Layout(world=2, ep=2))
    assert halves["expert"] == counts["expert"] / 2 and halves["dense"] == counts["dense"]


def test_tensor_parallel_adds_four_all_reduces_per_block(toy):
    p = predict_iteration(toy, WORKLOAD, "torch_reference", Layout(world=2, tp=2), "float32")
    one = 1e-3 + 8 * 8 * 4 * (2 * (2 - 1) / 2) / 1e6  # latency + bytes x ring factor / bus bandwidth
    assert p.phases_s["tensor-parallel all-reduce"] == pytest.approx(4 * 4 * one)


def test_the_1f1b_bubble_is_pp_minus_one_over_v_micro_batches(toy):
    flat = predict_iteration(toy, WORKLOAD, "torch_reference", Layout(world=2, pp=2, micro_batches=4), "float32")
    assert flat.phases_s["pipeline bubble"] == pytest.approx((2 - 1) * flat.micro_batch_s)
    compute = sum(v for k, v in flat.phases_s.items()
                  if k not in ("pipeline bubble", "gradient sync (exposed)", "optimizer"))
    assert compute == pytest.approx(4 * flat.micro_batch_s)
    interleaved = predict_iteration(toy, WORKLOAD, "torch_reference",
                                    Layout(world=2, pp=2, vpp=2, micro_batches=4), "float32")
    assert interleaved.phases_s["pipeline bubble"] == pytest.approx(interleaved.micro_batch_s / 2)
    assert flat.total_s == pytest.approx(sum(flat.phases_s.values()))


def test_gradient_sync_is_exposed_after_backward_and_hidden_when_overlapped(toy):
    layout = Layout(world=2)
    after = predict_iteration(toy, WORKLOAD, "torch_reference", layout, "float32")
    counts = parameter_counts(WORKLOAD, layout)
    sync = sum(1e-3 + n * 4 * (2 * (2 - 1) / 2) / 1e6 for n in counts.values())  # dense and expert, 2 ranks each
    assert after.phases_s["gradient sync (exposed)"] == pytest.approx(sync)
    overlapped = predict_iteration(toy, WORKLOAD, "torch_reference", layout, "float32", {"grad_sync": "overlapped"})
    hidden = sync - overlapped.phases_s["gradient sync (exposed)"]
    assert 0 < hidden <= (2 / 3) * overlapped.micro_batch_s + 1e-12
    with pytest.raises(testbeds.TestbedError, match="grad_sync 'sometimes'"):
        predict_iteration(toy, WORKLOAD, "torch_reference", layout, "float32", {"grad_sync": "sometimes"})


def test_the_memory_estimate_by_hand():
    terms = peak_memory_terms(WORKLOAD, Layout(world=1), "float32", "torch_reference")
    params = sum(parameter_counts(WORKLOAD, Layout(world=1)).values())
    T, M, H, E, b = 8, 8, 16, 2, 4
    attention = 15 * T * M * b / 2
    dense_ffn = (T * M + 2 * T * H) * b
    moe = (2 * T * M + 2 * T * H) * b + 4 * T * E  # 8 live rows (top-1), fp32 router scores
    assert terms == {"weights": params * 4, "gradients": params * 4, "optimizer": params * 8,
                     "activations": 4 * attention + 2 * dense_ffn + 2 * moe, "head": 2 * T * 32 * 4}
    bf16 = peak_memory_terms(WORKLOAD, Layout(world=1), "bfloat16", "torch_reference")
    assert bf16["optimizer"] == params * 12  # m, v and an fp32 master copy
    piped = peak_memory_terms(WORKLOAD, Layout(world=2, pp=2, vpp=2, micro_batches=4), "float32", "torch_reference")
    per_micro = 2 * attention + dense_ffn + moe  # the first stage: blocks 0 (dense) and 1 (MoE)
    assert piped["activations"] == pytest.approx(per_micro * 2 * (1 + 1 / 4)) and piped["head"] == 0
    sharded = peak_memory_terms(WORKLOAD, Layout(world=4, ep=2, distributed_optimizer=True), "float32",
                                "torch_reference")
    counts = parameter_counts(WORKLOAD, Layout(world=4, ep=2))
    assert sharded["optimizer"] == pytest.approx(8 * (counts["dense"] / 4 + counts["expert"] / 2))


def test_model_flops_by_hand():
    T, M, kv, S, B, F, V = 8, 8, 8, 4, 2, 16, 32
    attention = 3 * (2 * T * M * M * 2 + 2 * T * M * kv * 2 + 2 * 2 * B * S * S * M)
    dense = 3 * 2 * 2 * M * F * T
    head = 3 * 2 * T * M * V
    moe = 3 * T * 1 * 2 * 2 * M * F + 3 * 2 * T * M * 2  # top-1 expert rows and the router
    assert model_flops_per_iteration(WORKLOAD, Layout(world=1)) == 4 * attention + 2 * dense + head + 2 * moe
    assert model_flops_per_iteration(WORKLOAD, Layout(world=4, pp=2, micro_batches=3)) \
        == 2 * 3 * (4 * attention + 2 * dense + head + 2 * moe)  # 2 replicas x 3 micro-batches


@pytest.mark.parametrize("layout, problem", [
    (Layout(world=16), "16 ranks do not fit testbed toy (8 devices)"),
    (Layout(world=3, tp=2), "world 3 is not divisible by tp x pp = 2"),
    (Layout(world=4, ep=8), "ep 8 does not divide the 4 data-parallel ranks"),
    (Layout(world=6, ep=3), "ep 3 and 2 experts: one must divide the other"),
    (Layout(world=8, pp=8), "4 layers do not split into pp x vpp = 8 equal stages"),
    (Layout(world=4, tp=4), "tp 4 does not divide the 2 heads"),
    (Layout(world=2, pp=2, micro_batches=1), "1 micro-batches cannot fill a 2-stage pipeline"),
    (Layout(world=2, vpp=2), "vpp > 1 needs pp > 1"),
    (Layout(world=0), "world must be a positive integer"),
])
def test_impossible_layouts_are_refused_in_one_line(toy, layout, problem):
    with pytest.raises(testbeds.TestbedError) as caught:
        predict_iteration(toy, WORKLOAD, "torch_reference", layout, "float32")
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_other_scale_moves_only_the_non_moe_phases(toy):
    base = predict_iteration(toy, WORKLOAD, "torch_reference", Layout(world=1), "float32")
    scaled = predict_iteration(toy, WORKLOAD, "torch_reference", Layout(world=1), "float32", other_scale=2.0)
    assert scaled.phases_s["attention"] == pytest.approx(2 * base.phases_s["attention"])
    assert scaled.phases_s["moe layers"] == base.phases_s["moe layers"]
    assert math.isclose(scaled.total_s - base.total_s,
                        sum(base.phases_s[k] for k in ("attention", "dense ffn", "embedding and head", "optimizer")))


def test_a_larger_micro_batch_costs_more_per_micro_batch(toy):
    small = predict_iteration(toy, WORKLOAD, "torch_reference", Layout(world=1), "float32")
    large = predict_iteration(toy, replace(WORKLOAD, batch_size=4), "torch_reference", Layout(world=1), "float32")
    assert large.micro_batch_s > small.micro_batch_s


def moebench(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=root, capture_output=True, text=True,
                          timeout=300)


def test_predict_model_level_prints_an_iteration_per_system():
    proc = moebench("predict", "--testbed", "h100-cluster-4", "--level", "model", "--workload", "mixtral-8x7b",
                    "--flavor", "full", "--nproc-per-node", "8", "--nnodes", "4", "--ep", "8", "--pp", "4",
                    "--micro-batches", "8", "--dtype", "bfloat16", "--systems", "tutel,fsmoe_native",
                    "--variant", "tutel:overlap_degree=4")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("mixtral-8x7b/full")]
    assert len(lines) == 3 and "overlap_degree=4" in lines[2]
    assert "pp 4" in proc.stdout and "dp 8" in proc.stdout


@pytest.mark.parametrize("args, problem", [
    (("--level", "model", "--pp", "3"), "world 8 is not divisible by tp x pp = 3"),
    (("--pp", "2"), "use them with --level model"),
    (("--level", "model", "--option", "tutel.nosuch=1"), "tutel has no option 'nosuch'"),
])
def test_predict_refuses_an_impossible_layout_in_one_line(args, problem):
    proc = moebench("predict", "--testbed", "h100-node", "--workload", "mixtral-8x7b", "--flavor", "full",
                    "--nproc-per-node", "8", "--ep", "8", "--systems", "tutel", *args)
    assert proc.returncode == 2 and problem in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_model_level_trials_are_checked_against_the_iteration_model_at_their_layout():
    from pathlib import Path

    from harness.files import read_json
    from harness.perfmodel.memory_validation import workload_from_record
    from harness.perfmodel.validation import checked_iterations

    root = Path(__file__).resolve().parent.parent
    doc = read_json(sorted((root / "results" / "paper_fsmoe").glob("*.json"))[-1])
    testbed = testbeds.load_testbed(root / "testbeds" / "local-a06012f4.toml")
    checked, skipped = checked_iterations([doc], testbed)
    assert len(checked) == 6 and not skipped
    trial = next(t for t in doc["trials"] if t["id"] == checked[0].trial_id)
    threads = trial["setup"].get("threads_per_rank") or trial["parallel"].get("threads_per_rank")
    want = predict_iteration(testbed, workload_from_record(trial), trial["system"], Layout(world=2, ep=2),
                             "float32", trial["knobs"].get("options") or {}, threads=threads)
    assert checked[0].predicted_s == pytest.approx(want.total_s)
    assert checked[0].measured_s == trial["summary"]["median"] and "ws2 ep2" in checked[0].group
