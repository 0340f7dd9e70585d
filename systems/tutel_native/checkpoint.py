"""Convert tutel_native checkpoints between world sizes (contract section 7).

A checkpoint of world size W is W per-rank state dicts. Expert tensors are
each rank's shards, rank-major; everything else (gates, the
``_num_global_experts`` buffer) is replicated. ``gather`` turns W dicts into
the world-size-1 dict (all E experts whole); ``scatter`` cuts that into N.

Full (world size 1) expert tensors, E experts, hidden H, model dim M, output Mo:
  ffn:       batched_fc1_w [E, H, M], batched_fc2_w [E, H, Mo],
             batched_fc1_bias [E, H], batched_fc2_bias [E, Mo]
  llama_ffn: W_fc1, W_fc2, W_fc3 flat [E * M * H] (expert-major)
At world size N: E >= N gives n = E/N whole experts per rank (rows/flat
ranges of the full tensors); E < N gives sc = N/E shards of one expert per
rank (rank w: expert w // sc, shard w % sc): ffn cuts H into sc parts and
fc2's bias into ceil(Mo/sc) parts (zero padded); llama_ffn keeps a
ceil(M*H/sc) slice of each flattened expert (zero padded).
"""
from __future__ import annotations

import math

import torch

ROW_SHARDED = ("batched_fc1_w", "batched_fc2_w", "batched_fc1_bias")  # split along H (dim 1)
PADDED_SHARDED = ("batched_fc2_bias",)  # split along Mo (dim 1), ceil(Mo/sc) each
FLAT_SHARDED = ("W_fc1", "W_fc2", "W_fc3")  # flat per-expert slices
EXPERT_NAMES = ROW_SHARDED + PADDED_SHARDED + FLAT_SHARDED
NUM_EXPERTS_KEY = "_num_global_experts"


def experts_from_canonical(weights, activation: str, expert_bias: bool) -> dict[str, torch.Tensor]:
    """All E experts of canonical weights (systems/base.py) as full world-size-1 Tutel tensors.

    ffn: batched_fc1_w = w1, batched_fc2_w = w2 (fc2's weight transposed), biases as is;
    llama_ffn (y = (act(x W1) * (x W2)) W3): W_fc1 = w1^T, W_fc2 = w3^T, W_fc3 = w2, flat.
    Cut a rank's part with shard_expert_tensor.
    """
    if activation == "swiglu":
        return {
            "W_fc1": weights.w1_EHM.transpose(1, 2).reshape(-1),
            "W_fc2": weights.w3_EHM.transpose(1, 2).reshape(-1),
            "W_fc3": weights.w2_EHM.reshape(-1),
        }
    full = {"batched_fc1_w": weights.w1_EHM, "batched_fc2_w": weights.w2_EHM}
    if expert_bias:
        full.update(batched_fc1_bias=weights.b1_EH, batched_fc2_bias=weights.b2_EM)
    return full


def _layer_prefixes(state: dict) -> list[str]:
    """Prefixes of the MoE layers in a state dict (keys ending with _num_global_experts)."""
    return [key[: -len(NUM_EXPERTS_KEY)] for key in state if key.endswith(NUM_EXPERTS_KEY)]


def _expert_key(key: str, prefix: str) -> str | None:
    """The expert tensor name if `key` is one of this layer's expert tensors."""
    head = prefix + "experts."
    if key.startswith(head) and key[len(head) :] in EXPERT_NAMES:
        return key[len(head) :]
    return None


def _num_experts(state: dict, prefix: str) -> int:
    return int(torch.as_tensor(state[prefix + NUM_EXPERTS_KEY]).item())


def layout(num_experts: int, world_size: int) -> tuple[int, int]:
    """(experts per rank n, sharded_count sc) of E experts over W ranks."""
    if num_experts >= world_size:
        if num_experts % world_size:
            raise ValueError(f"{num_experts} experts cannot be spread evenly over {world_size} ranks")
        return num_experts // world_size, 1
    if world_size % num_experts:
        raise ValueError(f"{world_size} ranks cannot shard {num_experts} experts evenly")
    return 1, world_size // num_experts


