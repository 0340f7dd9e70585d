"""Workload descriptions: plain dataclasses with named presets (see presets.py).

A workload fixes the MoE layer shape, the surrounding transformer (for the
``model`` level) and the tokens per step. Flavours scale a full-size
workload down (flavors.py) keeping its structure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from core.errors import InputError
from core.names import unknown_name_message
from core.values import LayerShape, is_finite_positive, require_positive_ints

LEVELS = ("layer", "model")
FLAVORS = ("full", "proxy", "debug")
NORMS = ("layernorm", "rmsnorm")


def moe_block_indices(n_layers: int, moe_every: int, first_dense: int = 0) -> list[int]:
    """Blocks whose FFN is an MoE layer: after `first_dense` dense ones, the last of each group of `moe_every`."""
    return [i for i in range(first_dense, n_layers) if (i - first_dense + 1) % moe_every == 0]


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
    first_dense: int = 0  # leading blocks that stay dense whatever moe_every says (DeepSeek-V3: 3)

    def moe_block_indices(self) -> list[int]:
        return moe_block_indices(self.n_layers, self.moe_every, self.first_dense)

    @property
    def n_moe_blocks(self) -> int:
        return len(self.moe_block_indices())

    def validate(self, model_dim: int) -> None:
        require_positive_ints(self, ("n_layers", "n_heads", "n_kv_heads", "vocab_size", "moe_every"))
        if self.dense_ffn_dim is not None:
            require_positive_ints(self, ("dense_ffn_dim",))
        if isinstance(self.first_dense, bool) or not isinstance(self.first_dense, int) \
                or not 0 <= self.first_dense < self.n_layers:
            raise InputError(f"first_dense must be an integer from 0 to n_layers - 1 ({self.n_layers - 1}), "
                             f"got {self.first_dense!r}", "first_dense")
        if model_dim % self.n_heads:
            raise InputError(f"model_dim {model_dim} is not divisible by n_heads {self.n_heads}", "n_heads")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}", "n_kv_heads")
        if self.norm not in NORMS:
            raise InputError(unknown_name_message("norm", self.norm, NORMS), "norm")


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
        require_positive_ints(self, ("batch_size", "seq_len"))
        if self.capacity_factor is not None and not is_finite_positive(self.capacity_factor):
            raise InputError(f"capacity_factor must be a finite positive number or omitted (dropless), "
                             f"got {self.capacity_factor!r}", "capacity_factor")
        if self.flavor not in FLAVORS + ("custom",):
            raise InputError(unknown_name_message("flavor", self.flavor, FLAVORS + ("custom",)), "flavor")

    def to_dict(self) -> dict:
        """Plain data; fields added later are left out at their defaults, so older workloads keep their hash."""
        out = asdict(self)
        out["layer"] = self.layer.non_default_fields()
        if not self.model.first_dense:
            del out["model"]["first_dense"]
        return out

    def with_layer(self, **changes) -> Workload:
        return replace(self, layer=replace(self.layer, **changes))
