"""tutel_native against an independent dense GShard-style formulation (fp64, 1e-12).

The dense model below is written from the contract (docs/tutel-semantics.md
sections 2-3) with one-hot masks and einsums over a [S, E, C] combine tensor:
slow and obvious, sharing no code with the layer. Outputs, l_aux, dispatch
counts and every gradient (input, gate, experts) must agree.

Legend: S tokens, M model dim, H hidden, E experts, K top-k, C capacity.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from systems.tutel_native import moe_layer

torch.set_num_threads(1)
M, H, E, S = 8, 12, 4, 30
RTOL = 1e-12


def dense_capacity(cf, k, S, counts_E):
    spe = math.ceil(S / E)
    if cf > 0:
        c = k * int(cf * spe)
    elif cf == 0:
        c = int(counts_E.max())
    else:
        c = min(int(counts_E.max()), k * int(-cf * spe))
    return max(c, 1)


def dense_locations(idx_SK, order_S):
    """L_i = cumsum(m_i) - 1 + sum_{j<i} m_j.sum(0), in `order_S` token order."""
    K = idx_SK.shape[1]
    loc_SK = torch.empty_like(idx_SK)
    offset_E = torch.zeros(E, dtype=torch.long)
    for i in range(K):
        m_SE = F.one_hot(idx_SK[order_S, i], E)
        L_SE = torch.cumsum(m_SE, 0) - 1 + offset_E
        loc_SK[order_S, i] = (L_SE * m_SE).sum(1)
        offset_E = offset_E + m_SE.sum(0)
    return loc_SK


def dense_experts(kind, p, D_ECM):
    if kind == "ffn":
        h = torch.einsum("ecm,ehm->ech", D_ECM, p["experts.batched_fc1_w"]) + p["experts.batched_fc1_bias"][:, None]
        return torch.einsum("ech,eho->eco", F.gelu(h), p["experts.batched_fc2_w"]) + p["experts.batched_fc2_bias"][
            :, None
        ]
    w1 = p["experts.W_fc1"].view(E, M, H)
    w2 = p["experts.W_fc2"].view(E, M, H)
    w3 = p["experts.W_fc3"].view(E, H, M)
    g = F.silu(torch.einsum("ecm,emh->ech", D_ECM, w1)) * torch.einsum("ecm,emh->ech", D_ECM, w2)
    return torch.einsum("ech,ehm->ecm", g, w3)


def dense_moe(x_SM, p, cfg, training):
    if cfg["gate"] == "top":
        clean = x_SM @ p["gates.0.wg.weight"].T
    else:
        proj = x_SM @ p["gates.0.cosine_projector.weight"].T + p["gates.0.cosine_projector.bias"]
        sim = p["gates.0.sim_matrix"] / p["gates.0.sim_matrix"].norm(dim=0, keepdim=True).clamp_min(1e-12)
        proj = proj / proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
        clean = proj @ sim * torch.exp(torch.clamp(p["gates.0.temperature"], max=math.log(100)))
    noisy = clean
    if training and cfg["noise"] > 0:
        noisy = clean + cfg["noise"] * torch.randn_like(clean) / E
    P = torch.softmax(noisy, 1)
    k = cfg["k"]
    g_SK, idx_SK = torch.topk(P, k, 1)
    if cfg["normalize"] and k > 1:
        g_SK = g_SK / g_SK.sum(1, keepdim=True).clamp_min(torch.finfo(g_SK.dtype).eps)
    order = torch.argsort(-P.max(1).values, stable=True) if cfg["bpr"] else torch.arange(S)
    loc_SK = dense_locations(idx_SK, order)
    counts_E = torch.bincount(idx_SK.flatten(), minlength=E)
    C = dense_capacity(cfg["cf"], k, S, counts_E)
    keep_SK = loc_SK < C
    onehot_e = F.one_hot(idx_SK, E).to(x_SM.dtype)  # [S, K, E]
    onehot_c = F.one_hot(loc_SK.clamp(max=C - 1), C).to(x_SM.dtype) * keep_SK[..., None]  # [S, K, C]
    mask_SKEC = onehot_e[..., None] * onehot_c[:, :, None, :]
    dispatch_SEC = mask_SKEC.sum(1)
    combine_SEC = (mask_SKEC * g_SK[..., None, None]).sum(1)
    if cfg["postscore"]:
        D = torch.einsum("sec,sm->ecm", dispatch_SEC, x_SM)
        y = torch.einsum("sec,ecm->sm", combine_SEC, dense_experts(cfg["experts"], p, D))
    else:
        D = torch.einsum("sec,sm->ecm", combine_SEC, x_SM)
        y = torch.einsum("sec,ecm->sm", dispatch_SEC, dense_experts(cfg["experts"], p, D))
    if cfg["gshard"]:
        frac = torch.bincount(idx_SK[:, 0], minlength=E).to(P.dtype) / S
        l_aux = E * (P.mean(0) * frac).sum()
    else:
        imp = torch.softmax(clean, 1).sum(0)
        thr = torch.topk(noisy, k, 1).values[:, -1:]
        load = torch.distributions.Normal(0.0, cfg["noise"] / E).cdf(clean - thr).sum(0)

        def cv2(v):
            return v.var() / (v.mean() ** 2 + 1e-10)

        l_aux = (cv2(imp) + cv2(load)) / 2
    return y, l_aux, counts_E


def build(cfg, seed):
    gate = {"type": cfg["gate"], "k": cfg["k"], "capacity_factor": cfg["cf"], "gate_noise": cfg["noise"]}
    if cfg["gate"] == "cosine_top":
        gate["proj_dim"] = 6
    experts = {"type": cfg["experts"], "num_experts_per_device": E, "hidden_size_per_expert": H}
    layer = moe_layer(
        gate, M, experts, seeds=(seed, seed + 1, seed + 2), batch_prioritized_routing=cfg["bpr"],
        is_postscore=cfg["postscore"], normalize_gate=cfg["normalize"], is_gshard_loss=cfg["gshard"],
    ).double()
    with torch.no_grad():  # llama_ffn's normal(0, 0.01) init is too small to exercise the activation
        for name, param in layer.named_parameters():
            if name.startswith("experts.W_fc"):
                param.mul_(30)
    return layer


def compare(cfg, seed, training=False):
    torch.manual_seed(seed)
    layer = build(cfg, seed)
    layer.train(training)
    x = torch.randn(S, M, dtype=torch.float64) * 2
    dy = torch.randn(S, M, dtype=torch.float64)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    torch.manual_seed(seed + 100)
    y = layer(x1)
    torch.manual_seed(seed + 100)
    y_ref, l_ref, counts_ref = dense_moe(x2, params, cfg, training)
    (y * dy).sum().add(y.l_aux).backward()
    (y_ref * dy).sum().add(l_ref).backward()

    msg = f"cfg={cfg} seed={seed}"

    def close(a, b, what):
        scale = b.abs().max().item() or 1.0
        err = (a - b).abs().max().item() / scale
        assert err <= RTOL, f"{what}: rel err {err:.3g} ({msg})"

    assert y.dtype == torch.float64
    close(y, y_ref, "y")
    close(y.l_aux, l_ref, "l_aux")
    assert layer.dispatch_count.tolist() == counts_ref.tolist(), msg
    close(x1.grad, x2.grad, "dx")
    for name, p in layer.named_parameters():
        if params[name].grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name} ({msg})"
        else:
            close(p.grad, params[name].grad, f"grad {name}")
    return layer


BASE = dict(gate="top", k=2, cf=1.0, noise=0.0, bpr=False, postscore=True, normalize=True, gshard=True,
            experts="llama_ffn")
CASES = [
    dict(),
    dict(k=1),
    dict(k=3),
    dict(cf=0.5),
    dict(cf=0.5, k=1),
    dict(cf=0.5, k=3, experts="ffn"),
    dict(cf=0.0),
    dict(cf=-0.5),
    dict(cf=-4.0),
    dict(cf=0.5, bpr=True),
    dict(cf=0.5, bpr=True, k=3),
    dict(cf=0.5, postscore=False),
    dict(cf=0.5, postscore=False, experts="ffn", bpr=True),
    dict(normalize=False, cf=0.5),
    dict(gate="cosine_top", cf=0.5),
    dict(gate="cosine_top", k=1, cf=0.0, experts="ffn"),
    dict(experts="ffn", cf=0.75),
]


@pytest.mark.parametrize("over", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base")
def test_matches_dense_formulation(over):
    cfg = {**BASE, **over}
    layer = compare(cfg, seed=1)
    if cfg["cf"] > 0 and cfg["cf"] <= 0.5:
        assert layer.last_stats.dropped > 0, "the case is meant to drop choices"


@pytest.mark.parametrize("gshard", [True, False])
def test_gate_noise_in_training_matches_dense(gshard):
    compare({**BASE, "noise": 1.0, "cf": 0.5, "gshard": gshard}, seed=3, training=True)


def test_fresh_random_seed():
    seed = random.randrange(1 << 30)
    print(f"fresh seed {seed}")
    cfg = {**BASE, "k": random.choice([1, 2, 3]), "cf": random.choice([0.5, 1.0, 0.0, -0.5]),
           "bpr": random.random() < 0.5, "postscore": random.random() < 0.5}
    compare(cfg, seed=seed)
