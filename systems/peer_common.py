"""Pieces shared by the peer-system adapters (DeepSpeed, Megatron, Tutel).

Legend: T tokens, M model dim, H expert hidden, E experts.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.nn.functional as F
from torch import nn

from core.values import CanonicalWeights, LayerShape


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
