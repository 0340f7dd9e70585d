"""torch_reference: the numerical reference every other system is checked against.

A plain PyTorch loop over experts, written for obviousness, not speed. It
implements Tutel's routing rules (``docs/tutel-semantics.md`` sections
2-3) so capacity-limited results are comparable with the Tutel-style systems:

* softmax over gate logits, top-k, gate values renormalised when k > 1
  (the common router); every other router a workload can declare (sigmoid
  scores, no renormalisation, an aux-loss-free selection bias, group-limited
  selection, a routed scale: ``route_scores`` and ``docs/routers.md``);
* slot locations: all first choices of an expert before any second choice,
  in token order (``L_i = cumsum(m_i) - 1 + sum_{j<i} m_j.sum(0)``);
* capacity ``C = k * int(cf * ceil(T / E))``, at least 1; a choice is kept iff
  its slot is below C.  ``capacity_factor=None`` is dropless (nothing dropped).
* GShard aux loss ``E * sum_e mean_t(P[t, e]) * frac_e`` (frac_e: share of
  tokens whose first choice is e).

Expert parallelism (ep > 1): each rank holds E/ep experts; tokens travel to
their expert's rank and back through ``all_to_all_single`` with uneven
splits, so no capacity padding is exchanged. Capacity is a per-rank rule
(computed from the rank's own tokens), as in Tutel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.values import BIAS_UPDATE_RATE, CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import MoELayerAdapter, MoEOutput, MoESystem, RoutingStats, grad_of


def tutel_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tutel's fixed capacity rule: C = k * int(cf * ceil(T / E)), at least 1."""
    return max(1, top_k * int(capacity_factor * math.ceil(num_tokens / num_experts)))


