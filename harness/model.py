"""A small nanoGPT-style transformer whose MoE FFNs come from the system under test.

Structure (read top to bottom: Attention, DenseFFN, Block, MoETransformer):

* token embedding; learned absolute positions for GPT-2-style (layernorm)
  models, none for Mixtral-style (rmsnorm) models. Mixtral uses RoPE; we leave
  it out on purpose: it does not change any matmul shape or the MoE layer, and
  a benchmark of training speed on random tokens does not need positions;
* ``n_layers`` pre-norm blocks ``x + attn(norm(x))`` then ``x + ffn(norm(x))``;
  causal self-attention through ``F.scaled_dot_product_attention`` with
  grouped KV heads (``n_kv_heads``), no dropout;
* the FFN of every ``moe_every``-th block (the last of each group: for
  moe_every = 2, blocks 1, 3, ...) is the system's MoE layer, fed the block's
  tokens flattened to [T, M]; other blocks get a dense FFN: GELU with biases
  (GPT-2) for layernorm models, SwiGLU without biases for rmsnorm models, of
  width ``dense_ffn_dim`` (or the expert's ffn_dim);
* final norm, untied LM head, loss = cross-entropy + AUX_LOSS_COEF * sum of
  the MoE layers' aux losses.

Non-MoE weights are drawn from one generator seeded by ``seed`` in a fixed
order (GPT-2 init: N(0, 0.02), residual output projections scaled by
1/sqrt(2 n_layers), zero biases, unit norms), so two systems built with the
same seed share every non-MoE weight; each MoE block i gets
``moe_block_weights(layer, seed, i)``.

Legend: B batch, S sequence, T = B*S tokens, M model dim, V vocab.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import MoELayerAdapter, MoESystem
from systems.shared_expert import build_moe_layer
from workloads.routing import seeded_generator
from workloads.spec import Workload, moe_block_indices  # noqa: F401 (re-exported for tests)

# Switch Transformer (Fedus et al., 2021, sec. 2.2) weights its load-balancing
# loss by alpha = 1e-2; we apply the same weight to the GShard-style aux loss
# every system returns.
AUX_LOSS_COEF = 0.01
INIT_STD = 0.02  # GPT-2 / nanoGPT


def moe_block_weights(layer: LayerShape, seed: int, block: int, dtype: torch.dtype) -> CanonicalWeights:
    """The canonical weights build_model loads into MoE block `block`, drawn in fp64 and cast once to
    `dtype`; the equivalence check compares against exactly these."""
    return CanonicalWeights.random(layer, seed=seed * 1000 + block, dtype=dtype)


def _norm(kind: str, dim: int, dtype, device) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, dtype=dtype, device=device)
    return nn.LayerNorm(dim, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, bias: bool, dtype, device):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        kv_dim = n_kv_heads * self.head_dim
        self.q = nn.Linear(dim, dim, bias=bias, dtype=dtype, device=device)
        self.kv = nn.Linear(dim, 2 * kv_dim, bias=bias, dtype=dtype, device=device)
        self.out = nn.Linear(dim, dim, bias=bias, dtype=dtype, device=device)

    def forward(self, x_BSM: torch.Tensor) -> torch.Tensor:
        B, S, M = x_BSM.shape
        q = self.q(x_BSM).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x_BSM).view(B, S, 2, self.n_kv_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(a.transpose(1, 2).reshape(B, S, M))


class DenseFFN(nn.Module):
    """GELU MLP with biases (GPT-2) or SwiGLU without biases (Mixtral/Llama)."""

    def __init__(self, dim: int, hidden: int, swiglu: bool, dtype, device):
        super().__init__()
        self.swiglu = swiglu
        self.up = nn.Linear(dim, hidden, bias=not swiglu, dtype=dtype, device=device)
        self.gate = nn.Linear(dim, hidden, bias=False, dtype=dtype, device=device) if swiglu else None
        self.out = nn.Linear(hidden, dim, bias=not swiglu, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.out(F.silu(self.gate(x)) * self.up(x))
        return self.out(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, workload: Workload, ffn: nn.Module, dtype, device):
        super().__init__()
        model, dim = workload.model, workload.layer.model_dim
        gpt2_style = model.norm == "layernorm"
        self.attn_norm = _norm(model.norm, dim, dtype, device)
        self.attn = Attention(dim, model.n_heads, model.n_kv_heads, gpt2_style, dtype, device)
        self.ffn_norm = _norm(model.norm, dim, dtype, device)
        self.ffn = ffn
        self.is_moe = isinstance(ffn, MoELayerAdapter)

    def forward(self, x_BSM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_BSM = x_BSM + self.attn(self.attn_norm(x_BSM))
        h_BSM = self.ffn_norm(x_BSM)
        if not self.is_moe:
            return x_BSM + self.ffn(h_BSM), None
        out = self.ffn(h_BSM.reshape(-1, h_BSM.shape[-1]))
        return x_BSM + out.y_TM.view_as(h_BSM), out.l_aux


class MoETransformer(nn.Module):
    def __init__(self, workload: Workload, moe_layers: dict[int, MoELayerAdapter], dtype, device="cpu"):
        super().__init__()
        model, layer = workload.model, workload.layer
        dim, swiglu = layer.model_dim, model.norm == "rmsnorm"
        dense_hidden = model.dense_ffn_dim or layer.ffn_dim
        self.workload = workload
        self.embed = nn.Embedding(model.vocab_size, dim, dtype=dtype, device=device)
        self.positions = (
            nn.Embedding(workload.seq_len, dim, dtype=dtype, device=device) if model.norm == "layernorm" else None
        )
        self.blocks = nn.ModuleList(
            Block(workload, moe_layers[i] if i in moe_layers else DenseFFN(dim, dense_hidden, swiglu, dtype, device),
                  dtype, device)
            for i in range(model.n_layers)
        )
        self.final_norm = _norm(model.norm, dim, dtype, device)
        self.lm_head = nn.Linear(dim, model.vocab_size, bias=False, dtype=dtype, device=device)

    @property
    def moe_layers(self) -> list[MoELayerAdapter]:
        return [block.ffn for block in self.blocks if block.is_moe]

    def non_moe_parameters(self) -> list[nn.Parameter]:
        """Parameters replicated on every rank (data-parallel all-reduce candidates)."""
        moe = {id(p) for layer in self.moe_layers for p in layer.parameters()}
        return [p for p in self.parameters() if id(p) not in moe]

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_BSV, sum of MoE aux losses)."""
        x_BSM = self.embed(tokens_BS)
        if self.positions is not None:
            x_BSM = x_BSM + self.positions(torch.arange(tokens_BS.shape[1], device=tokens_BS.device))
        l_aux_sum = x_BSM.new_zeros(())
        for block in self.blocks:
            x_BSM, l_aux = block(x_BSM)
            if l_aux is not None:
                l_aux_sum = l_aux_sum + l_aux
        return self.lm_head(self.final_norm(x_BSM)), l_aux_sum

    def loss(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy + AUX_LOSS_COEF * l_aux_sum, l_aux_sum)."""
        logits_BSV, l_aux_sum = self(tokens_BS)
        logits_TV = logits_BSV.flatten(0, 1)
        logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))  # bf16 -> fp32 loss
        ce = F.cross_entropy(logits_TV, targets_BS.flatten())
        return ce + AUX_LOSS_COEF * l_aux_sum.to(ce.dtype), l_aux_sum


def _init_non_moe(model: MoETransformer, seed: int) -> None:
    """GPT-2 init from one seeded generator, visiting modules in a fixed order."""
    gen = seeded_generator("model", seed)
    residual_std = INIT_STD / math.sqrt(2 * model.workload.model.n_layers)
    inside_moe = {id(m) for layer in model.moe_layers for m in layer.modules()}
    with torch.no_grad():
        for name, module in model.named_modules():
            if id(module) in inside_moe:
                continue
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(".out") else INIT_STD
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=torch.float64) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def build_model(
    workload: Workload, system: MoESystem, knobs: MoEKnobs, parallel: ParallelSpec, seed: int
) -> MoETransformer:
    """The workload's transformer with `system`'s MoE layers, canonical weights loaded."""
    workload.validate()
    dtype = knobs.torch_dtype
    moe_layers = {}
    for i in workload.model.moe_block_indices():
        layer = build_moe_layer(system, workload.layer, knobs, parallel, layer_index=i)
        layer.load_canonical(moe_block_weights(workload.layer, seed, i, dtype))
        moe_layers[i] = layer
    model = MoETransformer(workload, moe_layers, dtype, knobs.device)
    _init_non_moe(model, seed)
    return model.to(knobs.device)


def make_batch(workload: Workload, seed: int, rank: int = 0, device: str = "cpu",
               entry: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_BS, targets_BS): uniform random token ids and their next tokens, seeded by
    (seed, rank, pool entry); entry 0 keeps the original (seed, rank) stream."""
    B, S, V = workload.batch_size, workload.seq_len, workload.model.vocab_size
    parts = ("batch", seed, rank) if entry == 0 else ("batch", seed, rank, "entry", entry)
    seq = torch.randint(0, V, (B, S + 1), generator=seeded_generator(*parts))
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def make_batch_pool(workload: Workload, seed: int, size: int, rank: int = 0,
                    device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`size` distinct token batches (entry p = make_batch(..., entry=p)): the fixed pool a model
    benchmark's steps cycle through, the same for every system."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"pool size must be a positive integer, got {size!r}")
    return [make_batch(workload, seed, rank, device, entry=p) for p in range(size)]
