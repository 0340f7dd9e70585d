"""An independent, dense GShard-style MoE formulation, for tests only.

Dispatch and combine are one-hot tensors [T, E, C] and every step is an
einsum over them (Lepikhin et al., GShard, 2020, Algorithm 1), so nothing
here shares code or structure with systems/torch_reference.py's loop over
experts. Slot order follows the rule the reference implements: all first
choices (in token order) before any second choice. Here that is expressed
by stacking the choices choice-major, [K*T, E], and taking one cumsum.

Legend: T tokens, M model dim, H expert hidden, E experts, C capacity slots, K top-k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DenseResult:
    y_TM: torch.Tensor
    l_aux: torch.Tensor
    tokens_per_expert: list[int]
    dropped: int
    capacity: int


def capacity_rule(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """C = k * int(cf * ceil(T / E)), at least 1; dropless = T slots (a token picks an expert once)."""
    if capacity_factor is None:
        return num_tokens
    return max(1, top_k * int(capacity_factor * math.ceil(num_tokens / num_experts)))


def _activate(h, activation, u=None):
    if activation == "swiglu":
        return F.silu(h) * u
    return F.gelu(h) if activation == "gelu" else F.relu(h)


def dense_moe(x_TM, gate_EM, w1_EHM, w2_EHM, w3_EHM, b1_EH, b2_EM, top_k, activation, capacity_factor):
    T, E = x_TM.shape[0], gate_EM.shape[0]
    C = capacity_rule(T, E, top_k, capacity_factor)
    probs_TE = torch.softmax(torch.einsum("tm,em->te", x_TM, gate_EM), dim=-1)
    gates_TK, idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    if top_k > 1:
        gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)

    choice_KTE = F.one_hot(idx_TK.T, E).to(x_TM.dtype)  # choice-major
    slot_KTE = (torch.cumsum(choice_KTE.reshape(top_k * T, E), dim=0) - 1).reshape(top_k, T, E)
    slot_KT = (slot_KTE * choice_KTE).sum(-1).long()
    keep_KT = slot_KT < C
    slot_onehot_KTC = F.one_hot(slot_KT.clamp(max=C - 1), C).to(x_TM.dtype) * keep_KT[..., None]
    dispatch_TEC = torch.einsum("kte,ktc->tec", choice_KTE, slot_onehot_KTC)
    combine_TEC = torch.einsum("kt,kte,ktc->tec", gates_TK.T, choice_KTE, slot_onehot_KTC)

    xin_ECM = torch.einsum("tec,tm->ecm", dispatch_TEC, x_TM)
    h_ECH = torch.einsum("ecm,ehm->ech", xin_ECM, w1_EHM)
    if b1_EH is not None:
        h_ECH = h_ECH + b1_EH[:, None, :]
    u_ECH = torch.einsum("ecm,ehm->ech", xin_ECM, w3_EHM) if w3_EHM is not None else None
    out_ECM = torch.einsum("ech,ehm->ecm", _activate(h_ECH, activation, u_ECH), w2_EHM)
    if b2_EM is not None:
        out_ECM = out_ECM + b2_EM[:, None, :]
    y_TM = torch.einsum("tec,ecm->tm", combine_TEC, out_ECM)

    first_share_E = choice_KTE[0].mean(0)
    l_aux = E * torch.einsum("e,e->", probs_TE.mean(0), first_share_E)
    counts = choice_KTE.sum((0, 1)).long().tolist()
    return DenseResult(y_TM, l_aux, counts, int((~keep_KT).sum()), C)
