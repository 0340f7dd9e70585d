"""The trial child: ``python -m harness.trial SPEC.json OUT.json``.

One trial round in a fresh process (peer packages keep global state such as
DeepSpeed's expert-group registry), under torchrun when the spec has more
than one rank. The child never lets an exception escape: every outcome is a
status (ok, skipped, error, oom, nonfinite) in the result file, which local
rank 0 of node 0's launch writes atomically, once. A rank that fails writes
``OUT.json.rank<N>`` instead and exits non-zero, so torchrun stops the others
and the parent can still say why. (timeout is decided by the parent.)

Timing: warm-up steps, then timed steps; with several ranks a barrier
precedes every timed step, every rank times its own step, and the step time
is the slowest rank's. Backward passes use a fixed contiguous upstream
gradient (a ``.sum()`` gradient is a stride-0 tensor that sends bmm down a
slow path). Step i (warm-up and timed alike) runs on entry i mod spec.input_pool of
a fixed, seeded pool of distinct batches, the same for every system
(workloads/routing.py, harness/model.py), so routing changes from step to step
as in training; routing statistics are collected after each timed step,
outside the timed region, and averaged over the steps.

Checks: round 0 (spec.check) runs the full equivalence check of every MoE
layer against the reference before the timed steps; its result["check"] is
the CheckResult dict plus ``checksum = {"ranks": [one per rank]}`` (a layer's
checksum, or ``{"layers": [...]}`` at model level). A later round whose spec
has check=False and ``verify`` = round 0's check["checksum"] recomputes those
checksums on the same inputs and freshly loaded weights, also before the
timed steps, and records result["check"] = {"passed", "kind": "checksum",
"note", "max_deviation", "tolerance"} (harness/equivalence.py).

Peak memory (result["peak_memory_bytes"], its scope in "peak_memory_scope") covers the system's
own steps: the high-water mark is reset after the build and the check (CPU: malloc_trim, then
/proc/self/clear_refs resets VmHWM; CUDA: reset_peak_memory_stats) and read after the timed steps.
"process_peak_memory_bytes" is the whole process's, check included. Without clear_refs the figure
falls back to ru_maxrss and its scope says so.

``forward`` mode is the forward half of a training step (autograd records the
graph, nothing is backpropagated).

Legend: T tokens, M model dim.
"""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from harness.environment import thread_record
from harness.files import write_json_atomic
from harness.host_memory import keep_freed_memory, peak_rss_bytes, reset_peak_rss
from harness.trial_spec import TrialSpec

TRACEBACK_LINES = 6  # last lines of a traceback kept in an error message
LAYER_SGD_LR = 1e-4
MODEL_ADAMW_LR = 1e-4


class NonFiniteError(RuntimeError):
    """A step produced NaN or inf."""


# ----------------------------------------------------------------- helpers

def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def global_rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_writer(spec: TrialSpec) -> bool:
    """Local rank 0 of node 0's launch (c10d rendezvous orders nodes by itself, not by --node-rank)."""
    return spec.launcher_node_rank == 0 and local_rank() == 0


def default_threads(spec: TrialSpec) -> int:
    """Cores of this machine shared by the ranks placed on it."""
    if spec.parallel.threads_per_rank:
        return spec.parallel.threads_per_rank
    ranks_here = _env_int("LOCAL_WORLD_SIZE", spec.parallel.world_size // spec.parallel.nnodes)
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks_here))


def describe_exception(exc: BaseException) -> str:
    """One line naming the exception, then the traceback's last lines."""
    head = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    tail = "".join(traceback.format_exception(exc)).rstrip().splitlines()[-TRACEBACK_LINES:]
    return head + "\n" + "\n".join(tail)


# What PyTorch's allocators say when they refuse: CUDA's "CUDA out of memory", the CPU allocator's
# "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes" (and "not enough memory").
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def classify(exc: BaseException) -> str:
    """The status an exception stands for: an allocation the allocator refused is "oom"."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return "oom"
    if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES):
        return "oom"
    if isinstance(exc, NonFiniteError):
        return "nonfinite"
    return "error"


def peak_memory_bytes(device: str) -> int:
    """The process's peak since start (or since the last reset): CUDA tensors allocated, or ru_maxrss."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


