"""Does the a2a/expert pipeline (overlap degree d) really overlap? Measure it.

``python -m benchmarks.overlap_bench [--ranks 2] [--tokens 2048] ...``
spawns gloo ranks on this machine and times, in interleaved rounds (medians):

* step(d): the layer's expert step (dispatch all-to-all, experts, combine
  all-to-all) forward + backward, for each overlap degree d;
* comm: the same four all-to-alls alone (dispatch/combine, forward/backward);
* compute: the same expert GEMMs alone, forward + backward, no exchange.

Perfect overlap would bring step(d) down towards max(comm, compute); no
overlap leaves it at comm + compute. Printed as milliseconds and ratios
(rank 0). A measurement tool, not a test: the machine's noise decides.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from systems.distributed import free_port
from systems.tutel_native.comm import Exchange, all_to_all
from systems.tutel_native.parallel import ShardPlan, ffn_weights, run_experts


def _timed(fn, barrier=True) -> float:
    if barrier:
        dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _worker(rank, world, port, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    plan = ShardPlan.for_world(1, world, rank)
    E, M, H = plan.num_global_experts, args.model_dim, args.hidden
    C = args.tokens * args.top_k // E
    gen = torch.Generator().manual_seed(rank)
    params = {
        "batched_fc1_w": (torch.randn(1, H, M, generator=gen) / M**0.5).requires_grad_(),
        "batched_fc2_w": (torch.randn(1, H, M, generator=gen) / H**0.5).requires_grad_(),
    }
    D = torch.randn(E, C, M, generator=gen).requires_grad_()
    dY = torch.randn(E, C, M, generator=gen)
    exchange = Exchange.build()
    experts = ffn_weights(params, torch.nn.functional.gelu, plan, 1, M)
    x_local = torch.randn(1, world * C, M, generator=gen).requires_grad_()
    dy_local = torch.randn(1, world * C, M, generator=gen)

    def step(d):
        run_experts(D, experts, plan, 1, d, exchange).backward(dY)

    def comm():
        sent = all_to_all(D.detach(), exchange)
        all_to_all(sent, exchange)
        all_to_all(dY, exchange)
        all_to_all(sent, exchange)

    def compute():
        experts(x_local).backward(dy_local)

    cases = {f"step d={d}": (lambda d=d: step(d)) for d in args.degrees}
    cases.update(comm=comm, compute=compute)
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        _timed(fn)
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    if rank == 0:
        comm_t, comp_t = med["comm"], med["compute"]
        print(f"ranks={world} threads/rank={args.threads} tokens/rank={args.tokens} k={args.top_k} M={M} H={H} "
              f"E={E} C={C} a2a bytes={E * C * M * 4} rounds={args.rounds}")
        print(f"comm alone     {comm_t * 1e3:8.2f} ms")
        print(f"compute alone  {comp_t * 1e3:8.2f} ms   (sum {1e3 * (comm_t + comp_t):.2f} ms,"
              f" max {1e3 * max(comm_t, comp_t):.2f} ms)")
        base = med[f"step d={args.degrees[0]}"]
        for d in args.degrees:
            t = med[f"step d={d}"]
            hidden = (comm_t + comp_t - t) / min(comm_t, comp_t)
            print(f"step d={d}       {t * 1e3:8.2f} ms   vs d={args.degrees[0]}: {t / base:.3f}x   "
                  f"share of the smaller part hidden: {hidden:+.0%}")
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--model-dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(args.ranks, free_port(), args), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
