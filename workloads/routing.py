"""Layer inputs (tokens and canonical weights) for the three routing regimes.

``learned``: random canonical weights and N(0, 1) tokens; routing is whatever
the random gate makes of them (mildly unbalanced, like early training).

``balanced`` and ``zipf``: a *synthetic* load that every system reproduces
through its own gate, because the tokens and the gate are built together:

* the gate's rows are ``GATE_SCALE * u_e`` for E orthonormal directions u_e
  in model space (so M >= E is required);
* a token whose sampled targets are (e_1, ..., e_k) is
  ``sum_j c_j u_{e_j} + small in-span noise + N(0, 1) noise orthogonal to
  every u_e``, with c_1 > c_2 > ... > c_k separated by about 1. Its logits are
  ``GATE_SCALE * c``, so softmax + top-k selects exactly e_1..e_k, in that
  order, with margins far beyond bfloat16 rounding.

Targets: ``balanced`` gives every expert the same number of first choices
(counts differ by at most one when E does not divide T), in a seeded random
token order; choice j of a token is j steps further along a seeded random
cycle of the experts, so every choice level -- and hence the total load --
is balanced too. ``zipf`` draws each token's choices without replacement
from a Zipf(s) law over the experts (p(rank r) ~ r^-s, s = 1.2 by default);
which expert is hottest is a seeded permutation shared by all ranks, as a
real hot expert would be.

Weights depend on ``seed`` only (identical on every rank); tokens depend on
(seed, rank, entry). ``make_layer_input_pool`` gives P entries: the same
weights and P distinct token batches (entry 0 is ``make_layer_inputs``'s), so a
benchmark's steps see routing change from step to step as in training, and no
input- or shape-keyed cache can flatter one system. Everything is drawn in float64 on the CPU with explicit
generators and cast at the end, so the same arguments give bit-identical
tensors in any process.

Legend: T tokens, M model dim, E experts, K top-k choices.
"""
from __future__ import annotations

import hashlib

import torch

from core.errors import InputError
from core.names import unknown_name_message
from core.values import CanonicalWeights, LayerShape

ROUTINGS = ("learned", "balanced", "zipf")
ZIPF_S = 1.2
GATE_SCALE = 2.0  # logits of a token's targets: 2*c_j, e.g. 6, 4, 2 for k = 3
IN_SPAN_NOISE = 0.05  # jitter of the non-target logits' coefficients (clamped to 3x)
TARGET_JITTER = 0.3  # uniform jitter added to each target coefficient, so gates vary per token


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `parts` (no Python hash randomisation)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def check_routing(routing: str) -> None:
    if not isinstance(routing, str) or routing not in ROUTINGS:
        raise InputError(unknown_name_message("routing", routing, ROUTINGS), "routing")


def check_synthetic_fits(shape: LayerShape, routing: str) -> None:
    """The synthetic routings need one model-space direction per expert: model_dim >= num_experts."""
    if routing != "learned" and shape.model_dim < shape.num_experts:
        raise InputError(
            f"{routing} routing needs model_dim >= num_experts (one direction per expert), "
            f"got model_dim {shape.model_dim} < num_experts {shape.num_experts}", "model_dim"
        )


