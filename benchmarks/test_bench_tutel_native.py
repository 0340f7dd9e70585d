"""pytest-benchmark view of bench_tutel_native.py (run: tox -e bench-pytest, or
.venv/bin/python -m pytest benchmarks/test_bench_tutel_native.py --benchmark-only).

Same cases, same proxy layer; pytest-benchmark groups them so the table shows
the useful-GEMM floor next to the layer. Ratios, not absolute times, are the result.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.bench_tutel_native import (
    GEMM_PATHS,
    SHAPE,
    fastest_paths,
    floor_paths,
    layer_step,
    useful_ffn,
    useful_gemms,
)
from core.values import CanonicalWeights, MoEKnobs, ParallelSpec
from harness.host_memory import keep_freed_memory
from systems.torch_reference import ReferenceMoELayer
from systems.tutel_native.adapter import TutelNative

pytestmark = pytest.mark.benchmark(group="tutel_native mixtral-8x7b proxy fwd+bwd")
TOKENS = 1024


@pytest.fixture(scope="module")
def setup():
    keep_freed_memory()  # the host-memory policy every trial applies (harness/host_memory.py)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    knobs = MoEKnobs(capacity_factor=1.25)
    weights = CanonicalWeights.random(SHAPE, seed=0)
    x = torch.randn(TOKENS, SHAPE.model_dim, generator=gen)
    dy = torch.randn(TOKENS, SHAPE.model_dim, generator=gen)
    tutel = TutelNative().build_layer(SHAPE, knobs, ParallelSpec())
    tutel.load_canonical(weights)
    reference = ReferenceMoELayer(SHAPE, knobs, ParallelSpec())
    reference.load_canonical(weights)
    choice, _ = fastest_paths(floor_paths(TOKENS, SHAPE, torch.float32, gen), rounds=3)
    return {
        "gemm": useful_gemms(TOKENS, SHAPE, torch.float32, gen, choice),  # the fastest path per GEMM
        "ffn": useful_ffn(TOKENS, SHAPE, torch.float32, gen),
        "tutel": layer_step(tutel, x, dy),
        "dropless": layer_step(tutel, x, dy, capacity_factor=0.0),
        "reference": layer_step(reference, x, dy),
    }


@pytest.mark.parametrize("case", ["gemm", "ffn", "tutel", "dropless", "reference"])
def test_fwd_bwd(benchmark, setup, case):
    benchmark.pedantic(setup[case], rounds=5, warmup_rounds=1)


def test_floor_paths_compute_the_same_gemms():
    """Every path kept for the floor gives bmm's result (floor_paths checks it), MKL's two always
    run, and oneDNN joins wherever tutel_native's own oneDNN kernel is available."""
    from systems.tutel_native.per_expert import kernel_available

    small = dataclasses.replace(SHAPE, model_dim=32, ffn_dim=48)
    gemms = floor_paths(64, small, torch.float32, torch.Generator().manual_seed(0))
    assert len(gemms) == 9
    for paths in gemms.values():
        assert {"bmm", "mm"} <= set(paths) <= set(GEMM_PATHS)
        assert ("onednn" in paths) == kernel_available("cpu", torch.float32)
    choice, medians = fastest_paths(gemms, rounds=1)
    assert all(choice[name] == min(medians[name], key=medians[name].get) for name in gemms)
