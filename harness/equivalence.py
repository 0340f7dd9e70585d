"""Equivalence before speed: a system against torch_reference on identical weights.

Both layers get the same canonical weights and the same tokens, and one
backward of ``y`` with a fixed, contiguous upstream gradient (not of l_aux).
Compared, each as max|a-b| / max|b| against one tolerance:

* ``y``: the forward output; ``dx``: the input gradient;
* ``grad_<name>``: every weight gradient in canonical layout
  (``MoELayerAdapter.canonical_gradients``: gate_EM, w1_EHM, w2_EHM, w3_EHM,
  b1_EH, b2_EM), the rank's local experts against the reference's same experts;
* ``l_aux`` where the system returns the reference's GShard loss
  (``aux_loss_mismatch() == ""``), else the note says why it is not compared;
* tokens per expert, exactly.

Expert parallelism: the reference runs all E experts in this one process on
this rank's tokens, so its output, input gradient, gate gradient, l_aux and
counts are this rank's and compare directly. An expert's gradient in the
multi-rank layer comes from every rank's tokens routed to it: it equals the
sum over the expert-parallel group of each rank's reference gradient, so the
reference's expert gradients are all-reduced (summed) over that group first.
Sharded experts (tutel_native, ep > E) have no per-rank canonical form: their
weight gradients are not compared (the note says so).

Tolerance: ``TOLERANCE[dtype]`` (systems/base.py), or the tolerance of the
lower precision a system declares (``internal_precision``: DeepSpeed's and
Megatron's fp32 gates, real Tutel's fp32 dispatch of fp64 input), with the
declared reason in the note.

Peers do not all route like Tutel when capacity is limited. A layer may say
how via ``reference_policy() -> ReferencePolicy`` (called after its forward):
the capacity it used, which choices it drops (slot position, as Tutel, or
lowest probability, as Megatron), whether it renormalises gate values over the
kept choices (DeepSpeed), or that it has no capacity rule at all (``dropless``:
the reference then keeps every choice whatever the capacity factor). The
reference is then run with that policy, so what is comparable is compared, and
the note says what differed. A layer without
``reference_policy`` gets the old rule: the reference mirrors its capacity.

Checksums (every round is checked): the full check also returns compact
summaries of what the system computed (``checksum``); a later round of the
same trial recomputes them on the same inputs and weights
(``verify_checksum``). Each tensor (each expert's slice of an expert
gradient) is summarised by (sum, sum|t|, sum t*w) with a fixed seeded w in
[-1, 1]; a summary agrees when every entry is within CHECKSUM_TOLERANCE x
sum|t| of the recorded one, l_aux within that relative tolerance, tokens per
expert exactly. Run-to-run floating-point differences (reduction order, GPU
atomics) move each element by a few ulps, hence a summary by ~1e-7 of sum|t|
in fp32; a changed computation (one expert's gradient off by 1e-3) moves that
expert's summary by ~1e-3 and fails.

Legend: T tokens, M model dim, E experts, K top-k choices.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

import torch

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import (
    AUX_LOSS_UNSTATED,
    DROP_ORDERS,
    ROUTER_PRECISIONS,
    TOLERANCE,
    GradientsNotComparable,
    MoELayerAdapter,
    ReferencePolicy,
)
from systems.shared_expert import with_shared_expert

# Relative to sum|t| of a summarised tensor; 10x the equivalence tolerance (bf16: the same),
# see the module docstring.
CHECKSUM_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2}
CHECKSUM_SEED = 20260611
GRAD_NAMES = tuple(f.name for f in fields(CanonicalWeights))
# Per-expert tensors (dim 0 is the expert); the gate, the router bias and the shared expert are not.
EXPERT_GRAD_NAMES = tuple(n for n in GRAD_NAMES if n.endswith(("_EHM", "_EH", "_EM")) and n != "gate_EM")


@dataclass
class CheckResult:
    passed: bool
    max_rel_err_y: float
    max_rel_err_dx: float
    counts_equal: bool
    tolerance: float
    note: str = ""
    # name -> relative error of every compared quantity: y, dx, grad_<canonical name>, l_aux
    rel_err: dict[str, float] = field(default_factory=dict)
    max_rel_err_grad: float | None = None  # worst weight-gradient error (None: none compared)
    declared_precision: str = ""  # the system's internal-precision declaration, if any
    checksum: dict | None = None  # what a later round recomputes (module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


@dataclass
class _Run:
    y_TM: torch.Tensor
    dx_TM: torch.Tensor
    stats: object
    l_aux: torch.Tensor | None
    grads: CanonicalWeights | None
    grads_why_not: str = ""


def upstream_gradient(num_tokens: int, model_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The fixed dy the check and the checksum verification backpropagate."""
    gen = torch.Generator().manual_seed(seed + 7)
    return torch.randn(num_tokens, model_dim, generator=gen, dtype=torch.float64).to(dtype)


