"""tutel_native efficiency on the mixtral-8x7b proxy layer (one process, CPU).

Measures in one run, in interleaved rounds (the machine is shared; see
shared/docs/peers-on-cpu.md), forward+backward of:
  gemm      the useful expert GEMMs alone: T*K/E rows per expert, torch.bmm, 3 forward + 6 backward
            GEMMs, no padding, no gating, no activation (the lower bound)
  ffn       the same rows through bmm + SwiGLU under autograd (useful expert compute)
  tutel     tutel_native layer, capacity factor 1.25, defaults (kernel "auto": oneDNN expert by expert
            on CPU fp32, live rows only)
  dropless  tutel_native layer, capacity_factor=0 at run time
  mm_grouped the "mm" kernel with its default layout at > 1 thread (groups of experts padded to
            their largest fill, one bmm per group and GEMM)
  mm_live   the "mm" kernel on live rows (per-expert mm loop)
  padded    tutel_native with Tutel's padded [E, C, M] buffer (expert_layout="capacity")
  reference torch_reference (loop over experts), capacity factor 1.25
and prints medians, the efficiency ratio tutel/gemm (target <= 1.15) and speedups.

Run: .venv/bin/python benchmarks/bench_tutel_native.py [--rounds 9]
Legend: T tokens, M model dim, H expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from systems.base import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec  # noqa: E402
from systems.torch_reference import ReferenceMoELayer  # noqa: E402
from systems.tutel_native.adapter import TutelNative  # noqa: E402

SHAPE = LayerShape(model_dim=512, ffn_dim=1792, num_experts=8, top_k=2, activation="swiglu")


def useful_gemms(T: int, shape: LayerShape, dtype, gen):
    """Closure running the 9 useful GEMMs (forward 3, backward 6) on T*K/E rows per expert."""
    E, M, H = shape.num_experts, shape.model_dim, shape.ffn_dim
    n = T * shape.top_k // E
    x, dy = torch.randn(E, n, M, generator=gen, dtype=dtype), torch.randn(E, n, M, generator=gen, dtype=dtype)
    w1, w2 = torch.randn(E, M, H, generator=gen, dtype=dtype) * 0.02, torch.randn(E, M, H, generator=gen, dtype=dtype)
    w3 = torch.randn(E, H, M, generator=gen, dtype=dtype) * 0.02

    @torch.no_grad()
    def step():
        h1, h2 = torch.bmm(x, w1), torch.bmm(x, w2)
        torch.bmm(h1, w3)
        dg = torch.bmm(dy, w3.transpose(1, 2))
        torch.bmm(h1.transpose(1, 2), dy)
        torch.bmm(x.transpose(1, 2), dg)
        torch.bmm(x.transpose(1, 2), h2)
        dx = torch.bmm(dg, w1.transpose(1, 2))
        torch.baddbmm(dx, h2, w2.transpose(1, 2))

    return step


def useful_ffn(T: int, shape: LayerShape, dtype, gen):
    """The useful rows through bmm + SwiGLU with autograd (GEMMs plus activation)."""
    E, M, H = shape.num_experts, shape.model_dim, shape.ffn_dim
    n = T * shape.top_k // E
    x = torch.randn(E, n, M, generator=gen, dtype=dtype, requires_grad=True)
    dy = torch.randn(E, n, M, generator=gen, dtype=dtype)
    sizes = ((E, M, H), (E, M, H), (E, H, M))
    ws = [(torch.randn(*s, generator=gen, dtype=dtype) * 0.02).requires_grad_() for s in sizes]

    def step():
        x.grad = None
        for w in ws:
            w.grad = None
        y = torch.bmm(F.silu(torch.bmm(x, ws[0])) * torch.bmm(x, ws[1]), ws[2])
        y.backward(dy)

    return step


def layer_step(layer, x_TM, dy_TM, **kwargs):
    def step():
        layer.zero_grad(set_to_none=True)
        x = x_TM.detach().requires_grad_(True)
        out = layer(x, **kwargs)
        out.y_TM.backward(dy_TM)

    return step


def calibrate(gen) -> float:
    a = torch.randn(512, 512, generator=gen)
    t0 = time.perf_counter()
    for _ in range(20):
        torch.mm(a, a)
    return (time.perf_counter() - t0) / 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    knobs = MoEKnobs(capacity_factor=1.25, dtype=args.dtype)
    dtype = knobs.torch_dtype
    weights = CanonicalWeights.random(SHAPE, seed=0, dtype=dtype)
    x_TM = torch.randn(args.tokens, SHAPE.model_dim, generator=gen, dtype=dtype)
    dy_TM = torch.randn(args.tokens, SHAPE.model_dim, generator=gen, dtype=dtype)

    def variant(layout: str = "auto", kernel: str = "auto"):
        adapter = TutelNative().build_layer(SHAPE, knobs, ParallelSpec())
        adapter.load_canonical(weights)
        adapter.layer.expert_layout, adapter.layer.expert_kernel = layout, kernel
        return adapter

    tutel = variant()
    reference = ReferenceMoELayer(SHAPE, knobs, ParallelSpec())
    reference.load_canonical(weights)

    cases = {
        "gemm": useful_gemms(args.tokens, SHAPE, dtype, gen),
        "ffn": useful_ffn(args.tokens, SHAPE, dtype, gen),
        "tutel": layer_step(tutel, x_TM, dy_TM),
        "dropless": layer_step(tutel, x_TM, dy_TM, capacity_factor=0.0),
        "mm_grouped": layer_step(variant("grouped", "mm"), x_TM, dy_TM),
        "mm_live": layer_step(variant("live", "mm"), x_TM, dy_TM),
        "padded": layer_step(variant("capacity"), x_TM, dy_TM),
        "reference": layer_step(reference, x_TM, dy_TM),
    }
    for step in cases.values():  # warm-up
        step()
    times = {name: [] for name in cases}
    calib = [calibrate(gen)]
    for _ in range(args.rounds):
        for name, step in cases.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        calib.append(calibrate(gen))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    per_round = [t / g for t, g in zip(times["tutel"], times["gemm"], strict=True)]
    tutel(x_TM)
    stats = tutel.routing_stats()
    kernel = tutel.layer._kernel
    print(f"mixtral-8x7b proxy: T={args.tokens} M={SHAPE.model_dim} H={SHAPE.ffn_dim} E={SHAPE.num_experts} "
          f"K={SHAPE.top_k} {args.dtype}, threads={args.threads}, rounds={args.rounds}, tutel kernel {kernel}")
    print(f"capacity {stats.capacity}, dropped {stats.dropped}, rows computed {stats.expert_rows_computed} "
          f"(useful {args.tokens * SHAPE.top_k})")
    print(f"calibration 512^3 mm: min {min(calib) * 1e3:.2f} ms, max {max(calib) * 1e3:.2f} ms")
    for name, t in med.items():
        print(f"  {name:10s} median {t * 1e3:8.1f} ms   (min {min(times[name]) * 1e3:8.1f})")
    print(f"efficiency tutel/gemm: median of per-round ratios {statistics.median(per_round):.3f}, "
          f"ratio of medians {med['tutel'] / med['gemm']:.3f} (target <= 1.15)")
    print(f"tutel/ffn (GEMMs + activation): {med['tutel'] / med['ffn']:.3f}")
    print(f"dropless/gemm: {med['dropless'] / med['gemm']:.3f}")
    print(f"speedup vs torch_reference: {med['reference'] / med['tutel']:.2f}x; "
          f"vs padded buffer: {med['padded'] / med['tutel']:.2f}x; "
          f"vs the mm kernel (grouped): {med['mm_grouped'] / med['tutel']:.2f}x, "
          f"(live): {med['mm_live'] / med['tutel']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