def slot_locations(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slot of each (token, choice) inside its expert's buffer (Tutel's rule)."""
    loc_TK = torch.empty_like(idx_TK)
    offset_E = torch.zeros(num_experts, dtype=torch.long, device=idx_TK.device)
    for i in range(idx_TK.shape[1]):
        mask_TE = F.one_hot(idx_TK[:, i], num_experts)
        cum_TE = torch.cumsum(mask_TE, dim=0) - 1 + offset_E
        loc_TK[:, i] = cum_TE.gather(1, idx_TK[:, i : i + 1]).squeeze(1)
        offset_E = offset_E + mask_TE.sum(0)
    return loc_TK


def route_scores(logits_TE: torch.Tensor, shape: LayerShape, bias_E: torch.Tensor | None = None):
    """(scores_TE, idx_TK, gates_TK) under the shape's router.

    scores: softmax or sigmoid of the logits. Selection: top-k of scores + bias (the bias steers the
    choice only), restricted to the best `topk_groups` of `n_groups` contiguous expert groups, a
    group's merit being the sum of its two best biased scores (DeepSeek-V3's rule; the best one when
    a group has a single expert). Gate values: the chosen experts' unbiased scores, divided by their
    sum when `renormalize` and k > 1, times `route_scale`."""
    E, K = shape.num_experts, shape.top_k
    scores_TE = torch.softmax(logits_TE, dim=1) if shape.score == "softmax" else torch.sigmoid(logits_TE)
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if shape.n_groups > 1:
        G = shape.n_groups
        grouped_TGX = choice_TE.view(-1, G, E // G)
        merit_TG = grouped_TGX.topk(min(2, E // G), dim=2).values.sum(2)
        best_TG = merit_TG.topk(shape.topk_groups, dim=1).indices
        allowed_TG = torch.zeros_like(merit_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        allowed_TE = allowed_TG.repeat_interleave(E // G, dim=1)
        choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
    idx_TK = torch.topk(choice_TE, K, dim=1).indices
    gates_TK = scores_TE.gather(1, idx_TK)
    if shape.renormalize and K > 1:
        gates_TK = gates_TK / gates_TK.sum(1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).eps)
    if shape.route_scale != 1.0:
        gates_TK = gates_TK * shape.route_scale
    return scores_TE, idx_TK, gates_TK


def gshard_aux_loss(probs_TE: torch.Tensor, first_choice_T: torch.Tensor) -> torch.Tensor:
    E = probs_TE.shape[1]
    frac_E = torch.bincount(first_choice_T, minlength=E).to(probs_TE.dtype) / first_choice_T.numel()
    return E * torch.sum(probs_TE.mean(0) * frac_E)


class ReferenceExperts(nn.Module):
    """E_local experts in canonical layout, applied one expert at a time."""

    def __init__(self, shape: LayerShape, num_local: int, dtype: torch.dtype):
        super().__init__()
        E, H, M = num_local, shape.ffn_dim, shape.model_dim
        self.activation = shape.activation
        self.w1_EHM = nn.Parameter(torch.zeros(E, H, M, dtype=dtype))
        self.w2_EHM = nn.Parameter(torch.zeros(E, H, M, dtype=dtype))
        self.w3_EHM = nn.Parameter(torch.zeros(E, H, M, dtype=dtype)) if shape.activation == "swiglu" else None
        self.b1_EH = nn.Parameter(torch.zeros(E, H, dtype=dtype)) if shape.expert_bias else None
        self.b2_EM = nn.Parameter(torch.zeros(E, M, dtype=dtype)) if shape.expert_bias else None
        for param in self.parameters():
            param.skip_allreduce = True  # expert weights: see MoELayerAdapter.expert_parameters

    def split(self) -> list[dict[str, torch.Tensor | None]]:
        """Each expert's weights as views, by canonical name: one unbind per parameter, so backward
        builds each parameter's gradient once. (Indexing the parameter once per expert zero-fills a
        full-size gradient per expert: quadratic in E, minutes per step at 256 experts.)"""
        names = ("w1_EHM", "w2_EHM", "w3_EHM", "b1_EH", "b2_EM")
        parts = {n: None if getattr(self, n) is None else getattr(self, n).unbind(0) for n in names}
        return [{n: None if p is None else p[e] for n, p in parts.items()} for e in range(self.w1_EHM.shape[0])]

    def expert(self, w: dict[str, torch.Tensor | None], x_NM: torch.Tensor) -> torch.Tensor:
        """One expert (``w``: an entry of split()) on its rows."""
        h_NH = x_NM @ w["w1_EHM"].T
        if w["b1_EH"] is not None:
            h_NH = h_NH + w["b1_EH"]
        if self.activation == "swiglu":
            h_NH = F.silu(h_NH) * (x_NM @ w["w3_EHM"].T)
        elif self.activation == "gelu":
            h_NH = F.gelu(h_NH)
        else:
            h_NH = F.relu(h_NH)
        y_NM = h_NH @ w["w2_EHM"]
        if w["b2_EM"] is not None:
            y_NM = y_NM + w["b2_EM"]
        return y_NM


class ReferenceMoELayer(MoELayerAdapter):
    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec, capacity: int | None = None):
        """`capacity` overrides Tutel's capacity rule (used to mirror another
        system's capacity in equivalence checks); ignored when dropless."""
        super().__init__()
        self.capacity_override = capacity
        self.router_precision = "input"  # the equivalence check sets the system's (ReferencePolicy)
        shape.validate()
        self.shape, self.knobs, self.parallel = shape, knobs, parallel
        dtype = knobs.torch_dtype
        self.num_local = shape.num_experts // parallel.ep
        self.ep_group, self.ep_rank = _expert_group(parallel)
        self.gate_EM = nn.Parameter(torch.zeros(shape.num_experts, shape.model_dim, dtype=dtype))
        # The aux-loss-free selection bias: state, not a parameter (no gradient reaches it). Kept in at least
        # fp32, as DeepSeek-V3 and torchtitan keep it: a bf16 bias could not hold its 1e-3 updates.
        bias_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("score_bias_E", torch.zeros(shape.num_experts, dtype=bias_dtype) if shape.score_bias
                             else None)
        # Choices per expert since the last bias update (training forwards only), for before_optimizer_step.
        self.register_buffer("load_E", torch.zeros(shape.num_experts, dtype=torch.float32) if shape.score_bias
                             else None, persistent=False)
        self.experts = ReferenceExperts(shape, self.num_local, dtype)
        self._saved: tuple | None = None  # (idx_TK, keep_TK, capacity, l_aux) of the last forward

    def load_canonical(self, weights: CanonicalWeights) -> None:
        local = weights.expert_slice(self.ep_rank * self.num_local, self.num_local)
        with torch.no_grad():
            self.gate_EM.copy_(weights.gate_EM)
            if self.score_bias_E is not None:
                self.score_bias_E.copy_(weights.score_bias_E)
            for name in ("w1_EHM", "w2_EHM", "w3_EHM", "b1_EH", "b2_EM"):
                param = getattr(self.experts, name)
                if param is not None:
                    param.copy_(getattr(local, name))

    def router_logits(self, x_TM: torch.Tensor) -> torch.Tensor:
        """x @ gate^T, at the router precision this layer mirrors (systems/base.py ReferencePolicy)
        when the input is narrower than fp32; in the input dtype otherwise."""
        narrow = x_TM.dtype in (torch.bfloat16, torch.float16)
        # F.linear, as every system's gate computes it: in bf16, x @ w.T can take another kernel, and a
        # differently rounded logit flips near-ties among many experts.
        if narrow and self.router_precision == "float32_logits":
            return F.linear(x_TM.float(), self.gate_EM.float())
        logits_TE = F.linear(x_TM, self.gate_EM)
        return logits_TE.float() if narrow and self.router_precision == "float32_scores" else logits_TE

    def route(self, x_TM: torch.Tensor):
        """Returns probs_TE, idx_TK, gates_TK, keep_TK, capacity."""
        E, K = self.shape.num_experts, self.shape.top_k
        probs_TE, idx_TK, gates_TK = route_scores(self.router_logits(x_TM), self.shape, self.score_bias_E)
        gates_TK = gates_TK.to(x_TM.dtype)
        cf = self.knobs.capacity_factor
        if cf is None:
            keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
            capacity = None
        else:
            capacity = self.capacity_override or tutel_capacity(x_TM.shape[0], E, K, cf)
            keep_TK = slot_locations(idx_TK, E) < capacity
        return probs_TE, idx_TK, gates_TK, keep_TK, capacity

    def forward(self, x_TM: torch.Tensor) -> MoEOutput:
        probs_TE, idx_TK, gates_TK, keep_TK, capacity = self.route(x_TM)
        if self.shape.score == "sigmoid":  # GShard's loss wants a distribution over experts
            probs_TE = probs_TE / probs_TE.sum(1, keepdim=True)
        l_aux = gshard_aux_loss(probs_TE, idx_TK[:, 0])
        if self.parallel.ep == 1:
            y_TM = self._local_experts(x_TM, idx_TK, gates_TK, keep_TK, first_expert=0)
        else:
            y_TM = self._expert_parallel(x_TM, idx_TK, gates_TK, keep_TK)
        # Statistics are counted lazily in routing_stats(), outside any timed step; what stays here
        # is the routing itself (its nonzero() per expert is a host sync the loop needs anyway).
        self._saved = (idx_TK.detach(), keep_TK.detach(), capacity, l_aux.detach())
        if self.load_E is not None and self.training:
            self.load_E += torch.bincount(idx_TK.detach().flatten(), minlength=self.shape.num_experts)
        return MoEOutput(y_TM, l_aux)

    def before_optimizer_step(self) -> None:
        """The aux-loss-free bias update (core/values.py BIAS_UPDATE_RATE), from every rank's load."""
        if self.load_E is None:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.load_E)
        with torch.no_grad():
            delta_E = BIAS_UPDATE_RATE * torch.sign(self.load_E.mean() - self.load_E)
            self.score_bias_E += (delta_E - delta_E.mean()).to(self.score_bias_E.dtype)
            self.load_E.zero_()

    def _local_experts(self, x_TM, idx_TK, gates_TK, keep_TK, first_expert):
        y_TM = torch.zeros(x_TM.shape[0], self.shape.model_dim, dtype=x_TM.dtype, device=x_TM.device)
        experts = self.experts.split()
        for e in range(self.num_local):
            token_N, choice_N = torch.nonzero((idx_TK == first_expert + e) & keep_TK, as_tuple=True)
            if token_N.numel() == 0:
                continue
            out_NM = self.experts.expert(experts[e], x_TM[token_N])
            y_TM.index_add_(0, token_N, out_NM * gates_TK[token_N, choice_N, None])
        return y_TM

    def _expert_parallel(self, x_TM, idx_TK, gates_TK, keep_TK):
        """Send each kept choice to its expert's rank, compute there, send back."""
        from systems.distributed import all_to_all_uneven

        token_N, choice_N = torch.nonzero(keep_TK, as_tuple=True)
        expert_N = idx_TK[token_N, choice_N]
        order = torch.argsort(expert_N, stable=True)
        token_N, choice_N, expert_N = token_N[order], choice_N[order], expert_N[order]
        dest_N = expert_N // self.num_local
        send_counts = torch.bincount(dest_N, minlength=self.parallel.ep)
        recv_x, recv_counts = all_to_all_uneven(x_TM[token_N], send_counts, self.ep_group)
        recv_e, _ = all_to_all_uneven(expert_N - dest_N * self.num_local, send_counts, self.ep_group)
        out = torch.zeros_like(recv_x)
        experts = self.experts.split()
        for e in range(self.num_local):
            rows = torch.nonzero(recv_e == e, as_tuple=True)[0]
            if rows.numel():
                out.index_copy_(0, rows, self.experts.expert(experts[e], recv_x[rows]))
        back_NM, _ = all_to_all_uneven(out, recv_counts, self.ep_group)
        y_TM = torch.zeros(x_TM.shape[0], self.shape.model_dim, dtype=x_TM.dtype, device=x_TM.device)
        return y_TM.index_add(0, token_N, back_NM * gates_TK[token_N, choice_N, None])

    def routing_stats(self) -> RoutingStats:
        if self._saved is None:
            raise RuntimeError("routing_stats() called before the first forward")
        idx_TK, keep_TK, capacity, l_aux = self._saved
        kept = int(keep_TK.sum())
        return RoutingStats(
            tokens_per_expert=torch.bincount(idx_TK.flatten(), minlength=self.shape.num_experts).tolist(),
            dropped=idx_TK.numel() - kept,
            capacity=capacity,
            l_aux=float(l_aux),
            expert_rows_computed=kept,
        )

    def local_experts(self) -> tuple[int, int]:
        return self.ep_rank * self.num_local, self.num_local

    def canonical_gradients(self) -> CanonicalWeights:
        """The layout is canonical already: the gradients as they are."""
        ex = self.experts
        return CanonicalWeights(gate_EM=grad_of(self.gate_EM), w1_EHM=grad_of(ex.w1_EHM), w2_EHM=grad_of(ex.w2_EHM),
                                w3_EHM=grad_of(ex.w3_EHM), b1_EH=grad_of(ex.b1_EH), b2_EM=grad_of(ex.b2_EM))

    def aux_loss_mismatch(self) -> str:
        return ""  # the GShard loss is the reference's definition


def _expert_group(parallel: ParallelSpec):
    """(group, rank within it) of the expert-parallel group this rank belongs to."""
    if parallel.ep == 1:
        return None, 0
    from systems.distributed import expert_parallel_group

    return expert_parallel_group(parallel.ep)


class TorchReference(MoESystem):
    name = "torch_reference"
    description = "plain PyTorch loop over experts; the numerical reference"

    def router_support(self, shape: LayerShape) -> str:
        return ""  # the reference implements every router a workload can declare

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return ReferenceMoELayer(shape, knobs, parallel)