def _run(layer: MoELayerAdapter, x_TM: torch.Tensor, dy_TM: torch.Tensor) -> _Run:
    layer.zero_grad(set_to_none=True)
    x = x_TM.detach().clone().requires_grad_(True)
    out = layer(x)
    out.y_TM.backward(dy_TM.to(out.y_TM.device))
    grads, why_not = None, ""
    try:
        grads = layer.canonical_gradients()
    except GradientsNotComparable as exc:
        why_not = str(exc)
    except NotImplementedError as exc:
        why_not = f"MISSING: {exc}"
    l_aux = None if out.l_aux is None else out.l_aux.detach()
    return _Run(out.y_TM.detach(), x.grad.detach(), layer.routing_stats(), l_aux, grads, why_not)


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
    if policy.dropless:  # the system has no capacity rule: the reference keeps every choice too
        knobs = dataclasses.replace(knobs, capacity_factor=None)

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
            return probs_TE, idx_TK, gates_TK.to(x_TM.dtype), keep_TK, capacity

    if policy.router_precision not in ROUTER_PRECISIONS:
        raise ValueError(f"router_precision must be one of {ROUTER_PRECISIONS}, got {policy.router_precision!r}")
    reference = PolicyReference(shape, knobs, parallel, capacity=policy.capacity)
    reference.router_precision = policy.router_precision
    return reference


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


def declared_tolerance(layer: MoELayerAdapter, dtype: str, table: dict[str, float]) -> tuple[float, str]:
    """(tolerance, note) for `dtype` input, after the layer's internal-precision declaration."""
    tol = table[dtype]
    declared = layer.internal_precision(dtype)
    if declared is None or table[declared.dtype] <= tol:
        return tol, ""
    return table[declared.dtype], f"declared {declared.dtype} for {dtype} input: {declared.reason}"


def _sum_over_expert_group(grads: CanonicalWeights, parallel: ParallelSpec) -> None:
    """In place: each expert gradient summed over this rank's expert-parallel group."""
    import torch.distributed as dist

    if parallel.ep == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    from systems.distributed import expert_parallel_group

    group, _ = expert_parallel_group(parallel.ep)
    for name in EXPERT_GRAD_NAMES:
        t = getattr(grads, name)
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _compare_gradients(got: _Run, ref: _Run, layer: MoELayerAdapter, parallel: ParallelSpec,
                       errors: dict[str, float], notes: list[str]) -> bool:
    """Adds grad_<name> errors; False when a gradient is missing on one side only."""
    if got.grads is None:
        if got.grads_why_not.startswith("MISSING"):
            notes.append(f"weight gradients not compared: {got.grads_why_not}")
            return False
        notes.append(f"weight gradients not comparable: {got.grads_why_not}")
        return True
    _sum_over_expert_group(ref.grads, parallel)
    first, count = layer.local_experts()
    want = ref.grads.expert_slice(first, count)
    ok = True
    for name in GRAD_NAMES:
        a, b = getattr(got.grads, name), getattr(want, name)
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            notes.append(f"gradient {name}: shape {None if a is None else tuple(a.shape)} vs reference "
                         f"{None if b is None else tuple(b.shape)}")
            ok = False
            continue
        errors[f"grad_{name}"] = rel_err(a, b.to(a.device))
    return ok


def _compare_l_aux(got: _Run, ref: _Run, layer: MoELayerAdapter, errors: dict[str, float], notes: list[str]) -> None:
    why = layer.aux_loss_mismatch()
    if got.l_aux is None and why in ("", AUX_LOSS_UNSTATED):
        why = "the system returns none"
    if why:
        notes.append(f"l_aux not comparable: {why}")
        return
    errors["l_aux"] = rel_err(got.l_aux.reshape(()), ref.l_aux.reshape(()).to(got.l_aux.device))


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
    Every rank of a multi-rank layer must call this (its forward is collective). Leaves the
    layer's gradients set: the caller zeroes them."""
    dy_TM = upstream_gradient(x_TM.shape[0], shape.model_dim, x_TM.dtype, seed)
    got = _run(layer, x_TM, dy_TM)

    policy = _policy_of(layer, got.stats, shape, knobs, x_TM.shape[0])
    notes = [policy.note] if policy.note else []
    reference = with_shared_expert(policy_reference(shape, knobs, ParallelSpec(), policy), shape,
                                   knobs.torch_dtype).to(x_TM.device)
    reference.load_canonical(weights.to(dtype=knobs.torch_dtype, device=x_TM.device))
    ref = _run(reference, x_TM, dy_TM)

    tol, declared = declared_tolerance(layer, knobs.dtype, TOLERANCE)
    if declared:
        notes.append(f"{declared} ({tol:.0e} tolerance)")
    errors = {"y": rel_err(got.y_TM, ref.y_TM), "dx": rel_err(got.dx_TM, ref.dx_TM)}
    grads_ok = _compare_gradients(got, ref, layer, parallel, errors, notes)
    _compare_l_aux(got, ref, layer, errors, notes)
    counts_equal = list(got.stats.tokens_per_expert) == list(ref.stats.tokens_per_expert)
    if not counts_equal:
        notes.append(f"tokens per expert {got.stats.tokens_per_expert} vs reference {ref.stats.tokens_per_expert}")
    over = [name for name, err in errors.items() if not err <= tol]  # NaN fails
    if over:
        notes.append("over tolerance: " + ", ".join(f"{n} {errors[n]:.1e}" for n in over))
    passed = not over and counts_equal and grads_ok
    if policy.drop_order == "given" and policy.capacity is not None:
        kept_E = torch.bincount(reference.last_idx_TK[policy.keep_TK], minlength=shape.num_experts)
        want_E = torch.tensor(ref.stats.tokens_per_expert).clamp(max=policy.capacity)
        if not torch.equal(kept_E.cpu(), want_E):
            passed = False
            notes.append(f"kept per expert {kept_E.tolist()} is not min(load, capacity) {want_E.tolist()}")
    grad_errs = [v for k, v in errors.items() if k.startswith("grad_")]
    return CheckResult(passed, errors["y"], errors["dx"], counts_equal, tol, "; ".join(notes), rel_err=errors,
                       max_rel_err_grad=max(grad_errs) if grad_errs else None, declared_precision=declared,
                       checksum=_checksum_of(got, layer, knobs))