def _cycle_offsets(num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """next_EK[e, j]: the expert j steps after e along a seeded random cycle (j = 0 is e)."""
    order = torch.randperm(num_experts, generator=seeded_generator("cycle", seed))
    position = torch.empty_like(order)
    position[order] = torch.arange(num_experts)
    steps = (position[:, None] + torch.arange(top_k)[None, :]) % num_experts
    return order[steps]


def zipf_probabilities(num_experts: int, seed: int, s: float = ZIPF_S) -> torch.Tensor:
    """p_E: Zipf(s) over the experts; expert ranks are a seeded permutation (same on all ranks)."""
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -s
    hottest_first = torch.randperm(num_experts, generator=seeded_generator("zipf-ranks", seed))
    p_E = torch.empty(num_experts, dtype=torch.float64)
    p_E[hottest_first] = weights / weights.sum()
    return p_E


def _entry_parts(entry: int) -> tuple:
    """Generator-seed parts of pool entry `entry` (none for entry 0, so it keeps its old streams)."""
    return () if entry == 0 else ("entry", entry)


def sample_targets(
    shape: LayerShape, num_tokens: int, routing: str, seed: int, rank: int = 0, zipf_s: float = ZIPF_S,
    entry: int = 0,
) -> torch.Tensor:
    """idx_TK: the experts each token must be routed to, first choice first (synthetic routings)."""
    check_routing(routing)
    E, K, T = shape.num_experts, shape.top_k, num_tokens
    gen = seeded_generator("targets", routing, seed, rank, *_entry_parts(entry))
    if routing == "balanced":
        first_T = torch.arange(T) % E
        first_T = first_T[torch.randperm(T, generator=gen)]
        return _cycle_offsets(E, K, seed)[first_T]
    if routing == "zipf":
        p_E = zipf_probabilities(E, seed, zipf_s)
        return torch.multinomial(p_E.expand(T, E), K, replacement=False, generator=gen)
    raise ValueError("learned routing has no predetermined targets")


def _orthonormal_directions(num_experts: int, model_dim: int, seed: int) -> torch.Tensor:
    """u_EM: E orthonormal rows in R^M (seeded)."""
    if model_dim < num_experts:
        raise InputError(
            f"synthetic routing needs model_dim >= num_experts (one direction per expert), "
            f"got model_dim {model_dim} < num_experts {num_experts}", "model_dim"
        )
    a_ME = torch.randn(model_dim, num_experts, generator=seeded_generator("directions", seed), dtype=torch.float64)
    q_ME, _ = torch.linalg.qr(a_ME)
    return q_ME.T.contiguous()


def _synthetic_tokens(u_EM: torch.Tensor, idx_TK: torch.Tensor, seed: int, rank: int, routing: str,
                      entry: int = 0) -> torch.Tensor:
    E, M = u_EM.shape
    T, K = idx_TK.shape
    gen = seeded_generator("tokens", routing, seed, rank, *_entry_parts(entry))
    noise = torch.randn(T, E, generator=gen, dtype=torch.float64) * IN_SPAN_NOISE
    coef_TE = noise.clamp(-3 * IN_SPAN_NOISE, 3 * IN_SPAN_NOISE)
    # Target j (0-based) gets K - j + jitter: strictly decreasing with gaps >= 1 - TARGET_JITTER.
    jitter_TK = torch.rand(T, K, generator=gen, dtype=torch.float64) * TARGET_JITTER
    strength_TK = (K - torch.arange(K, dtype=torch.float64))[None, :] + jitter_TK
    coef_TE.scatter_(1, idx_TK, strength_TK)
    free_TM = torch.randn(T, M, generator=gen, dtype=torch.float64)
    free_TM = free_TM - (free_TM @ u_EM.T) @ u_EM  # remove the component the gate can see
    return coef_TE @ u_EM + free_TM


def make_layer_inputs(
    shape: LayerShape,
    num_tokens: int,
    routing: str,
    seed: int,
    rank: int = 0,
    dtype: torch.dtype = torch.float32,
    zipf_s: float = ZIPF_S,
    entry: int = 0,
) -> tuple[torch.Tensor, CanonicalWeights]:
    """(x_TM, canonical weights) for one rank and pool entry; bit-identical for the same arguments."""
    check_routing(routing)
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if not isinstance(entry, int) or entry < 0:
        raise ValueError(f"pool entry must be a non-negative integer, got {entry!r}")
    weights = CanonicalWeights.random(shape, seed, dtype=torch.float64)
    if routing == "learned":
        gen = seeded_generator("learned", seed, rank, *_entry_parts(entry))
        x_TM = torch.randn(num_tokens, shape.model_dim, generator=gen, dtype=torch.float64)
        return x_TM.to(dtype), weights.to(dtype=dtype)
    u_EM = _orthonormal_directions(shape.num_experts, shape.model_dim, seed)
    weights.gate_EM = GATE_SCALE * u_EM
    idx_TK = sample_targets(shape, num_tokens, routing, seed, rank, zipf_s, entry=entry)
    x_TM = _synthetic_tokens(u_EM, idx_TK, seed, rank, routing, entry=entry)
    return x_TM.to(dtype), weights.to(dtype=dtype)


def make_layer_input_pool(
    shape: LayerShape,
    num_tokens: int,
    routing: str,
    seed: int,
    size: int,
    rank: int = 0,
    dtype: torch.dtype = torch.float32,
    zipf_s: float = ZIPF_S,
) -> tuple[list[torch.Tensor], CanonicalWeights]:
    """([x_TM of entry 0..size-1], canonical weights): one set of weights, `size` distinct token
    batches of the same regime (entry 0 is make_layer_inputs'); the same for every system."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"pool size must be a positive integer, got {size!r}")
    pool = [make_layer_inputs(shape, num_tokens, routing, seed, rank, dtype, zipf_s, entry=p) for p in range(size)]
    return [x_TM for x_TM, _ in pool], pool[0][1]
