"""Routing: top-k choices -> slots, capacity, drops, aux losses (sections 2.3-2.6, 3).

Everything the encode/decode/expert steps need is computed once per step into
a :class:`RoutePlan` and reused by forward and both backwards.

Slots by one stable sort instead of K one-hot cumsums: the K*S choices are
laid out choice-major (all first choices in token order, then all second
choices, ...; token order is the BPR order when BPR is on). A stable sort by
expert keeps that order inside each expert, so a choice's rank inside its
expert's run is exactly Tutel's location ``L_i[s]``. The sorted order is also
the order of the live rows (expert-major, slot-minor), so the compact
dispatch buffer is a single gather.

Legend: S tokens, K top-k choices, E experts, C capacity, N live (kept) choices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RoutePlan:
    """One step's routing decisions; indices are shared by encode, decode and backward."""

    num_tokens: int
    num_experts: int
    top_k: int
    capacity: int
    idx_SK: torch.Tensor  # expert of each choice
    loc_SK: torch.Tensor  # slot of each choice inside its expert's buffer (may be >= C: dropped)
    gates_SK: torch.Tensor  # gate values (differentiable), in the input dtype
    dispatch_count_E: torch.Tensor  # choices routed to each expert, before dropping
    fill_E: list[int]  # live rows per expert: min(count, C)
    token_N: torch.Tensor  # token of each live row, rows ordered expert-major, slot-minor
    choice_N: torch.Tensor  # which of the K choices it is
    slot_N: torch.Tensor  # row of each live choice in the dispatched buffer (e * C + loc in [E*C, M])
    row_SK: torch.Tensor  # row of each choice in the dispatched buffer (0 where dropped)
    keep_SK: torch.Tensor | None  # 1/0 in the gates' dtype; None when nothing was dropped
    padded: bool  # dispatched buffer has padding rows (True) or is compact [N, M] (False)
    row_stride: int = 0  # largest rows per expert in the buffer (C for Tutel's [E, C, M] layout)
    row_splits: list[int] | None = None  # rows per expert in the buffer, expert-major (padding included)
    overlap_degree: int = 1
    adaptive_r: int | None = None

    @property
    def num_live(self) -> int:
        return int(self.token_N.numel())

    @property
    def dropped(self) -> int:
        return self.num_tokens * self.top_k - self.num_live

    @property
    def rows(self) -> int:
        """Rows of the dispatched buffer."""
        if not self.padded:
            return self.num_live
        return sum(self.row_splits) if self.row_splits is not None else self.num_experts * self.row_stride

    @property
    def row_N(self) -> torch.Tensor | None:
        """Row of each live choice in the dispatched buffer; None means row n is live row n."""
        return self.slot_N if self.padded else None

    @property
    def flat_N(self) -> torch.Tensor:
        """Index of each live choice in the flattened [S*K] gates."""
        return self.token_N * self.top_k + self.choice_N


def capacity_for(
    capacity_factor: float,
    top_k: int,
    tokens_per_expert: int,
    max_count: int,
    multiple: int,
) -> int:
    """Section 2.6: fixed (cf > 0), dropless (cf == 0), dynamic (cf < 0); rounded up, >= 1."""
    if capacity_factor > 0:
        capacity = top_k * int(capacity_factor * tokens_per_expert)
    elif capacity_factor == 0:
        capacity = max_count
    else:
        capacity = min(max_count, top_k * int(-capacity_factor * tokens_per_expert))
    capacity = max(capacity, 1)
    return math.ceil(capacity / multiple) * multiple


def top_k_gates(probs_SE: torch.Tensor, top_k: int, normalize: bool):
    """(idx_SK, gates_SK): top-k experts and their probabilities, renormalised when k > 1."""
    gates_SK, idx_SK = torch.topk(probs_SE, top_k, dim=1)
    if normalize and top_k > 1:
        denom = gates_SK.sum(1, keepdim=True).clamp_min(torch.finfo(gates_SK.dtype).eps)
        gates_SK = gates_SK / denom
    return idx_SK, gates_SK


