"""tutel_native efficiency on the mixtral-8x7b proxy layer (one process, CPU).

Measures in one run, in interleaved rounds (the machine is shared; see
docs/peers-on-cpu.md), forward+backward of:
  gemm      the efficiency floor: the useful expert GEMMs alone (T*K/E rows per expert, 3 forward +
            6 backward GEMMs, no padding, no gating, no activation), on the fastest path this machine
            offers: each round's floor is the fastest of the candidates below, so tutel/gemm < 1
            cannot happen honestly
  gemm_bmm, gemm_mm, gemm_onednn  every GEMM on MKL bmm / a loop of MKL mm / oneDNN expert by expert
            (the op per_expert.py uses)
  gemm_mixed each GEMM on its own fastest path, chosen by timing the three first (printed per GEMM)
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

The process applies the harness's host-memory policy first (harness/host_memory.py, as every trial
does; --malloc system keeps glibc's defaults).

Run: .venv/bin/python benchmarks/bench_tutel_native.py [--rounds 9]
Legend: T tokens, M model dim, H expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec  # noqa: E402
from harness.host_memory import MALLOC_MODES, keep_freed_memory  # noqa: E402
from harness.stats import paired_ratio  # noqa: E402
from systems.torch_reference import ReferenceMoELayer  # noqa: E402
from systems.tutel_native.adapter import TutelNative  # noqa: E402

SHAPE = LayerShape(model_dim=512, ffn_dim=1792, num_experts=8, top_k=2, activation="swiglu")


# The 9 useful GEMMs of a SwiGLU expert's forward (3) and backward (6), per expert e:
# name -> (A, B, accumulate): out[e] = A[e] @ B[e] (+ out of "dx" for the accumulating one).
GEMM_PATHS = ("bmm", "mm", "onednn")


def _floor_operands(T: int, shape: LayerShape, dtype, gen) -> dict[str, tuple]:
    E, M, H = shape.num_experts, shape.model_dim, shape.ffn_dim
    n = T * shape.top_k // E
    x, dy = torch.randn(E, n, M, generator=gen, dtype=dtype), torch.randn(E, n, M, generator=gen, dtype=dtype)
    w1, w2 = torch.randn(E, M, H, generator=gen, dtype=dtype) * 0.02, torch.randn(E, M, H, generator=gen, dtype=dtype)
    w3 = torch.randn(E, H, M, generator=gen, dtype=dtype) * 0.02
    h1, h2 = torch.bmm(x, w1), torch.bmm(x, w2)
    dg, dx = torch.bmm(dy, w3.transpose(1, 2)), torch.bmm(h1, w1.transpose(1, 2))
    xt = x.transpose(1, 2)
    return {  # stand-ins of the right shapes and strides; the values do not matter for time
        "fwd h1 = x w1": (x, w1, None), "fwd h2 = x w2": (x, w2, None), "fwd y = a w3": (h1, w3, None),
        "bwd da = dy w3^T": (dy, w3.transpose(1, 2), None), "bwd dw3 = a^T dy": (h1.transpose(1, 2), dy, None),
        "bwd dw1 = x^T dh": (xt, dg, None), "bwd dw2 = x^T du": (xt, h2, None),
        "bwd dx = dh w1^T": (dg, w1.transpose(1, 2), None), "bwd dx += du w2^T": (h2, w2.transpose(1, 2), dx),
    }


def _gemm_path(path: str, a, b, acc):
    """A closure computing out[e] = a[e] @ b[e] (+ acc[e]) on one path (it returns the result: a tensor
    or a list of per-expert tensors), or None where the path is not available here.

    bmm: one MKL batched call; mm: a loop of MKL mm into one preallocated output;
    onednn: oneDNN's matmul expert by expert (torch.ops.mkldnn._linear_pointwise, the op
    systems/tutel_native/per_expert.py uses; its weight argument is b[e] transposed).
    """
    E = a.shape[0]
    if path == "bmm":
        return (lambda: torch.baddbmm(acc, a, b)) if acc is not None else (lambda: torch.bmm(a, b))
    if path == "mm":
        out = a.new_empty(E, a.shape[1], b.shape[2])

        def loop():
            for e in range(E):
                if acc is None:
                    torch.mm(a[e], b[e], out=out[e])
                else:
                    torch.addmm(acc[e], a[e], b[e], out=out[e])
            return out

        return loop
    from systems.tutel_native.per_expert import kernel_available, linear, linear_add

    if not kernel_available(a.device.type, a.dtype):
        return None
    if acc is not None:
        return lambda: [linear_add(a[e], b[e].t(), acc[e]) for e in range(E)]
    return lambda: [linear(a[e], b[e].t()) for e in range(E)]


def floor_paths(T: int, shape: LayerShape, dtype, gen) -> dict[str, dict[str, object]]:
    """Per useful GEMM, a closure per path that can run it here and gives bmm's result."""
    gemms = {}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, (a, b, acc) in _floor_operands(T, shape, dtype, gen).items():
        expected = torch.bmm(a, b) if acc is None else torch.baddbmm(acc, a, b)
        gemms[name] = {}
        for path in GEMM_PATHS:
            fn = _gemm_path(path, a, b, acc)
            if fn is None:
                continue
            try:
                got = fn()
            except RuntimeError:  # this path rejects these operands (a layout it does not take): not a candidate
                continue
            got = torch.stack(got) if isinstance(got, list) else got
            if torch.allclose(got, expected, rtol=tol, atol=tol):
                gemms[name][path] = fn
    return gemms


