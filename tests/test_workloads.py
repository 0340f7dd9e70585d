"""Workloads: synthetic routing, the model-level transformer, workload resolution."""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from core.errors import InputError
from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from harness.model import AUX_LOSS_COEF, build_model, make_batch, moe_block_indices
from systems.base import MoELayerAdapter, MoEOutput, MoESystem, RoutingStats
from systems.torch_reference import ReferenceMoELayer, TorchReference
from tests.dense_moe import dense_moe
from workloads.flavors import get_workload, workload_names
from workloads.resolve import resolve_workload
from workloads.routing import ROUTINGS, make_layer_inputs, sample_targets, zipf_probabilities

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- routing


def route_with_reference(shape, x_TM, weights, dtype):
    layer = ReferenceMoELayer(shape, MoEKnobs(capacity_factor=None, dtype=dtype), ParallelSpec())
    layer.load_canonical(weights)
    layer(x_TM)
    return layer.route(x_TM)[1], layer.routing_stats()


@pytest.mark.parametrize("routing", ["balanced", "zipf"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_routes_exactly_to_the_sampled_targets(routing, top_k, dtype):
    shape = LayerShape(model_dim=16, ffn_dim=8, num_experts=8, top_k=top_k, activation="swiglu")
    T = 256
    x_TM, weights = make_layer_inputs(shape, T, routing, seed=4, rank=1, dtype=getattr(torch, dtype))
    targets_TK = sample_targets(shape, T, routing, seed=4, rank=1)
    idx_TK, stats = route_with_reference(shape, x_TM, weights, dtype)
    assert torch.equal(idx_TK, targets_TK)
    assert stats.tokens_per_expert == torch.bincount(targets_TK.flatten(), minlength=8).tolist()
    assert all(len(set(row)) == top_k for row in targets_TK.tolist()), "choices of a token must be distinct"
    first_counts = torch.bincount(targets_TK[:, 0], minlength=8)
    if routing == "balanced":
        assert first_counts.tolist() == [T // 8] * 8
        assert stats.tokens_per_expert == [T * top_k // 8] * 8
    else:
        p_E = zipf_probabilities(8, seed=4)
        assert int(first_counts.argmax()) == int(p_E.argmax())
        assert first_counts.max() > 2 * T / 8  # far from balanced: hottest expert ~0.43 of first choices
        assert p_E.max().item() == pytest.approx(1 / sum(r**-1.2 for r in range(1, 9)))


def test_balanced_with_uneven_division_and_square_model():
    shape = LayerShape(model_dim=5, ffn_dim=4, num_experts=5, top_k=5)  # M == E: no free directions
    x_TM, weights = make_layer_inputs(shape, 13, "balanced", seed=0)
    idx_TK, stats = route_with_reference(shape, x_TM, weights, "float32")
    first = torch.bincount(idx_TK[:, 0], minlength=5)
    assert first.max() - first.min() == 1 and first.sum() == 13
    assert torch.equal(idx_TK, sample_targets(shape, 13, "balanced", seed=0))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_same_arguments_give_bit_identical_tensors(routing):
    shape = LayerShape(model_dim=16, ffn_dim=8, num_experts=4, top_k=2, expert_bias=True)
    x1, w1 = make_layer_inputs(shape, 32, routing, seed=9, rank=2)
    x2, w2 = make_layer_inputs(shape, 32, routing, seed=9, rank=2)
    x3, w3 = make_layer_inputs(shape, 32, routing, seed=9, rank=3)
    x4, _ = make_layer_inputs(shape, 32, routing, seed=10, rank=2)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3) and not torch.equal(x1, x4)
    for name in ("gate_EM", "w1_EHM", "w2_EHM", "b1_EH", "b2_EM"):
        assert torch.equal(getattr(w1, name), getattr(w2, name))
        assert torch.equal(getattr(w1, name), getattr(w3, name)), "weights must not depend on the rank"
    if routing == "learned":
        reference = CanonicalWeights.random(shape, seed=9)
        assert torch.equal(w1.w1_EHM, reference.w1_EHM) and torch.equal(w1.gate_EM, reference.gate_EM)


def _digest_of_inputs() -> str:
    shape = LayerShape(model_dim=16, ffn_dim=8, num_experts=4, top_k=2)
    parts = []
    for routing in ROUTINGS:
        x, w = make_layer_inputs(shape, 16, routing, seed=1, rank=1)
        parts += [x, w.gate_EM, w.w1_EHM, w.w2_EHM]
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in parts)).hexdigest()


def test_inputs_are_identical_in_another_process():
    code = "import tests.test_workloads as t; print(t._digest_of_inputs())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest_of_inputs()


def test_synthetic_routing_rejections():
    with pytest.raises(ValueError, match="model_dim >= num_experts"):
        make_layer_inputs(LayerShape(model_dim=4, ffn_dim=4, num_experts=8, top_k=1), 8, "zipf", seed=0)
    with pytest.raises(ValueError, match="unknown routing 'uniform'"):
        make_layer_inputs(LayerShape(model_dim=8, ffn_dim=4, num_experts=4, top_k=1), 8, "uniform", seed=0)


# ---------------------------------------------------------------- model


def test_moe_block_placement():
    assert moe_block_indices(4, 2) == [1, 3]
    assert moe_block_indices(3, 1) == [0, 1, 2]
    assert moe_block_indices(6, 3) == [2, 5]
    assert moe_block_indices(5, 1, first_dense=3) == [3, 4]  # DeepSeek-V3's leading dense blocks


@pytest.mark.parametrize("name", workload_names())
def test_debug_model_trains_and_is_reproducible(name):
    workload = get_workload(name, "debug")
    knobs = MoEKnobs(capacity_factor=workload.capacity_factor)
    tokens, targets = make_batch(workload, seed=0)
    assert tokens.shape == targets.shape == (workload.batch_size, workload.seq_len)
    assert torch.equal(tokens[:, 1:], targets[:, :-1])

    def losses(seed):
        model = build_model(workload, TorchReference(), knobs, ParallelSpec(), seed=seed)
        expected_moe = moe_block_indices(workload.model.n_layers, workload.model.moe_every,
                                         workload.model.first_dense)
        assert [i for i, block in enumerate(model.blocks) if block.is_moe] == expected_moe
        assert len(model.moe_layers) == len(expected_moe) >= 1
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        history = []
        for _ in range(4):
            loss, l_aux = model.loss(tokens, targets)
            assert torch.isfinite(loss) and l_aux.item() > 0
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        return history

    first = losses(seed=1)
    assert first[-1] < first[0] - 0.1, first
    assert losses(seed=1) == first
    assert losses(seed=2) != first
    assert abs(first[0] - math.log(workload.model.vocab_size)) < 0.5  # near-uniform prediction at init


class DenseMoELayer(MoELayerAdapter):
    """Test-only MoE layer computed with the dense GShard formulation of tests/dense_moe.py."""

    def __init__(self, shape: LayerShape, knobs: MoEKnobs):
        super().__init__()
        self.shape, self.knobs = shape, knobs
        self.params = nn.ParameterDict()

    def load_canonical(self, weights: CanonicalWeights) -> None:
        for name in ("gate_EM", "w1_EHM", "w2_EHM", "w3_EHM", "b1_EH", "b2_EM"):
            value = getattr(weights, name)
            if value is not None:
                self.params[name] = nn.Parameter(value.clone().to(self.knobs.torch_dtype))

    def forward(self, x_TM):
        p = self.params
        result = dense_moe(x_TM, p["gate_EM"], p["w1_EHM"], p["w2_EHM"], p.get("w3_EHM"), p.get("b1_EH"),
                           p.get("b2_EM"), self.shape.top_k, self.shape.activation, self.knobs.capacity_factor)
        self._dropped = result.dropped
        return MoEOutput(result.y_TM, result.l_aux)

    def routing_stats(self):
        return RoutingStats(tokens_per_expert=[], dropped=self._dropped, capacity=None, l_aux=None)


class DenseMoESystem(MoESystem):
    name = "dense_test"

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return DenseMoELayer(shape, knobs)


@pytest.mark.parametrize("name", ["gpt2-xl-moe", "mixtral-8x7b"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_model_with_reference_moe_equals_dense_formulation(name, capacity_factor):
    debug = get_workload(name, "debug")
    workload = replace(debug, model=replace(debug.model, n_layers=2 * debug.model.moe_every))  # 2 MoE blocks
    knobs = MoEKnobs(capacity_factor=capacity_factor, dtype="float64")
    tokens, targets = make_batch(workload, seed=3)
    results = []
    for system in (TorchReference(), DenseMoESystem()):
        model = build_model(workload, system, knobs, ParallelSpec(), seed=5)
        loss, l_aux = model.loss(tokens, targets)
        loss.backward()
        results.append((model, loss, l_aux))
    (ref, ref_loss, ref_aux), (dense, dense_loss, dense_aux) = results
    if capacity_factor is not None:
        assert sum(layer._dropped for layer in dense.moe_layers) > 0
    assert abs(ref_loss.item() - dense_loss.item()) <= 1e-12 * abs(dense_loss.item())
    assert abs(ref_aux.item() - dense_aux.item()) <= 1e-12 * abs(dense_aux.item())
    assert ref_loss.item() == pytest.approx(dense_loss.item() - AUX_LOSS_COEF * dense_aux.item()
                                            + AUX_LOSS_COEF * ref_aux.item(), rel=1e-12)
    ref_dense_params = ref.non_moe_parameters()
    dense_dense_params = dense.non_moe_parameters()
    assert len(ref_dense_params) == len(dense_dense_params)
    for a, b in zip(ref_dense_params, dense_dense_params, strict=True):
        assert torch.equal(a.detach(), b.detach()), "non-MoE weights must be identical across systems"
        assert ((a.grad - b.grad).abs().max() <= 1e-10 * b.grad.abs().max()).item()
    for ref_layer, dense_layer in zip(ref.moe_layers, dense.moe_layers, strict=True):
        ref_grads = {"gate_EM": ref_layer.gate_EM.grad, "w1_EHM": ref_layer.experts.w1_EHM.grad,
                     "w2_EHM": ref_layer.experts.w2_EHM.grad}
        for key, grad in ref_grads.items():
            other = dense_layer.params[key].grad
            assert ((grad - other).abs().max() <= 1e-10 * other.abs().max()).item(), key


# ---------------------------------------------------------------- resolve


def write(tmp_path, text: str, name="w.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_example_config_resolves():
    workload = resolve_workload(None, "proxy", {}, str(REPO / "workloads/examples/small-moe.toml"))
    assert workload.name == "small-moe" and workload.flavor == "custom"
    assert workload.layer == LayerShape(model_dim=256, ffn_dim=1024, num_experts=8, top_k=2, activation="gelu",
                                        expert_bias=True)
    assert (workload.model.n_layers, workload.model.n_heads, workload.model.n_kv_heads) == (4, 4, 2)
    assert (workload.batch_size, workload.seq_len, workload.capacity_factor) == (4, 128, 1.25)


def test_config_on_a_base_preset_with_overrides(tmp_path):
    path = write(tmp_path, 'base = "mixtral-8x7b"\nflavor = "debug"\ncapacity_factor = "dropless"\n'
                           '[layer]\ntop_k = 3\n[model]\nn_layers = 3\n')
    workload = resolve_workload(None, "proxy", {"seq_len": 16}, path)
    debug = get_workload("mixtral-8x7b", "debug")
    assert workload.name == "mixtral-8x7b" and workload.flavor == "debug"
    assert workload.layer == replace(debug.layer, top_k=3)
    assert workload.model == replace(debug.model, n_layers=3)
    assert (workload.seq_len, workload.batch_size, workload.capacity_factor) == (16, debug.batch_size, None)
    assert "overridden: seq_len=16" in workload.notes


def test_custom_from_overrides_is_dropless_by_default():
    workload = resolve_workload("custom", "proxy", {"model_dim": 128, "ffn_dim": 256, "num_experts": 4,
                                                     "top_k": "1", "activation": "swiglu", "n_layers": None}, None)
    assert workload.flavor == "custom" and workload.capacity_factor is None
    assert workload.layer.top_k == 1 and workload.model.norm == "rmsnorm" and workload.model.n_heads == 2
    assert resolve_workload("gpt2-xl-moe", "debug", {"capacity_factor": 2}, None).capacity_factor == 2.0


@pytest.mark.parametrize("text,fragment", [
    ("[layer]\nmodel_dim = 0\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\n", "model_dim must be a positive integer"),
    ("[layer]\nmodel_dim = 8\nffn_dim = -1\nnum_experts = 4\ntop_k = 1\n", "ffn_dim must be a positive integer"),
    ("batch_size = 0\n[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\n", "batch_size must be"),
    ("[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 5\n", "top_k (5) is larger than num_experts"),
    ("[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\nactivation = 'tanh'\n", "unknown activation"),
    ("[layer]\nmodel_dim = 'big'\n", "layer.model_dim must be an integer"),
    ("[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\nwidth = 3\n", "unknown key 'layer.width'"),
    ("batchsize = 4\n", "unknown key 'batchsize'"),
    ("[optimizer]\nlr = 1\n", "unknown key 'optimizer'"),
    ("capacity_factor = 'none'\n", "capacity_factor must be a positive number or \"dropless\""),
    ("capacity_factor = -1.0\n", "capacity_factor must be a positive number"),
    ("[layer]\nmodel_dim = 8\n", "missing ffn_dim, num_experts, top_k"),
    ("base = 'gpt5'\n", "unknown workload 'gpt5'"),
    ("base = 'mixtral-8x7b'\nflavor = 'tiny'\n", "unknown flavor 'tiny'"),
    ("flavor = 'debug'\n[layer]\nmodel_dim = 8\n", "'flavor' needs 'base'"),
    ("[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\n[model]\nn_heads = 3\n", "not divisible"),
    ("name = 'a/b'\n[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\n", "workload name 'a/b'"),
    ("model_dim = = 3\n", "invalid TOML"),
])
def test_config_errors_are_one_line_and_name_the_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        resolve_workload(None, "proxy", {}, path)
    message = str(info.value)
    assert fragment in message and "\n" not in message and path in message


def test_missing_file_and_conflicting_arguments(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match=f"cannot read workload config {missing}: No such file"):
        resolve_workload(None, "proxy", {}, missing)
    path = write(tmp_path, "[layer]\nmodel_dim = 8\nffn_dim = 8\nnum_experts = 4\ntop_k = 1\n")
    with pytest.raises(ValueError, match="put base = \"mixtral-8x7b\" in the config"):
        resolve_workload("mixtral-8x7b", "proxy", {}, path)
    with pytest.raises(ValueError, match="unknown workload override 'width'"):
        resolve_workload("mixtral-8x7b", "proxy", {"width": 3}, None)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        resolve_workload("mixtral-8x7b", "proxy", {"top_k": "two"}, None)
    with pytest.raises(ValueError, match="no workload given"):
        resolve_workload(None, "proxy", {}, None)
