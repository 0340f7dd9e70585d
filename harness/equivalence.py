"""Equivalence before speed: a system against torch_reference on identical weights.

Both layers get the same canonical weights and the same tokens; we compare
the forward output, the input gradient (for a fixed, contiguous upstream
gradient) and the tokens routed to each expert. When the system reports a
capacity different from Tutel's rule (DeepSpeed rounds differently and has a
minimum), the reference is run with the system's capacity so that what is
comparable is compared; the note says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from systems.base import CanonicalWeights, LayerShape, MoEKnobs, MoELayerAdapter, ParallelSpec

# Relative tolerances on max|a-b| / max|b|.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 3e-2}


@dataclass
class CheckResult:
    passed: bool
    max_rel_err_y: float
    max_rel_err_dx: float
    counts_equal: bool
    tolerance: float
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def _run(layer: MoELayerAdapter, x_TM: torch.Tensor, dy_TM: torch.Tensor):
    x = x_TM.detach().clone().requires_grad_(True)
    out = layer(x)
    out.y_TM.backward(dy_TM)
    return out.y_TM.detach(), x.grad.detach(), layer.routing_stats()


def check_against_reference(
    layer: MoELayerAdapter,
    shape: LayerShape,
    knobs: MoEKnobs,
    parallel: ParallelSpec,
    weights: CanonicalWeights,
    x_TM: torch.Tensor,
    seed: int = 0,
) -> CheckResult:
    """Compare `layer` (weights already loaded) with the reference on `x_TM`."""
    from systems.torch_reference import ReferenceMoELayer

    gen = torch.Generator().manual_seed(seed + 7)
    dy_TM = torch.randn(x_TM.shape[0], shape.model_dim, generator=gen, dtype=torch.float64).to(x_TM.dtype)
    y, dx, stats = _run(layer, x_TM, dy_TM)

    notes = []
    capacity = None
    if knobs.capacity_factor is not None and stats.capacity is not None:
        capacity = stats.capacity
        from systems.torch_reference import tutel_capacity

        tutel_c = tutel_capacity(x_TM.shape[0], shape.num_experts, shape.top_k, knobs.capacity_factor)
        if capacity != tutel_c:
            notes.append(f"capacity {capacity} differs from Tutel's rule ({tutel_c}); reference run with {capacity}")
    reference = ReferenceMoELayer(shape, knobs, parallel, capacity=capacity).to(x_TM.device)
    reference.load_canonical(weights.to(dtype=knobs.torch_dtype))
    y_ref, dx_ref, stats_ref = _run(reference, x_TM, dy_TM)

    tol = TOLERANCE[knobs.dtype]
    err_y, err_dx = rel_err(y, y_ref), rel_err(dx, dx_ref)
    counts_equal = list(stats.tokens_per_expert) == list(stats_ref.tokens_per_expert)
    if not counts_equal:
        notes.append(f"tokens per expert {stats.tokens_per_expert} vs reference {stats_ref.tokens_per_expert}")
    passed = err_y <= tol and err_dx <= tol and counts_equal
    return CheckResult(passed, err_y, err_dx, counts_equal, tol, "; ".join(notes))
