"""Workload descriptions: plain dataclasses with named presets (see presets.py).

A workload fixes the MoE layer shape, the surrounding transformer (for the
``model`` level) and the tokens per step. Flavours scale a full-size
workload down (flavors.py) keeping its structure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from core.values import LayerShape

LEVELS = ("layer", "model")
FLAVORS = ("full", "proxy", "debug")


@dataclass(frozen=True)
class ModelShape:
    """The transformer around the MoE FFNs (``model`` level)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    moe_every: int = 1  # 1: every block is MoE; 2: every other block (dense FFN between)
    norm: str = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm" (Mixtral)
    dense_ffn_dim: int | None = None  # FFN of the non-MoE blocks (defaults to the expert's)

    def validate(self, model_dim: int) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "vocab_size", "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if model_dim % self.n_heads:
            raise ValueError(f"model_dim {model_dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be layernorm or rmsnorm, got {self.norm!r}")


@dataclass(frozen=True)
class Workload:
    name: str
    flavor: str
    layer: LayerShape
    model: ModelShape
    batch_size: int  # sequences per rank per step
    seq_len: int
    capacity_factor: float | None  # the workload's default; None = dropless
    notes: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per rank per step (T)."""
        return self.batch_size * self.seq_len

    def validate(self) -> None:
        self.layer.validate()
        self.model.validate(self.layer.model_dim)
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or omitted (dropless), got {self.capacity_factor!r}")
        if self.flavor not in FLAVORS + ("custom",):
            raise ValueError(f"unknown flavor {self.flavor!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_layer(self, **changes) -> Workload:
        return replace(self, layer=replace(self.layer, **changes))