# ----------------------------------------------------------------- checksums

def _summary_weights(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(CHECKSUM_SEED + n)
    return torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1


def tensor_summary(t: torch.Tensor, per_expert: bool = False) -> list[list[float]]:
    """[(sum, sum|t|, sum t*w)] of the whole tensor, or of each expert's slice (dim 0)."""
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    rows = t64.reshape(t64.shape[0], -1) if per_expert else t64.reshape(1, -1)
    w = _summary_weights(rows.shape[1])
    return [[float(r.sum()), float(r.abs().sum()), float((r * w).sum())] for r in rows]


def _checksum_of(run: _Run, layer: MoELayerAdapter, knobs: MoEKnobs) -> dict:
    tol, _ = declared_tolerance(layer, knobs.dtype, CHECKSUM_TOLERANCE)
    grads = None
    if run.grads is not None:
        grads = {name: tensor_summary(getattr(run.grads, name), per_expert=name in EXPERT_GRAD_NAMES)
                 for name in GRAD_NAMES if getattr(run.grads, name) is not None}
    return {
        "tolerance": tol,
        "y_TM": tensor_summary(run.y_TM),
        "dx_TM": tensor_summary(run.dx_TM),
        "grads": grads,
        "l_aux": None if run.l_aux is None else float(run.l_aux),
        "tokens_per_expert": [int(c) for c in run.stats.tokens_per_expert],
    }


def summary_deviation(got: list[list[float]], want: list[list[float]]) -> float:
    """Largest |got - want| of any summary entry, relative to that slice's recorded sum|t|."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        scale = abs(w[1]) or 1.0
        worst = max(worst, *(abs(a - b) / scale for a, b in zip(g, w, strict=True)))
    return worst


def compare_checksums(got: dict, want: dict) -> tuple[bool, float, str]:
    """(passed, worst deviation, note) of a recomputed checksum against the recorded one."""
    tol = want["tolerance"]
    devs = {"y_TM": summary_deviation(got["y_TM"], want["y_TM"]),
            "dx_TM": summary_deviation(got["dx_TM"], want["dx_TM"])}
    notes = []
    for name, summary in (want.get("grads") or {}).items():
        if got.get("grads") is None or name not in got["grads"]:
            notes.append(f"gradient {name} missing")
            devs[f"grad_{name}"] = float("inf")
        else:
            devs[f"grad_{name}"] = summary_deviation(got["grads"][name], summary)
    if want.get("l_aux") is not None:
        g = got.get("l_aux")
        devs["l_aux"] = float("inf") if g is None else abs(g - want["l_aux"]) / (abs(want["l_aux"]) or 1.0)
    counts_equal = got["tokens_per_expert"] == want["tokens_per_expert"]
    if not counts_equal:
        notes.append(f"tokens per expert {got['tokens_per_expert']} vs round 0's {want['tokens_per_expert']}")
    over = [n for n, d in devs.items() if not d <= tol]
    if over:
        notes.append("changed since round 0: " + ", ".join(f"{n} {devs[n]:.1e}" for n in over))
    worst = max(devs.values())
    return not over and counts_equal, worst, "; ".join(notes)


def verify_checksum(layer: MoELayerAdapter, shape: LayerShape, knobs: MoEKnobs, x_TM: torch.Tensor,
                    expected: dict, seed: int = 0) -> dict:
    """Recompute round 0's checksum on the same inputs (weights freshly loaded) and compare.
    Every rank of a multi-rank layer must call this. Leaves gradients set: the caller zeroes them."""
    dy_TM = upstream_gradient(x_TM.shape[0], shape.model_dim, x_TM.dtype, seed)
    got = _checksum_of(_run(layer, x_TM, dy_TM), layer, knobs)
    passed, worst, note = compare_checksums(got, expected)
    return {"passed": passed, "kind": "checksum", "max_deviation": worst, "tolerance": expected["tolerance"],
            "note": note or f"agrees with round 0's checksum (tolerance {expected['tolerance']:.0e} of sum|t|)"}
