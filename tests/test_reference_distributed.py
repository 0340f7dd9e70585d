"""torch_reference with expert parallelism (gloo ranks) against a single process holding all experts.

For each rank's own tokens and upstream gradient: the output, the input
gradient and the (replicated) gate gradient equal the single-process
reference's; each rank's expert-weight gradient equals the sum, over the
ranks of its expert-parallel group, of the single-process gradients of
those experts (data-parallel replicas are summed by the trainer, not here).
At model level, the debug Mixtral model's loss and embedding gradient on
each rank's batch equal the single-process model's.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.values import LayerShape, MoEKnobs, ParallelSpec
from harness.model import build_model, make_batch
from systems.distributed import free_port
from systems.torch_reference import ReferenceMoELayer, TorchReference
from workloads.flavors import get_workload
from workloads.routing import make_layer_inputs

SHAPE = LayerShape(model_dim=8, ffn_dim=6, num_experts=4, top_k=2, activation="swiglu")
TOKENS, SEED = 24, 7
EXPERT_PARAMS = ("w1_EHM", "w2_EHM", "w3_EHM")


def rank_inputs(rank: int):
    x_TM, weights = make_layer_inputs(SHAPE, TOKENS, "learned", SEED, rank=rank, dtype=torch.float64)
    dy_TM = torch.randn(TOKENS, SHAPE.model_dim, generator=torch.Generator().manual_seed(100 + rank),
                        dtype=torch.float64)
    return x_TM, weights, dy_TM


def run_layer(parallel: ParallelSpec, cf, rank: int):
    """(y, dx, gate grad, expert grads) of a reference layer on `rank`'s tokens."""
    x_TM, weights, dy_TM = rank_inputs(rank)
    layer = ReferenceMoELayer(SHAPE, MoEKnobs(capacity_factor=cf, dtype="float64"), parallel)
    layer.load_canonical(weights)
    x = x_TM.clone().requires_grad_(True)
    y_TM = layer(x).y_TM
    (y_TM * dy_TM).sum().backward()
    experts = {name: getattr(layer.experts, name).grad for name in EXPERT_PARAMS}
    return y_TM.detach(), x.grad, layer.gate_EM.grad, experts, layer.routing_stats()


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def model_loss_error(parallel: ParallelSpec, rank: int) -> float:
    """Model level: the debug Mixtral model's loss and embedding gradient on this rank's batch."""
    workload = get_workload("mixtral-8x7b", "debug")
    knobs = MoEKnobs(capacity_factor=workload.capacity_factor, dtype="float64")
    tokens, targets = make_batch(workload, seed=1, rank=rank)
    results = []
    for spec in (parallel, ParallelSpec()):
        model = build_model(workload, TorchReference(), knobs, spec, seed=1)
        loss, _ = model.loss(tokens, targets)
        loss.backward()
        results.append((loss.detach(), model.embed.weight.grad))
    (loss, grad), (loss_ref, grad_ref) = results
    return max(rel_err(loss, loss_ref), rel_err(grad, grad_ref))


