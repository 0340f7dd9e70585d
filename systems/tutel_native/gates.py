"""Gates: the router's logits (section 2 steps 1-2 of docs/tutel-semantics.md).

Parameter names follow Tutel's checkpoint format (``wg.weight`` for ``top``;
``temperature``, ``cosine_projector``, ``sim_matrix`` for ``cosine_top``), so a
Tutel state dict loads unchanged. Legend: S tokens, M model dim, E experts,
P projection dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATE_KEYS = {"type", "k", "capacity_factor", "gate_noise", "fp32_gate", "proj_dim"}


@dataclass(frozen=True)
class GateConfig:
    """One entry of ``gate_type``; defaults as in the contract."""

    type: str = "top"
    k: int = 1
    capacity_factor: float = 1.0
    gate_noise: float = 0.0
    fp32_gate: bool = False
    proj_dim: int = 256

    @classmethod
    def parse(cls, spec: dict) -> GateConfig:
        if not isinstance(spec, dict):
            raise TypeError(f"gate_type entries must be dicts, got {type(spec).__name__}")
        unknown = set(spec) - GATE_KEYS
        if unknown:
            raise TypeError(f"unknown gate_type key(s) {sorted(unknown)}; known: {sorted(GATE_KEYS)}")
        cfg = cls(**spec)
        if cfg.type not in ("top", "cosine_top"):
            raise ValueError(f"gate type must be 'top' or 'cosine_top', got {cfg.type!r}")
        if not isinstance(cfg.k, int) or cfg.k < 1:
            raise ValueError(f"gate k must be a positive integer, got {cfg.k!r}")
        if cfg.gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {cfg.gate_noise!r}")
        return cfg


def gate_compute_dtype(x_dtype: torch.dtype, fp32_gate: bool) -> torch.dtype:
    """fp32_gate lifts low-precision inputs to fp32; it never lowers fp64 (section 2.11)."""
    if fp32_gate and torch.finfo(x_dtype).bits < 32:
        return torch.float32
    return x_dtype


class TopGate(nn.Module):
    """``logits = x @ wg.T``."""

    def __init__(self, cfg: GateConfig, model_dim: int, num_experts: int):
        super().__init__()
        self.cfg = cfg
        self.wg = nn.Linear(model_dim, num_experts, bias=False)

    def clean_logits(self, x_SM: torch.Tensor) -> torch.Tensor:
        dtype = gate_compute_dtype(x_SM.dtype, self.cfg.fp32_gate)
        return F.linear(x_SM.to(dtype), self.wg.weight.to(dtype))


class CosineTopGate(nn.Module):
    """``normalize(proj(x)) @ normalize(sim_matrix) * exp(min(temperature, ln 100))``."""

    def __init__(self, cfg: GateConfig, model_dim: int, num_experts: int):
        super().__init__()
        self.cfg = cfg
        self.temperature = nn.Parameter(torch.full((1,), math.log(1 / 0.5)))
        self.cosine_projector = nn.Linear(model_dim, cfg.proj_dim)
        self.sim_matrix = nn.Parameter(torch.randn(cfg.proj_dim, num_experts) * 0.01)
        self.clamp_max = math.log(100.0)

    def clean_logits(self, x_SM: torch.Tensor) -> torch.Tensor:
        dtype = gate_compute_dtype(x_SM.dtype, self.cfg.fp32_gate)
        proj = self.cosine_projector
        h_SP = F.linear(x_SM.to(dtype), proj.weight.to(dtype), proj.bias.to(dtype))
        sim_PE = F.normalize(self.sim_matrix.to(dtype), dim=0)
        logits_SE = F.normalize(h_SP, dim=1) @ sim_PE
        scale = torch.exp(torch.clamp(self.temperature.to(dtype), max=self.clamp_max))
        return logits_SE * scale


def build_gate(cfg: GateConfig, model_dim: int, num_experts: int) -> nn.Module:
    cls = TopGate if cfg.type == "top" else CosineTopGate
    return cls(cfg, model_dim, num_experts)


def gate_logits(gate: nn.Module, x_SM: torch.Tensor, num_experts: int, training: bool):
    """(noisy logits, clean logits); noise only in training with gate_noise > 0."""
    clean_SE = gate.clean_logits(x_SM)
    noise = gate.cfg.gate_noise
    if training and noise > 0:
        return clean_SE + noise * torch.randn_like(clean_SE) / num_experts, clean_SE
    return clean_SE, clean_SE