PROCESS_SCOPE = ("whole process (ru_maxrss): imports, model build, the reference check and the system steps "
                 "(/proc/self/clear_refs unavailable)")


def steps_scope(spec: TrialSpec) -> str:
    """What the peak-memory figure covers: the system's steps, after whatever ran before them."""
    after = ("the reference check" if spec.check else "the checksum verification" if spec.verify
             else "the build (no check this round)")
    return f"system steps (warm-up + timed), after {after}"


class StepsPeak:
    """Peak memory of the system's own steps, so the reference check (a second model) does not inflate
    it: the high-water mark is reset when this is made, after the build and the check."""

    def __init__(self, device: str, scope: str):
        self.device, self.scope, self.reset = device, scope, True
        self.process_before = peak_memory_bytes(device)  # the process's peak so far, check included
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            reset_peak_rss()  # malloc_trim, then VmHWM := VmRSS (harness/host_memory.py)
        except OSError:
            self.scope, self.reset = PROCESS_SCOPE, False

    def bytes(self) -> int:
        """The peak since the reset (CUDA: max allocated; CPU: VmHWM), or ru_maxrss where none happened."""
        if self.device.startswith("cuda") or not self.reset:
            return peak_memory_bytes(self.device)
        return peak_rss_bytes()


def _fault_here(spec: TrialSpec, fault: str) -> bool:
    return spec.fault == fault and (spec.fault_rank is None or spec.fault_rank == global_rank())


def _apply_fault(spec: TrialSpec) -> None:
    """Test hook: fail on purpose (spec.fault), after the process group exists."""
    if _fault_here(spec, "raise"):
        raise RuntimeError(f"fault injected by the trial spec on rank {global_rank()} (test hook)")
    if _fault_here(spec, "hang"):
        while True:
            time.sleep(1)


def _ensure_finite(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t.detach()).all()):
            raise NonFiniteError(f"non-finite values in a step's output (shape {tuple(t.shape)})")


def _gather(value):
    """Every rank's `value`, in rank order ([value] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------- workloads

class Bench:
    """What one level needs to run: a step function, stats, FLOPs and a finiteness probe."""

    def __init__(self, step: Callable[[int], torch.Tensor], after: Callable[[], None], routing: Callable[[], dict],
                 phase_times: Callable[[], dict | None], flops: Callable[[dict], dict], tokens: int,
                 layers: list | None = None, inputs: list | None = None):
        self.step, self.after, self.routing, self.phase_times, self.flops = step, after, routing, phase_times, flops
        self.tokens = tokens
        self.layers = layers or []  # the system's MoE layers (for what they report after the steps)
        self.inputs = inputs or []  # layer level: the pool's input tensors (their .grad after a step)

    def tuning(self) -> list | None:
        """What each MoE layer's run-time tuner tried and chose (None when no layer tuned)."""
        reports = [layer.tuning_report() for layer in self.layers]
        return reports if any(r is not None for r in reports) else None


def _backward(out, dy_TM: torch.Tensor) -> None:
    """y with the fixed upstream gradient, plus the aux loss when the adapter returns one with a graph."""
    from harness.model import AUX_LOSS_COEF

    tensors, grads = [out.y_TM], [dy_TM]
    if out.l_aux is not None and out.l_aux.requires_grad:
        tensors.append(out.l_aux)
        grads.append(torch.full_like(out.l_aux, AUX_LOSS_COEF))
    torch.autograd.backward(tensors, grads)