def sorted_choices(idx_SK: torch.Tensor, num_experts: int, priority_S: torch.Tensor | None):
    """Choice-major sequence sorted stably by expert.

    Returns (order, token_seq, counts_E, loc_sorted): ``order`` sorts the
    sequence; ``loc_sorted`` is each sorted choice's slot.
    """
    S, K = idx_SK.shape
    if priority_S is None:
        token_S = torch.arange(S, device=idx_SK.device)
        expert_seq = idx_SK.t().reshape(-1)
    else:
        token_S = torch.sort(priority_S, descending=True, stable=True).indices
        expert_seq = idx_SK.index_select(0, token_S).t().reshape(-1)
    token_seq = token_S.repeat(K)
    expert_sorted, order = torch.sort(expert_seq, stable=True)
    counts_E = torch.bincount(expert_seq, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    loc_sorted = torch.arange(S * K, device=idx_SK.device) - starts_E.index_select(0, expert_sorted)
    return order, token_seq, expert_sorted, counts_E, loc_sorted


def build_plan(
    idx_SK: torch.Tensor,
    gates_SK: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    capacity_multiple: int,
    num_tokens_for_capacity: int,
    priority_S: torch.Tensor | None = None,
    group_max=int,
    padded: bool = False,
    splits_for=None,
    layout_for=None,
) -> RoutePlan:
    """All slot indices for one step. ``group_max`` turns a local int into the group's max.

    A padded buffer has C rows per expert (``splits_for`` None, Tutel's layout) or
    ``splits_for(fills)`` rows per expert (each at least its fill), e.g. groups of experts
    padded to their largest fill (:func:`grouped_splits`). A compact buffer has exactly the fills.
    ``layout_for(fills) -> (padded, splits_for)``, when given, decides both from this step's fills
    (the cost model's choice at world size 1)."""
    S, K = idx_SK.shape
    order, token_seq, expert_sorted, counts_E, loc_sorted = sorted_choices(idx_SK, num_experts, priority_S)
    spe = math.ceil(num_tokens_for_capacity / num_experts)
    max_count = group_max(int(counts_E.max())) if capacity_factor <= 0 else 0
    C = capacity_for(capacity_factor, K, spe, max_count, capacity_multiple)

    token_sorted = token_seq.index_select(0, order)
    choice_sorted = torch.div(order, S, rounding_mode="floor")
    loc_SK = torch.empty_like(idx_SK)
    loc_SK[token_sorted, choice_sorted] = loc_sorted

    keep = loc_sorted < C
    if bool(keep.all()):
        token_N, choice_N, expert_N, loc_N = token_sorted, choice_sorted, expert_sorted, loc_sorted
    else:
        live = torch.nonzero(keep, as_tuple=True)[0]
        token_N, choice_N = token_sorted[live], choice_sorted[live]
        expert_N, loc_N = expert_sorted[live], loc_sorted[live]
    fill_E = torch.clamp(counts_E, max=C)
    fills = fill_E.tolist()
    if layout_for is not None:
        padded, splits_for = layout_for(fills)
    if not padded:
        splits = fills
    else:
        splits = [C] * num_experts if splits_for is None else list(splits_for(fills))
        if any(n < f for n, f in zip(splits, fills, strict=True)):
            raise ValueError(f"row splits {splits} are smaller than the fills {fills}")
    start_E = torch.tensor([0] + splits[:-1], device=idx_SK.device).cumsum(0)
    slot_N = start_E.index_select(0, expert_N) + loc_N
    row_SK = torch.zeros_like(idx_SK)
    row_SK[token_N, choice_N] = slot_N if padded else torch.arange(token_N.numel(), device=idx_SK.device)
    keep_SK = None if token_N.numel() == S * K else (loc_SK < C).to(gates_SK.dtype)
    return RoutePlan(
        num_tokens=S,
        num_experts=num_experts,
        top_k=K,
        capacity=C,
        idx_SK=idx_SK,
        loc_SK=loc_SK,
        gates_SK=gates_SK,
        dispatch_count_E=counts_E,
        fill_E=fills,
        token_N=token_N,
        choice_N=choice_N,
        slot_N=slot_N,
        row_SK=row_SK,
        keep_SK=keep_SK,
        padded=padded,
        row_stride=max(splits),
        row_splits=splits,
    )


def grouped_splits(fills: list[int], group_size: int) -> list[int]:
    """Rows per expert when consecutive groups of ``group_size`` experts share their largest fill."""
    out = []
    for g0 in range(0, len(fills), group_size):
        group = fills[g0 : g0 + group_size]
        out += [max(group)] * len(group)
    return out


def gshard_loss(probs_SE: torch.Tensor, first_choice_S: torch.Tensor) -> torch.Tensor:
    """``E * sum_e mean_s P[s, e] * frac_e`` with frac_e the share of first choices on e."""
    E = probs_SE.shape[1]
    frac_E = torch.bincount(first_choice_S, minlength=E).to(probs_SE.dtype) / first_choice_S.numel()
    return E * torch.sum(probs_SE.mean(0) * frac_E)


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    return v.var() / (v.mean() ** 2 + 1e-10)


def importance_load_loss(
    clean_logits_SE: torch.Tensor, noisy_logits_SE: torch.Tensor, top_k: int, gate_noise: float
) -> torch.Tensor:
    """``(cv2(Importance) + cv2(Load)) / 2`` (section 3), load from the normal CDF of the margin."""
    E = clean_logits_SE.shape[1]
    importance_E = torch.softmax(clean_logits_SE, dim=1).sum(0)
    threshold_S1 = torch.topk(noisy_logits_SE, top_k, dim=1).values[:, -1:]
    std = gate_noise / E
    z_SE = (clean_logits_SE - threshold_S1) / std
    load_E = (0.5 * (1.0 + torch.erf(z_SE / math.sqrt(2.0)))).sum(0)
    return (_cv_squared(importance_E) + _cv_squared(load_E)) / 2
