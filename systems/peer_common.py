"""Pieces shared by the peer-system adapters (DeepSpeed, Megatron, Tutel).

Legend: T tokens, M model dim, H expert hidden, E experts.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from core.values import CanonicalWeights, LayerShape
from systems.distributed import free_port


class CanonicalFFN(nn.Module):
    """One expert in canonical layout (systems/base.py), applied to [..., M].

    DeepSpeed deep-copies the module it is given once per local expert, so one
    instance must describe a single expert.
    """

    def __init__(self, shape: LayerShape, dtype: torch.dtype):
        super().__init__()
        H, M = shape.ffn_dim, shape.model_dim
        self.activation = shape.activation
        self.w1_HM = nn.Parameter(torch.zeros(H, M, dtype=dtype))
        self.w2_HM = nn.Parameter(torch.zeros(H, M, dtype=dtype))
        self.w3_HM = nn.Parameter(torch.zeros(H, M, dtype=dtype)) if shape.activation == "swiglu" else None
        self.b1_H = nn.Parameter(torch.zeros(H, dtype=dtype)) if shape.expert_bias else None
        self.b2_M = nn.Parameter(torch.zeros(M, dtype=dtype)) if shape.expert_bias else None

    def load_expert(self, weights: CanonicalWeights, e: int) -> None:
        """Copy expert `e` of `weights` (an index into its expert axis)."""
        pairs = [(self.w1_HM, weights.w1_EHM), (self.w2_HM, weights.w2_EHM), (self.w3_HM, weights.w3_EHM),
                 (self.b1_H, weights.b1_EH), (self.b2_M, weights.b2_EM)]
        with torch.no_grad():
            for param, source in pairs:
                if param is not None:
                    param.copy_(source[e])

    def forward(self, x_NM: torch.Tensor) -> torch.Tensor:
        h_NH = F.linear(x_NM, self.w1_HM, self.b1_H)
        if self.activation == "swiglu":
            h_NH = F.silu(h_NH) * F.linear(x_NM, self.w3_HM)
        elif self.activation == "gelu":
            h_NH = F.gelu(h_NH)
        else:
            h_NH = F.relu(h_NH)
        y_NM = h_NH @ self.w2_HM
        return y_NM if self.b2_M is None else y_NM + self.b2_M


def canonical_from_tutel_experts(tensors: dict[str, torch.Tensor], activation: str, num_local: int,
                                 model_dim: int, ffn_dim: int, gate_EM: torch.Tensor) -> CanonicalWeights:
    """Tutel's expert tensors (``experts_from_canonical``'s names, whole local experts) back to
    canonical layout: the inverse of that mapping, shared by tutel_native and real Tutel.

    llama_ffn: W_fc1 = w1^T, W_fc2 = w3^T (flat [E, M, H]), W_fc3 = w2 (flat [E, H, M]);
    ffn: batched_fc1_w = w1, batched_fc2_w = w2, biases as is."""
    E, M, H = num_local, model_dim, ffn_dim
    if activation == "swiglu":
        return CanonicalWeights(
            gate_EM=gate_EM,
            w1_EHM=tensors["W_fc1"].reshape(E, M, H).transpose(1, 2).contiguous(),
            w3_EHM=tensors["W_fc2"].reshape(E, M, H).transpose(1, 2).contiguous(),
            w2_EHM=tensors["W_fc3"].reshape(E, H, M).clone(),
        )
    b1, b2 = tensors.get("batched_fc1_bias"), tensors.get("batched_fc2_bias")
    return CanonicalWeights(
        gate_EM=gate_EM,
        w1_EHM=tensors["batched_fc1_w"].reshape(E, H, M).clone(),
        w2_EHM=tensors["batched_fc2_w"].reshape(E, H, M).clone(),
        b1_EH=None if b1 is None else b1.reshape(E, H).clone(),
        b2_EM=None if b2 is None else b2.reshape(E, M).clone(),
    )


def ensure_single_process_env() -> None:
    """torchrun's environment contract for a lone process, where it is missing.

    DeepSpeed and Megatron both need a real process group even at world size 1.
    """
    if "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def check_world(world_size_wanted: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != world_size_wanted:
        raise RuntimeError(f"WORLD_SIZE is {world} but the trial asks for {world_size_wanted} ranks")
