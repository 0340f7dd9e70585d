"""Equivalence before speed: a system against torch_reference on identical weights.

Both layers get the same canonical weights and the same tokens; we compare
the forward output, the input gradient (for a fixed, contiguous upstream
gradient) and the tokens routed to each expert (exactly).

Peers do not all route like Tutel when capacity is limited. A layer may say
how via ``reference_policy() -> ReferencePolicy`` (called after its forward):
the capacity it used, which choices it drops (slot position, as Tutel, or
lowest probability, as Megatron), whether it renormalises gate values over the
kept choices (DeepSpeed), and a tolerance floor (e.g. DeepSpeed routes in fp32
even for fp64 inputs). The reference is then run with that policy, so what is
comparable is compared, and the note says what differed. A layer without
``reference_policy`` gets the old rule: the reference mirrors its capacity.

Legend: T tokens, M model dim, E experts, K top-k choices.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import DROP_ORDERS, TOLERANCE, MoELayerAdapter, ReferencePolicy


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


def keep_by_score(idx_TK: torch.Tensor, score_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Per expert, keep the `capacity` choices with the highest score (ties: lower token first)."""
    keep_TK = torch.zeros_like(idx_TK, dtype=torch.bool)
    flat_idx, flat_score = idx_TK.flatten(), score_TK.detach().flatten()
    flat_keep = keep_TK.view(-1)
    for e in range(num_experts):
        rows = torch.nonzero(flat_idx == e, as_tuple=True)[0]
        if rows.numel() > capacity:
            order = torch.argsort(flat_score[rows], descending=True, stable=True)
            rows = rows[order[:capacity]]
        flat_keep[rows] = True
    return keep_TK


def policy_reference(shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec, policy: ReferencePolicy):
    """torch_reference's layer routed by `policy` (a subclass overriding only route())."""
    from systems.torch_reference import ReferenceMoELayer, slot_locations

    if policy.drop_order not in DROP_ORDERS:
        raise ValueError(f"drop_order must be one of {DROP_ORDERS}, got {policy.drop_order!r}")

    class PolicyReference(ReferenceMoELayer):
        def route(self, x_TM):
            probs_TE, idx_TK, gates_TK, keep_TK, capacity = super().route(x_TM)
            self.last_idx_TK = idx_TK
            if capacity is None:
                return probs_TE, idx_TK, gates_TK, keep_TK, capacity
            E = self.shape.num_experts
            if policy.drop_order == "position":
                keep_TK = slot_locations(idx_TK, E) < capacity
            elif policy.drop_order == "prob":
                keep_TK = keep_by_score(idx_TK, probs_TE.gather(1, idx_TK), E, capacity)
            elif policy.drop_order == "gate":
                keep_TK = keep_by_score(idx_TK, gates_TK, E, capacity)
            else:
                keep_TK = policy.keep_TK.to(keep_TK.device)
            if policy.renormalize_after_drop:
                raw_TK = probs_TE.gather(1, idx_TK) * keep_TK
                gates_TK = raw_TK / raw_TK.sum(1, keepdim=True).clamp_min(torch.finfo(raw_TK.dtype).eps)
            return probs_TE, idx_TK, gates_TK, keep_TK, capacity

    return PolicyReference(shape, knobs, parallel, capacity=policy.capacity)


def _policy_of(layer: MoELayerAdapter, stats, shape: LayerShape, knobs: MoEKnobs, num_tokens: int) -> ReferencePolicy:
    if hasattr(layer, "reference_policy"):
        return layer.reference_policy()
    if knobs.capacity_factor is None or stats.capacity is None:
        return ReferencePolicy()
    from systems.torch_reference import tutel_capacity

    tutel_c = tutel_capacity(num_tokens, shape.num_experts, shape.top_k, knobs.capacity_factor)
    if stats.capacity == tutel_c:
        return ReferencePolicy(capacity=stats.capacity)
    return ReferencePolicy(capacity=stats.capacity, note=f"capacity {stats.capacity} differs from Tutel's rule "
                           f"({tutel_c}); reference run with {stats.capacity}")


def check_against_reference(
    layer: MoELayerAdapter,
    shape: LayerShape,
    knobs: MoEKnobs,
    parallel: ParallelSpec,
    weights: CanonicalWeights,
    x_TM: torch.Tensor,
    seed: int = 0,
) -> CheckResult:
    """Compare `layer` (weights already loaded) with the reference on `x_TM`.

    The reference always runs in this one process holding all E experts: whatever the
    layer's layout (`parallel`: expert parallel, sharded experts, any r), a rank's output
    must equal a single-process layer's on that rank's tokens (tutel-semantics.md, section 4).
    Every rank of a multi-rank layer must call this (its forward is collective)."""
    gen = torch.Generator().manual_seed(seed + 7)
    dy_TM = torch.randn(x_TM.shape[0], shape.model_dim, generator=gen, dtype=torch.float64).to(x_TM.dtype)
    y, dx, stats = _run(layer, x_TM, dy_TM)

    policy = _policy_of(layer, stats, shape, knobs, x_TM.shape[0])
    notes = [policy.note] if policy.note else []
    reference = policy_reference(shape, knobs, ParallelSpec(), policy).to(x_TM.device)
    reference.load_canonical(weights.to(dtype=knobs.torch_dtype))
    y_ref, dx_ref, stats_ref = _run(reference, x_TM, dy_TM)

    tol = max(TOLERANCE[knobs.dtype], policy.min_tolerance)
    err_y, err_dx = rel_err(y, y_ref), rel_err(dx, dx_ref)
    counts_equal = list(stats.tokens_per_expert) == list(stats_ref.tokens_per_expert)
    if not counts_equal:
        notes.append(f"tokens per expert {stats.tokens_per_expert} vs reference {stats_ref.tokens_per_expert}")
    passed = err_y <= tol and err_dx <= tol and counts_equal
    if policy.drop_order == "given" and policy.capacity is not None:
        kept_E = torch.bincount(reference.last_idx_TK[policy.keep_TK], minlength=shape.num_experts)
        want_E = torch.tensor(stats_ref.tokens_per_expert).clamp(max=policy.capacity)
        if not torch.equal(kept_E.cpu(), want_E):
            passed = False
            notes.append(f"kept per expert {kept_E.tolist()} is not min(load, capacity) {want_E.tolist()}")
    return CheckResult(passed, err_y, err_dx, counts_equal, tol, "; ".join(notes))