def build_layer_bench(spec: TrialSpec, system, device: str) -> tuple[Bench, dict | None]:
    from harness import flops
    from systems.shared_expert import build_moe_layer
    from workloads.routing import make_layer_input_pool

    shape, knobs, parallel = spec.workload.layer, spec.knobs, spec.parallel
    T, rank = spec.workload.tokens_per_step, global_rank()
    pool, weights = make_layer_input_pool(shape, T, spec.routing, knobs.seed, spec.input_pool, rank=rank,
                                          dtype=knobs.torch_dtype)
    weights = weights.to(device=device)
    layer = build_moe_layer(system, shape, knobs, parallel)
    layer.load_canonical(weights)
    layer.prepare(T)
    check = _layer_check(spec, layer, weights, pool[0].to(device), _expected_checksum(spec))
    layer.zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(knobs.seed * 7919 + rank)
    dy_TM = torch.randn(T, shape.model_dim, generator=gen, dtype=torch.float64).to(knobs.torch_dtype).to(device)
    xs_TM = [x_TM.to(device).detach().requires_grad_(True) for x_TM in pool]
    poison = _fault_here(spec, "nonfinite")
    opt = torch.optim.SGD(layer.parameters(), lr=LAYER_SGD_LR) if spec.mode == "train" else None

    def step(i: int = 0) -> torch.Tensor:
        x_TM = xs_TM[i % len(xs_TM)]
        out = layer(x_TM * float("nan") if poison else x_TM)
        if spec.mode != "forward":
            _backward(out, dy_TM)
        if opt is not None:
            layer.before_optimizer_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out.y_TM

    def after() -> None:
        for x_TM in xs_TM:
            x_TM.grad = None
        if opt is None:
            layer.zero_grad(set_to_none=True)

    def routing() -> dict:
        return layer.routing_stats().to_dict()

    return Bench(step, after, routing, layer.phase_times,
                 lambda r: flops.layer_flops(shape, T, r, spec.mode), T, [layer], xs_TM), check


def _expected_checksum(spec: TrialSpec) -> dict | None:
    """This rank's part of round 0's checksum (spec.verify), when this round verifies one."""
    if spec.check or not spec.verify:
        return None
    ranks = spec.verify.get("ranks") or []
    rank = global_rank()
    if len(ranks) != spec.parallel.world_size:
        return {"unusable": f"spec.verify holds {len(ranks)} ranks' checksums, the trial has "
                f"{spec.parallel.world_size}"}
    return ranks[rank]


def _layer_check(spec: TrialSpec, layer, weights, x_TM: torch.Tensor, expected: dict | None) -> dict | None:
    """Round 0: the full check (CheckResult dict with this rank's "checksum"); a verifying
    round: the checksum verification; otherwise None. Every rank calls it (collective forward)."""
    from harness.equivalence import check_against_reference, verify_checksum

    shape, knobs, parallel = spec.workload.layer, spec.knobs, spec.parallel
    if spec.check:
        return check_against_reference(layer, shape, knobs, parallel, weights, x_TM, seed=knobs.seed).to_dict()
    if expected is None:
        return None
    if "unusable" in expected:
        return {"passed": False, "kind": "checksum", "note": expected["unusable"]}
    return verify_checksum(layer, shape, knobs, x_TM, expected, seed=knobs.seed)


def _aggregate_layer_checks(checks: list[dict]) -> dict:
    """One check dict for a model's MoE layers: passed only if every layer passed, worst errors
    on top, each layer's dict under "per_layer" (their checksums under "checksum.layers")."""
    if checks[0].get("kind") == "checksum":
        notes = [f"layer {j}: {c['note']}" for j, c in enumerate(checks) if not c["passed"]]
        return {"passed": all(c["passed"] for c in checks), "kind": "checksum",
                "max_deviation": max((c.get("max_deviation") or 0.0) for c in checks),
                "tolerance": checks[0].get("tolerance"),
                "note": "; ".join(notes) or checks[0]["note"], "per_layer": checks}
    per_layer = [{k: v for k, v in c.items() if k != "checksum"} for c in checks]
    rel_err: dict[str, float] = {}
    for c in checks:
        for name, err in c["rel_err"].items():
            rel_err[name] = max(rel_err.get(name, 0.0), err)
    grads = [c["max_rel_err_grad"] for c in checks if c["max_rel_err_grad"] is not None]
    notes = [f"layer {j}: {c['note']}" for j, c in enumerate(checks) if c["note"]]
    return {
        "passed": all(c["passed"] for c in checks),
        "max_rel_err_y": max(c["max_rel_err_y"] for c in checks),
        "max_rel_err_dx": max(c["max_rel_err_dx"] for c in checks),
        "counts_equal": all(c["counts_equal"] for c in checks),
        "tolerance": max(c["tolerance"] for c in checks),
        "note": "; ".join(notes),
        "rel_err": rel_err,
        "max_rel_err_grad": max(grads) if grads else None,
        "declared_precision": checks[0]["declared_precision"],
        "per_layer": per_layer,
        "checksum": {"layers": [c["checksum"] for c in checks]},
    }


