"""Scaled flavours of the full workloads.

Scaling rule (``proxy``), chosen so one layer forward+backward takes about
0.1-0.5 s and one model iteration about 0.3-2 s on a 2-core CPU, while
keeping each model's structure:

* kept: expert count, top-k, the router, activation (SwiGLU vs GELU), the
  FFN/hidden ratio (experts, shared expert and dense FFN alike), head_dim,
  the query/KV head ratio, norm type, MoE frequency;
* heads scaled by 1/8 (rounded, at least 1), KV heads keep the ratio;
  model_dim = head_dim * heads; ffn_dim = round(model_dim * F/M);
* tokens: batch 4 x sequence/4 (1024 tokens per rank per step);
* vocab / 8; layers: 2 blocks for Mixtral (both MoE), 4 for GPT2-XL-MoE
  (alternating dense and MoE, so 2 MoE blocks), one leading dense block and
  2 MoE blocks for a model with leading dense blocks (DeepSeek-V3).

``debug`` keeps the same structure at toy size (model_dim 32, 64 tokens,
1-2 blocks) for tests.
"""
from __future__ import annotations

from dataclasses import replace

from core.errors import InputError
from core.names import unknown_name_message
from workloads.presets import FULL
from workloads.spec import FLAVORS, Workload

PROXY_HEAD_DIVISOR = 8
PROXY_SEQ_DIVISOR = 4


def _scaled(full: Workload, flavor: str, heads: int, head_dim: int, batch: int, seq: int, vocab: int) -> Workload:
    model, layer = full.model, full.layer
    kv_heads = max(1, heads * model.n_kv_heads // model.n_heads)
    model_dim = heads * head_dim
    def width(full_width: int) -> int:
        return round(model_dim * full_width / layer.model_dim)

    first_dense = min(model.first_dense, 1)
    n_layers = first_dense + 2 * model.moe_every
    has_dense = model.moe_every > 1 or first_dense
    dense = width(model.dense_ffn_dim or layer.ffn_dim) if has_dense else None
    return replace(
        full,
        flavor=flavor,
        layer=replace(layer, model_dim=model_dim, ffn_dim=width(layer.ffn_dim),
                      shared_ffn_dim=width(layer.shared_ffn_dim) if layer.shared_ffn_dim else 0),
        model=replace(model, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab,
                      dense_ffn_dim=dense, first_dense=first_dense),
        batch_size=batch,
        seq_len=seq,
    )


def proxy(full: Workload) -> Workload:
    head_dim = full.layer.model_dim // full.model.n_heads
    heads = max(1, round(full.model.n_heads / PROXY_HEAD_DIVISOR))
    return _scaled(full, "proxy", heads, head_dim, full.batch_size, full.seq_len // PROXY_SEQ_DIVISOR,
                   full.model.vocab_size // PROXY_HEAD_DIVISOR)


def debug(full: Workload) -> Workload:
    heads = 2 if full.model.n_heads == full.model.n_kv_heads else 4
    scaled = _scaled(full, "debug", heads, 32 // heads * 1, 2, 32, 128)
    return replace(scaled, model=replace(scaled.model, n_layers=scaled.model.first_dense + full.model.moe_every))


def get_workload(name: str, flavor: str = "proxy") -> Workload:
    """A named workload in a flavour; InputError with the closest names on a bad name."""
    if not isinstance(name, str) or name not in FULL:
        raise InputError(unknown_name_message("workload", name, [*sorted(FULL), "custom"]), "workload")
    if not isinstance(flavor, str) or flavor not in FLAVORS:
        raise InputError(unknown_name_message("flavor", flavor, FLAVORS), "flavor")
    full = FULL[name]
    return {"full": full, "proxy": proxy, "debug": debug}[flavor](full) if flavor != "full" else full


def workload_names() -> list[str]:
    return sorted(FULL)