def fastest_paths(gemms: dict[str, dict[str, object]], rounds: int) -> tuple[dict[str, str], dict[str, dict]]:
    """Time every path of every GEMM in interleaved rounds; the fastest path per GEMM (by median) and all medians."""
    times = {name: {path: [] for path in paths} for name, paths in gemms.items()}
    for paths in gemms.values():  # warm-up (oneDNN builds a primitive per shape on first use)
        for fn in paths.values():
            fn()
    for _ in range(rounds):
        for name, paths in gemms.items():
            for path, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[name][path].append(time.perf_counter() - t0)
    medians = {name: {path: statistics.median(ts) for path, ts in per.items()} for name, per in times.items()}
    choice = {name: min(per, key=per.get) for name, per in medians.items()}
    return choice, medians


def useful_gemms(T: int, shape: LayerShape, dtype, gen, choice: dict[str, str] | None = None):
    """Closure running the 9 useful GEMMs (forward 3, backward 6) on T*K/E rows per expert,
    each on the path `choice` names for it (default: all bmm)."""
    gemms = floor_paths(T, shape, dtype, gen)
    fns = [paths[(choice or {}).get(name, "bmm")] for name, paths in gemms.items()]

    @torch.no_grad()
    def step():
        for fn in fns:
            fn()

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
    parser.add_argument("--malloc", default="reuse", choices=MALLOC_MODES,
                        help="host allocator policy, as the trials apply it (harness/host_memory.py)")
    parser.add_argument("--model-dim", type=int, default=SHAPE.model_dim, help="M (a smaller layer for a quick check)")
    parser.add_argument("--ffn-dim", type=int, default=SHAPE.ffn_dim, help="H")
    args = parser.parse_args(argv)
    malloc_applied = keep_freed_memory() if args.malloc == "reuse" else False
    shape = dataclasses.replace(SHAPE, model_dim=args.model_dim, ffn_dim=args.ffn_dim)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    knobs = MoEKnobs(capacity_factor=1.25, dtype=args.dtype)
    dtype = knobs.torch_dtype
    weights = CanonicalWeights.random(shape, seed=0, dtype=dtype)
    x_TM = torch.randn(args.tokens, shape.model_dim, generator=gen, dtype=dtype)
    dy_TM = torch.randn(args.tokens, shape.model_dim, generator=gen, dtype=dtype)

    def variant(layout: str = "auto", kernel: str = "auto"):
        adapter = TutelNative().build_layer(shape, knobs, ParallelSpec())
        adapter.load_canonical(weights)
        adapter.layer.expert_layout, adapter.layer.expert_kernel = layout, kernel
        return adapter

    tutel = variant()
    reference = ReferenceMoELayer(shape, knobs, ParallelSpec())
    reference.load_canonical(weights)

    floor = floor_paths(args.tokens, shape, dtype, gen)
    choice, path_medians = fastest_paths(floor, args.rounds)
    # Every uniform path, plus the per-GEMM fastest mix: the floor of a round is the fastest of them
    # in that round (a per-GEMM choice made on separate timings need not win as a whole).
    floor_cases = {"gemm_mixed": useful_gemms(args.tokens, shape, dtype, gen, choice)}
    for path in GEMM_PATHS:
        if all(path in paths for paths in floor.values()):
            floor_cases[f"gemm_{path}"] = useful_gemms(args.tokens, shape, dtype, gen, dict.fromkeys(floor, path))
    cases = {
        **floor_cases,
        "ffn": useful_ffn(args.tokens, shape, dtype, gen),
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

    times["gemm"] = [min(round_times) for round_times in zip(*(times[name] for name in floor_cases), strict=True)]
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def ratio(numerator: str, denominator: str) -> str:
        """Paired over rounds (each round ran every case once, interleaved): geometric mean and interval."""
        r = paired_ratio(times[numerator], times[denominator])
        return f"{r.ratio:.3f} {r.interval_text(3)}"

    tutel(x_TM)
    routing = tutel.routing_stats()
    kernel = tutel.layer._kernel
    print(f"mixtral-8x7b proxy: T={args.tokens} M={shape.model_dim} H={shape.ffn_dim} E={shape.num_experts} "
          f"K={shape.top_k} {args.dtype}, threads={args.threads}, rounds={args.rounds}, tutel kernel {kernel}")
    print(f"capacity {routing.capacity}, dropped {routing.dropped}, rows computed {routing.expert_rows_computed} "
          f"(useful {args.tokens * shape.top_k})")
    print(f"calibration 512^3 mm: min {min(calib) * 1e3:.2f} ms, max {max(calib) * 1e3:.2f} ms")
    unchanged = args.malloc == "reuse" and not malloc_applied
    print(f"host memory: {args.malloc}" + (" (not glibc: unchanged)" if unchanged else ""))
    print("floor GEMMs, median ms per path (fastest kept):")
    for name, per in path_medians.items():
        cells = "  ".join(f"{p} {per[p] * 1e3:7.2f}" if p in per else f"{p}     n/a" for p in GEMM_PATHS)
        print(f"  {name:20s} {cells}   -> {choice[name]}")
    for name, t in med.items():
        print(f"  {name:10s} median {t * 1e3:8.1f} ms   (min {min(times[name]) * 1e3:8.1f})")
    print("ratios: geometric mean of per-round paired ratios [95% bootstrap interval over rounds]")
    print(f"efficiency tutel/gemm: {ratio('tutel', 'gemm')} (target <= 1.15)")
    for name in floor_cases:
        print(f"floor candidate {name} / floor (the fastest candidate of each round): {ratio(name, 'gemm')}")
    print(f"tutel/ffn (GEMMs + activation): {ratio('tutel', 'ffn')}")
    print(f"dropless/gemm: {ratio('dropless', 'gemm')}")
    print(f"speedup of tutel vs torch_reference: {ratio('reference', 'tutel')}; vs padded buffer: "
          f"{ratio('padded', 'tutel')}; vs the mm kernel (grouped): {ratio('mm_grouped', 'tutel')}, "
          f"(live): {ratio('mm_live', 'tutel')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