def _combine_rank_checks(checks: list[dict | None]) -> dict | None:
    """Every rank's check as one dict: rank 0's, passed only if all passed, each rank's
    checksum under checksum.ranks (what later rounds get as spec.verify)."""
    if checks[0] is None:
        return None
    combined = {k: v for k, v in checks[0].items() if k != "checksum"}
    combined["passed"] = all(c is not None and c["passed"] for c in checks)
    if len(checks) > 1:
        combined["per_rank"] = [{k: v for k, v in c.items() if k != "checksum"} for c in checks]
        failed = [f"rank {r}: {c['note']}" for r, c in enumerate(checks) if not c["passed"]]
        if failed:
            combined["note"] = "; ".join(failed)
    if "checksum" in checks[0]:
        combined["checksum"] = {"ranks": [c["checksum"] for c in checks]}
    return combined


def average_routing(samples: list[dict]) -> dict:
    """RoutingStats dicts of several steps (pool entries) as one: counts, drops, rows and l_aux
    averaged (None when any step has None), capacity the largest; "per_layer" averaged per layer."""
    first = samples[0]
    if "per_layer" in first:
        per_layer = [average_routing([s["per_layer"][j] for s in samples]) for j in range(len(first["per_layer"]))]
        return {**per_layer[0], "per_layer": per_layer}
    n = len(samples)

    def mean(key):
        values = [s.get(key) for s in samples]
        return None if any(v is None for v in values) else sum(values) / n

    capacities = [s.get("capacity") for s in samples]
    return {
        **first,
        "tokens_per_expert": [sum(col) / n for col in zip(*(s["tokens_per_expert"] for s in samples), strict=True)],
        "dropped": mean("dropped"),
        "capacity": None if any(c is None for c in capacities) else max(capacities),
        "l_aux": mean("l_aux"),
        "expert_rows_computed": mean("expert_rows_computed"),
    }