def _pad_to(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = extra
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def shard_expert_tensor(name: str, full: torch.Tensor, num_experts: int, world_size: int, rank: int) -> torch.Tensor:
    """This rank's part of a full (world size 1) expert tensor."""
    n, sc = layout(num_experts, world_size)
    if sc == 1:
        if name in FLAT_SHARDED:
            per = full.numel() // num_experts
            return full[rank * n * per : (rank + 1) * n * per].clone()
        return full[rank * n : (rank + 1) * n].clone()
    e, j = divmod(rank, sc)
    if name in FLAT_SHARDED:
        per_expert = full.view(num_experts, -1)[e]
        part = math.ceil(per_expert.numel() / sc)
        return _pad_to(per_expert, part * sc, 0)[j * part : (j + 1) * part].clone()
    row = full[e : e + 1]
    if name in PADDED_SHARDED:
        part = math.ceil(row.shape[1] / sc)
        return _pad_to(row, part * sc, 1)[:, j * part : (j + 1) * part].clone()
    if row.shape[1] % sc:
        raise ValueError(f"{name}: hidden size {row.shape[1]} is not divisible by sharded_count {sc}")
    part = row.shape[1] // sc
    return row[:, j * part : (j + 1) * part].clone()


def unshard_expert_tensor(name: str, shards: list[torch.Tensor], num_experts: int, full_size: int | None = None):
    """The full tensor from every rank's part (rank order).

    full_size: per-expert size to trim padding to (Mo for batched_fc2_bias,
    M*H for llama_ffn's flat tensors); needed only when sharded.
    """
    n, sc = layout(num_experts, len(shards))
    if sc == 1:
        return torch.cat(shards, dim=0)
    experts = [shards[e * sc : (e + 1) * sc] for e in range(num_experts)]
    if name in FLAT_SHARDED:
        if full_size is None:
            raise ValueError(f"{name}: the per-expert size is needed to undo the padding")
        return torch.cat([torch.cat(parts)[:full_size] for parts in experts])
    rows = [torch.cat(parts, dim=1) for parts in experts]
    if name in PADDED_SHARDED:
        if full_size is None:
            raise ValueError(f"{name}: the output size is needed to undo the padding")
        rows = [row[:, :full_size] for row in rows]
    return torch.cat(rows, dim=0)


def _model_dim(state: dict, prefix: str) -> int | None:
    for key in ("gates.0.wg.weight", "gates.0.cosine_projector.weight"):
        if prefix + key in state:
            return int(state[prefix + key].shape[-1])
    return None


def _flat_size(slice_len: int, sc: int, model_dim: int | None, name: str, hidden_size: int | None) -> int:
    """M*H of one llama_ffn expert from its slice length ceil(M*H/sc)."""
    if model_dim is not None and hidden_size is not None:
        return model_dim * hidden_size
    if model_dim is None:
        raise ValueError(f"{name}: cannot find the model dim (no gate weight); pass hidden_size and model_dim")
    fits = [p for p in range((slice_len - 1) * sc + 1, slice_len * sc + 1) if p % model_dim == 0]
    if len(fits) != 1:
        raise ValueError(f"{name}: the hidden size is ambiguous from the shards; pass hidden_size")
    return fits[0]


def _check_same(states: list[dict], prefix: str) -> int:
    values = {_num_experts(s, prefix) for s in states}
    if len(values) != 1:
        raise ValueError(f"{prefix}{NUM_EXPERTS_KEY} differs between the files: {sorted(values)}")
    return values.pop()


def gather(states: list[dict], hidden_size: int | None = None, model_dim: int | None = None) -> dict:
    """W per-rank state dicts (rank order) -> one world-size-1 state dict."""
    if not states:
        raise ValueError("no state dicts to gather")
    keys = list(states[0])
    for rank, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            missing = sorted(set(keys) ^ set(state))[:3]
            raise ValueError(f"rank {rank}'s checkpoint has different keys from rank 0's (e.g. {missing})")
    prefixes = _layer_prefixes(states[0])
    if not prefixes:
        raise ValueError(f"no {NUM_EXPERTS_KEY} buffer found: not a tutel_native checkpoint")
    out = dict(states[0])  # replicated tensors: rank 0's copy
    W = len(states)
    for prefix in prefixes:
        E = _check_same(states, prefix)
        _, sc = layout(E, W)
        for key in keys:
            name = _expert_key(key, prefix)
            if name is None:
                continue
            shards = [s[key] for s in states]
            full_size = None
            if sc > 1 and name in PADDED_SHARDED:
                full_size = states[0][prefix + "experts.batched_fc2_w"].shape[-1]
            if sc > 1 and name in FLAT_SHARDED:
                M = model_dim or _model_dim(states[0], prefix)
                full_size = _flat_size(shards[0].numel(), sc, M, key, hidden_size)
            out[key] = unshard_expert_tensor(name, shards, E, full_size)
    return out


def scatter(state: dict, world_size: int) -> list[dict]:
    """One world-size-1 state dict -> `world_size` per-rank state dicts."""
    if world_size <= 0:
        raise ValueError(f"world size must be positive, got {world_size}")
    prefixes = _layer_prefixes(state)
    if not prefixes:
        raise ValueError(f"no {NUM_EXPERTS_KEY} buffer found: not a tutel_native checkpoint")
    out = [dict(state) for _ in range(world_size)]
    for prefix in prefixes:
        E = _num_experts(state, prefix)
        layout(E, world_size)
        for key, full in state.items():
            name = _expert_key(key, prefix)
            if name is None:
                continue
            whole = full.numel() % E == 0 if name in FLAT_SHARDED else full.shape[0] == E
            if not whole:
                raise ValueError(f"{key} does not hold all {E} experts: not a world-size-1 checkpoint")
            for rank in range(world_size):
                out[rank][key] = shard_expert_tensor(name, full, E, world_size, rank)
    return out


def convert(states: list[dict], world_size: int, **sizes) -> list[dict]:
    """World size len(states) -> world_size (gather, then scatter)."""
    return scatter(gather(states, **sizes), world_size)