def compare_rank(world: int, ep: int, rank: int) -> dict[str, float]:
    """Relative errors (and drop counts) of this rank's expert-parallel layer against single-process runs."""
    errors = {}
    for cf in (None, 0.5):
        y, dx, dgate, dexperts, stats = run_layer(ParallelSpec(world_size=world, ep=ep), cf, rank)
        y_ref, dx_ref, dgate_ref, _, stats_ref = run_layer(ParallelSpec(), cf, rank)
        group_first = rank // ep * ep
        group_sum = None
        for peer in range(group_first, group_first + ep):
            peer_grads = run_layer(ParallelSpec(), cf, peer)[3]
            group_sum = peer_grads if group_sum is None else {n: group_sum[n] + peer_grads[n] for n in group_sum}
        local = SHAPE.num_experts // ep
        first = rank % ep * local
        tag = "dropless" if cf is None else f"cf{cf}"
        errors[f"{tag}/y"] = rel_err(y, y_ref)
        errors[f"{tag}/dx"] = rel_err(dx, dx_ref)
        errors[f"{tag}/dgate"] = rel_err(dgate, dgate_ref)
        for name in EXPERT_PARAMS:
            errors[f"{tag}/{name}"] = rel_err(dexperts[name], group_sum[name][first : first + local])
        errors[f"{tag}/counts_equal"] = 0.0 if stats.tokens_per_expert == stats_ref.tokens_per_expert else 1.0
        errors[f"{tag}/dropped_equal"] = 0.0 if stats.dropped == stats_ref.dropped else 1.0
        errors[f"{tag}/dropped"] = float(stats.dropped)
    errors["model/loss"] = model_loss_error(ParallelSpec(world_size=world, ep=ep), rank)
    errors.update(gradient_sync_errors(ParallelSpec(world_size=world, ep=ep), rank))
    return errors


def gradient_sync_errors(parallel: ParallelSpec, rank: int) -> dict[str, float]:
    """After harness.distributed.sync_gradients: replicated gradients are the world mean of the
    single-process ones, and expert gradients agree across the dp replicas of the same experts."""
    from harness.distributed import sync_gradients

    workload = get_workload("mixtral-8x7b", "debug")
    knobs = MoEKnobs(capacity_factor=None, dtype="float64")
    model = build_model(workload, TorchReference(), knobs, parallel, seed=1)
    model.loss(*make_batch(workload, seed=1, rank=rank))[0].backward()
    expert_params = [p for layer in model.moe_layers for p in layer.expert_parameters()]
    sync_gradients(model, expert_params, parallel)
    mean_embed = 0
    for peer in range(parallel.world_size):
        single = build_model(workload, TorchReference(), knobs, ParallelSpec(), seed=1)
        single.loss(*make_batch(workload, seed=1, rank=peer))[0].backward()
        mean_embed = mean_embed + single.embed.weight.grad / parallel.world_size
    expert_grad = torch.cat([p.grad.reshape(-1) for p in expert_params])
    replicas = [torch.empty_like(expert_grad) for _ in range(parallel.world_size)]
    dist.all_gather(replicas, expert_grad)
    same_experts = range(rank % parallel.ep, parallel.world_size, parallel.ep)
    return {
        "sync/embed_is_world_mean": rel_err(model.embed.weight.grad, mean_embed),
        "sync/expert_replicas_agree": max(rel_err(replicas[r], expert_grad) for r in same_experts),
        "sync/expert_params_found": 0.0 if len(expert_params) == 3 * len(model.moe_layers) else 1.0,
    }


def worker(rank: int, world: int, eps: tuple[int, ...], port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for ep in eps:
            with open(os.path.join(out_dir, f"ep{ep}-rank{rank}.json"), "w") as f:
                json.dump(compare_rank(world, ep, rank), f)
    finally:
        dist.destroy_process_group()


# One spawn per world size (process start-up dominates); world 4 checks ep 4 and ep 2 (two EP groups).
@pytest.mark.parametrize("world,eps", [(2, (2,)), pytest.param(4, (4, 2), marks=pytest.mark.slow)])
def test_expert_parallel_matches_single_process(world, eps, tmp_path):
    mp.spawn(worker, args=(world, eps, free_port(), str(tmp_path)), nprocs=world, join=True)
    for ep in eps:
        any_dropped = False
        for rank in range(world):
            errors = json.loads((tmp_path / f"ep{ep}-rank{rank}.json").read_text())
            any_dropped |= errors.pop("cf0.5/dropped") > 0
            errors.pop("dropless/dropped")
            bad = {key: value for key, value in errors.items() if value > 1e-12}
            assert not bad, f"world {world}, ep {ep}, rank {rank}: {bad}"
        assert any_dropped, "the capacity case should drop some choices"