def make_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (one pass, no temporaries, as training stacks use: DeepSpeed's and
    Apex's FusedAdam) where this device and dtype have one, else the default implementation."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=MODEL_ADAMW_LR, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=MODEL_ADAMW_LR)


def build_model_bench(spec: TrialSpec, system, device: str) -> tuple[Bench, dict | None]:
    """The iteration papers report: forward, backward, data-parallel gradient sync, optimizer step."""
    from harness import flops
    from harness.distributed import sync_gradients
    from harness.model import build_model, make_batch_pool, moe_block_weights
    from workloads.routing import make_layer_inputs

    workload, knobs, parallel = spec.workload, spec.knobs, spec.parallel
    rank = global_rank()
    model = build_model(workload, system, knobs, parallel, seed=knobs.seed)
    for layer in model.moe_layers:
        layer.prepare(workload.tokens_per_step)
    expected = _expected_checksum(spec)
    checks = []
    # Every MoE layer, at layer level on the weights build_model loaded into it (moe_block_weights),
    # with learned-routing tokens of this rank seeded per block.
    for j, i in enumerate(workload.model.moe_block_indices()):
        weights = moe_block_weights(workload.layer, knobs.seed, i, knobs.torch_dtype)
        x_TM, _ = make_layer_inputs(workload.layer, workload.tokens_per_step, "learned", knobs.seed * 1000 + i,
                                    rank=rank, dtype=knobs.torch_dtype)
        want = expected
        if expected is not None and "unusable" not in expected:
            layers = expected.get("layers") or []
            want = layers[j] if j < len(layers) else {"unusable": f"round 0's checksum has no MoE layer {j}"}
        checks.append(_layer_check(spec, model.moe_layers[j], weights.to(device=device), x_TM.to(device), want))
    model.zero_grad(set_to_none=True)
    check = None if checks[0] is None else _aggregate_layer_checks(checks)

    batches = make_batch_pool(workload, knobs.seed, spec.input_pool, rank=rank, device=device)
    opt = make_optimizer(model.parameters()) if spec.mode == "train" else None
    poison = _fault_here(spec, "nonfinite")
    expert_params = [p for layer in model.moe_layers for p in layer.expert_parameters()]
    # A system may schedule the data-parallel all-reduce itself (inside backward); else one after it.
    grad_sync = system.gradient_sync(parallel, model.moe_layers) if spec.mode != "forward" else None
    if grad_sync is not None:
        grad_sync.attach(model, expert_params)

    def step(i: int = 0) -> torch.Tensor:
        tokens_BS, targets_BS = batches[i % len(batches)]
        loss, _ = model.loss(tokens_BS, targets_BS)
        if poison:
            loss = loss * float("nan")
        if spec.mode != "forward":
            loss.backward()
            if grad_sync is not None:
                grad_sync.finish()
            else:
                sync_gradients(model, expert_params, parallel)
        if opt is not None:
            for layer in model.moe_layers:
                layer.before_optimizer_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    def after() -> None:
        if opt is None:
            model.zero_grad(set_to_none=True)

    def routing() -> dict:
        per_layer = [layer.routing_stats().to_dict() for layer in model.moe_layers]
        return {**per_layer[0], "per_layer": per_layer}

    def phase_times() -> dict | None:
        return model.moe_layers[0].phase_times()

    def model_flops(r: dict) -> dict:
        return flops.model_flops(workload, r["per_layer"], spec.mode)

    return Bench(step, after, routing, phase_times, model_flops, workload.tokens_per_step,
                 model.moe_layers), check


# ----------------------------------------------------------------- the round

def _median_phases(samples: list[dict]) -> dict | None:
    samples = [s for s in samples if s]
    if not samples:
        return None
    return {k: statistics.median(s[k] for s in samples if k in s) for k in samples[0]}


def _timed_steps(spec: TrialSpec, bench: Bench, device: str):
    """(seconds, phase times, routing stats, exposed communication seconds) per timed step; step i runs
    on pool entry i mod spec.input_pool, and its statistics are read after the timer stopped. Exposed
    communication (harness/exposed_comm.py) is measured on multi-rank CPU runs only (None otherwise)."""
    from functools import partial

    from harness.exposed_comm import exposed_communication
    from harness.timing import StepTimer

    timer = StepTimer(device)
    distributed = dist.is_available() and dist.is_initialized()
    for i in range(spec.warmup):
        _ensure_finite(bench.step(i))
        bench.after()
    samples, phases, routings, exposed = [], [], [], []
    measure = distributed and spec.parallel.world_size > 1 and not device.startswith("cuda")
    for i in range(spec.steps):
        if distributed:
            dist.barrier()
        with exposed_communication() if measure else contextlib.nullcontext() as comm:
            result, seconds = timer.time(partial(bench.step, i))
        _ensure_finite(result)
        phases.append(bench.phase_times())
        routings.append(bench.routing())
        bench.after()
        samples.append(seconds)
        exposed.append(min(comm.seconds, seconds) if measure else None)  # the clocks differ by a call's overhead
    return samples, phases, routings, exposed


def run_trial(spec: TrialSpec) -> dict:
    """One round of `spec` in this process; every outcome becomes a result dict."""
    from harness.timing import StepTimer, calibration_seconds

    started = time.perf_counter()
    device = spec.knobs.device
    result: dict = {
        "status": "ok", "message": "", "samples_s": [], "per_rank_samples_s": None, "exposed_comm_s": None,
        "calibration_before_s": None, "calibration_after_s": None, "routing_stats": None,
        "phase_times_s": None, "check": None, "peak_memory_bytes": None, "peak_memory_scope": None,
        "process_peak_memory_bytes": None, "flops": None,
        "tokens_per_step": None, "input_pool": None, "timer": StepTimer(device).name, "threads": None, "wall_s": None,
        "rank": global_rank(),
    }
    system = None
    try:
        spec.validate()
        if spec.malloc == "reuse":
            keep_freed_memory()
        threads = default_threads(spec)
        torch.set_num_threads(threads)
        result["threads"] = threads
        result["threads_measured"] = thread_record()
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank())
            torch.cuda.reset_peak_memory_stats()
        from systems import get_system
        from systems.plugins import register_plugins
        from systems.shared_expert import shared_expert_source

        register_plugins(spec.plugins)  # a plugin system is registered again in this fresh process
        system = get_system(spec.system)
        support = system.check_support(spec.workload.layer, spec.knobs, spec.parallel)
        if not support.ok:
            result.update(status="skipped", message=support.reason)
            return result
        system.init_distributed(spec.parallel)
        _apply_fault(spec)
        load_before = os.getloadavg()[0]
        calibration_before = calibration_seconds(device)
        build = build_layer_bench if spec.level == "layer" else build_model_bench
        bench, check = build(spec, system, device)
        peak = StepsPeak(device, steps_scope(spec))
        samples, phases, routings, exposed = _timed_steps(spec, bench, device)
        memory = peak.bytes()
        calibration_after = calibration_seconds(device)
        routing = average_routing(routings)
        flops = bench.flops(routing)

        mine = {"samples": samples, "exposed": exposed, "cal": (calibration_before, calibration_after), "flops": flops,
                "memory": memory, "process_memory": max(peak.process_before, memory), "tokens": bench.tokens,
                "check": check}
        everyone = _gather(mine)
        per_rank = [r["samples"] for r in everyone]
        slowest = [max(range(len(step)), key=step.__getitem__) for step in zip(*per_rank, strict=True)]
        result.update(
            samples_s=[max(step) for step in zip(*per_rank, strict=True)],
            # on the rank whose step was the slowest (the one samples_s reports)
            exposed_comm_s=None if exposed[0] is None else [everyone[r]["exposed"][i] for i, r in enumerate(slowest)],
            per_rank_samples_s=per_rank if len(per_rank) > 1 else None,
            calibration_before_s=max(r["cal"][0] for r in everyone),
            calibration_after_s=max(r["cal"][1] for r in everyone),
            routing_stats=routing,
            phase_times_s=_median_phases(phases),
            check=_combine_rank_checks([r["check"] for r in everyone]),
            input_pool=spec.input_pool,
            tuning=bench.tuning(),
            shared_expert=shared_expert_source(system, spec.workload.layer),
            peak_memory_bytes=max(r["memory"] for r in everyone),
            peak_memory_scope=peak.scope,
            process_peak_memory_bytes=max(r["process_memory"] for r in everyone),
            flops=_sum_flops([r["flops"] for r in everyone]),
            tokens_per_step=sum(r["tokens"] for r in everyone),
            # 1-minute load average of this machine: more runnable threads than cores stalls
            # every OpenMP parallel region, which a calibration matmul alone barely shows.
            load_before=load_before,
            load_after=os.getloadavg()[0],
        )
    except Exception as exc:  # noqa: BLE001 - every failure must become a status, never a lost round
        result.update(status=classify(exc), message=describe_exception(exc))
    finally:
        result["wall_s"] = time.perf_counter() - started
        if system is not None and result["status"] == "ok":
            _teardown(system, result)
    return result


def _sum_flops(per_rank: list[dict]) -> dict:
    """Rank 0's FLOP dict with "executed" and "useful" summed over ranks (None stays None: unknown)."""
    total = dict(per_rank[0])
    for key in ("executed", "useful"):
        values = [r.get(key) for r in per_rank]
        total[key] = None if any(v is None for v in values) else float(sum(values))
    return total


def _teardown(system, result: dict) -> None:
    """Release the system's global state after a successful round. A failure here cannot undo the
    round's measurements, so it is recorded (result["teardown_error"]) instead of losing them."""
    try:
        system.teardown()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - any teardown failure, from any peer package, must not lose the round
        result["teardown_error"] = describe_exception(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m harness.trial SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec_path, out_path = argv
    spec = TrialSpec.from_json(Path(spec_path).read_text())
    result = run_trial(spec)
    failed = result["status"] not in ("ok", "skipped")
    if is_writer(spec):
        write_json_atomic(result, out_path)
    elif failed:
        write_json_atomic(result, f"{out_path}.rank{global_rank()}")
    if failed:
        print(f"trial {spec.system} rank {global_rank()}: {result['status']}: {result['message']}", file=sys.stderr)
    # Non-zero on failure so torchrun stops the other ranks instead of leaving them in a collective.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
