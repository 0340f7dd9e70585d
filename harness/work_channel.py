"""The gate's work channel: what one step computed, gated exactly and free of timing noise.

A system that gets no slower but starts computing something else (different
routing, a dropped bias, a changed kernel that rounds differently beyond its
dtype) must fail a gate whatever the timing says. Recorded on the first step
of a freshly built layer or model, outside any timed region:

* routing: tokens per expert, dropped choices, expert rows computed (every MoE layer);
* checksums (harness/equivalence.py ``tensor_summary``) of the step's output,
  the input gradient (layer level), every MoE layer's canonical gradients, and
  in train mode the output of a second step (which sees the optimizer update);
* FLOPs of the step as torch.utils.flop_counter counts them (matmuls and
  convolutions actually dispatched, forward and backward);
* bytes handed to all-to-all collectives (0 in one process);
* the step's peak memory: how far memory rose above where it stood before the
  step (CPU: the peak resident set, reset through /proc/self/clear_refs, minus
  the resident set before; GPU: peak allocated minus allocated before).

:func:`compare_work` says which of these differ between two records; counts and
FLOPs must be equal, checksums agree within the dtype's checksum tolerance, and
peak memory within MEMORY_TOLERANCE (or MEMORY_SLACK_BYTES, whichever is larger).
"""
from __future__ import annotations

import contextlib

import torch

from harness.host_memory import peak_rss_bytes, reset_peak_rss

MEMORY_TOLERANCE = 0.10  # relative: RSS-based step peaks moved about 5% between identical processes
MEMORY_SLACK_BYTES = 32 << 20  # and by up to about 20 MiB on a 200 MiB step
EXACT = ("tokens_per_expert", "dropped", "expert_rows_computed", "flops", "all_to_all_bytes")


@contextlib.contextmanager
def count_all_to_all():
    """Counts the bytes of every tensor sent through torch.distributed's all-to-all calls."""
    import torch.distributed as dist

    sent = {"bytes": 0}
    originals = {name: getattr(dist, name) for name in ("all_to_all_single", "all_to_all")}

    def single(output, input, *args, **kwargs):
        sent["bytes"] += input.numel() * input.element_size()
        return originals["all_to_all_single"](output, input, *args, **kwargs)

    def lists(outputs, inputs, *args, **kwargs):
        sent["bytes"] += sum(t.numel() * t.element_size() for t in inputs)
        return originals["all_to_all"](outputs, inputs, *args, **kwargs)

    dist.all_to_all_single, dist.all_to_all = single, lists
    try:
        yield sent
    finally:
        dist.all_to_all_single, dist.all_to_all = originals["all_to_all_single"], originals["all_to_all"]


class StepMemory:
    """Peak memory a step needs above what was resident before it."""

    def __init__(self, device: str):
        self.device = device
        self.before = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = reset_peak_rss()  # what the step needs, not what earlier frees left resident
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak_bytes(self) -> int:
        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated() - self.before)
        return int(peak_rss_bytes() - self.before)


def _gradient_summaries(layers) -> tuple[dict, list[str]]:
    from harness.equivalence import GRAD_NAMES, tensor_summary
    from systems.base import GradientsNotComparable

    summaries, notes = {}, []
    for j, layer in enumerate(layers):
        try:
            grads = layer.canonical_gradients()
        except (GradientsNotComparable, NotImplementedError) as exc:
            notes.append(f"layer {j} gradients not compared: {exc}")
            continue
        for name in GRAD_NAMES:
            g = getattr(grads, name)
            if g is not None:
                summaries[f"layer{j}.{name}"] = tensor_summary(g, per_expert=name != "gate_EM")
    return summaries, notes


def record_work(bench, mode: str, dtype: str, device: str) -> dict:
    """Run the first step of a fresh `bench` (harness.trial.Bench) and record what it computed; peak
    memory is the second step's."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.equivalence import CHECKSUM_TOLERANCE, tensor_summary

    with count_all_to_all() as sent, FlopCounterMode(display=False) as flop_counter:
        out = bench.step(0)
    checksums = {"output": tensor_summary(out)}
    if bench.inputs and bench.inputs[0].grad is not None:
        checksums["input_grad"] = tensor_summary(bench.inputs[0].grad)
    grads, notes = _gradient_summaries(bench.layers) if mode == "forward_backward" else ({}, [])
    checksums.update(grads)
    routing = bench.routing()
    per_layer = routing.get("per_layer") or [routing]
    bench.after()
    # Memory from the second step: a process's first step also holds one-time allocations (oneDNN
    # primitives, BLAS buffers) whose size varied by 23% between two processes of the same code.
    with StepMemory(device) as memory:
        second = bench.step(1 if mode == "train" else 0)
    peak = memory.peak_bytes()
    if mode == "train":  # the second step's output shows the update the first step's gradients made
        checksums["output_after_update"] = tensor_summary(second)
    bench.after()
    return {
        "tokens_per_expert": [r["tokens_per_expert"] for r in per_layer],
        "dropped": [r["dropped"] for r in per_layer],
        "expert_rows_computed": [r.get("expert_rows_computed") for r in per_layer],
        "flops": int(flop_counter.get_total_flops()),
        "all_to_all_bytes": int(sent["bytes"]),
        "checksums": checksums,
        "checksum_tolerance": CHECKSUM_TOLERANCE[dtype],
        "peak_memory_bytes": peak,
        "notes": notes,
    }


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_work(baseline: dict, candidate: dict, memory_tolerance: float = MEMORY_TOLERANCE) -> list[str]:
    """One line per metric that differs: its name and both values (empty: the same work)."""
    from harness.equivalence import summary_deviation

    problems = []
    for key in EXACT:
        if baseline.get(key) != candidate.get(key):
            problems.append(f"{key}: baseline {_short(baseline.get(key))}, candidate {_short(candidate.get(key))}")
    tolerance = max(baseline["checksum_tolerance"], candidate["checksum_tolerance"])
    want, got = baseline["checksums"], candidate["checksums"]
    for name in sorted(set(want) | set(got)):
        if name not in want or name not in got:
            where = "baseline" if name not in want else "candidate"
            problems.append(f"checksum {name}: missing in the {where}")
            continue
        deviation = summary_deviation(got[name], want[name])
        if not deviation <= tolerance:
            problems.append(f"checksum {name}: deviates by {deviation:.2e} of sum|t| (tolerance {tolerance:.0e}); "
                            f"sum baseline {want[name][0][0]:.6g}, candidate {got[name][0][0]:.6g}")
    b_mem, c_mem = baseline["peak_memory_bytes"], candidate["peak_memory_bytes"]
    if abs(c_mem - b_mem) > max(memory_tolerance * abs(b_mem), MEMORY_SLACK_BYTES):
        problems.append(f"peak_memory_bytes: baseline {b_mem / 2**20:.1f} MiB, candidate {c_mem / 2**20:.1f} MiB "
                        f"(tolerance {memory_tolerance:.0%})")
    return problems
