"""The memory guard: a trial that cannot fit in this machine's memory is not launched.

Why: a full-size workload on a small machine does not fail cleanly. Its child
swaps or is killed by the kernel's OOM killer minutes in, or starves the other
trials of the run. So before a round is launched, its peak is estimated from
the TrialSpec alone (shapes, dtype, level, mode, parallel layout, capacity
factor), and a round whose estimate exceeds SAFETY_FRACTION of the memory
available is recorded as ``too_large`` with the estimate and its breakdown.

The estimate, per rank, in bytes (b = bytes per element of the dtype; T tokens
per rank, M model dim, H expert hidden, E experts, k top-k, cf the capacity
factor, 1 when dropless; R = T k cf expert rows; ep expert-parallel ranks):

* runtime: the interpreter, torch, the harness and the system's library (RUNTIME_BYTES, more for
  the systems in RUNTIME_BYTES_BY_SYSTEM; CPU only);
* parameters: each MoE layer's gate (E M) and its local experts (E/ep of
  g H M each, g = 3 for SwiGLU else 2, plus H + M of biases), and at model
  level the embeddings, attention, norms, dense FFNs and the LM head;
* gradients: as many as parameters (none in forward mode);
* optimizer: model level in train mode, AdamW's 2 states per parameter, of the
  parameter's dtype (torch.optim.AdamW allocates them with zeros_like);
* activations: per MoE layer the expert hidden rows autograd keeps
  (R H x 4 for SwiGLU: gate, up, silu, product; x 2 otherwise), their
  gradients in backward (R H x 2), and the layer's input, output and gate
  logits; at model level also each block's attention tensors and the logits
  (T V: logits, fp32 log-softmax, its gradient);
* dispatch: the dispatch and combine buffers (R M each, both directions), x 2
  under expert parallelism (what is sent is also received);
* inputs: the input pool (layer level: input_pool x T M, plus one input
  gradient and the upstream gradient);
* check (round 0 only): one MoE layer's reference copy with all E experts: the
  canonical weights, the reference's parameters and gradients, both sides'
  canonical gradients (5 x the layer's parameters) and the reference's
  activations. It is freed before the steps, so adding it is conservative.

On CPU the ranks of one node share its memory: the node needs ranks x the
per-rank estimate, against MemAvailable of /proc/meminfo. On CUDA the guard is
skipped: the parent cannot read a GPU's free memory without creating a CUDA
context of its own (which would hold GPU memory for the whole run).

What the guard does not foresee can still end a child: a child (or a torchrun
worker) killed by SIGKILL before its timeout was, most likely, killed by the
kernel's OOM killer, and the runner records it as ``oom``
(:func:`killed_by_sigkill`).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

from core.values import LayerShape, torch_dtype
from harness.trial_spec import TrialSpec
from workloads.spec import Workload

SAFETY_FRACTION = 0.9
# Resident set of a trial child before its tensors: 220 MiB after importing torch, the harness and a
# system here; the debug trials' measured peaks, whose tensors are kilobytes, were 273-332 MiB.
RUNTIME_BYTES = 300 << 20
# Systems whose library alone holds more: Megatron-Core and transformers import far more than the rest.
# Measured here (AMD EPYC, 2026-12-05): qwen3-30b-a3b debug layer trials (tensors of kilobytes), forward+
# backward, warm-up 2 + 5 steps, peak of the system's steps, at 1, 2 and 4 ranks alike: megatron_core 452-457
# MiB, hf_transformers 460; the others 278-309 (torch_reference 278, tutel_native 288-298, fsmoe_native 300,
# deepspeed_moe 307-309), which RUNTIME_BYTES covers.
RUNTIME_BYTES_BY_SYSTEM = {"megatron_core": 460 << 20, "hf_transformers": 460 << 20}
GIB = float(1 << 30)
# torchrun's report of a worker that died of SIGKILL ("traceback : Signal 9 (SIGKILL) received by PID N"),
# looked for in the last STDERR_LINES lines of its stderr.
SIGKILL_REPORT = "Signal 9 (SIGKILL)"
STDERR_LINES = 60
TERMS = ("runtime", "parameters", "gradients", "optimizer", "activations", "dispatch", "inputs", "check")


@dataclass(frozen=True)
class Estimate:
    """A trial's estimated peak: bytes per rank by term, and how many ranks share this node's memory."""

    terms: dict[str, float]
    ranks_here: int = 1

    @property
    def per_rank(self) -> float:
        return sum(self.terms.values())

    @property
    def total(self) -> float:
        return self.per_rank * self.ranks_here

    def describe(self) -> str:
        """'estimated peak 212.4 GiB (parameters 80.1, ...)': per rank, then the node's sum."""
        parts = ", ".join(f"{name} {self.terms[name] / GIB:.1f}" for name in TERMS if self.terms.get(name))
        if self.ranks_here == 1:
            return f"estimated peak {self.total / GIB:.1f} GiB ({parts})"
        return (f"estimated peak {self.ranks_here} ranks x {self.per_rank / GIB:.1f} GiB = "
                f"{self.total / GIB:.1f} GiB (per rank: {parts})")


@dataclass(frozen=True)
class Verdict:
    """fits: True (launch), False (refuse: status too_large) or None (not checked); message says why."""

    fits: bool | None
    message: str


# ----------------------------------------------------------------- counts (elements)

def expert_parameters(shape: LayerShape) -> int:
    """One expert's parameters: its g H x M matrices, plus fc1/fc2 biases."""
    biases = shape.ffn_dim + shape.model_dim if shape.expert_bias else 0
    return shape.gemms_per_expert * shape.ffn_dim * shape.model_dim + biases


def moe_layer_parameters(shape: LayerShape, ep: int = 1) -> float:
    """One MoE layer's parameters on one rank: the replicated gate and E/ep experts (ep > E: a shard)."""
    return shape.num_experts * shape.model_dim + shape.num_experts * expert_parameters(shape) / ep


def dense_parameters(workload: Workload) -> int:
    """The model's non-MoE parameters (harness/model.py): embeddings, attention, norms, dense FFNs, LM head."""
    model, M = workload.model, workload.layer.model_dim
    gpt2 = model.norm == "layernorm"
    kv = 2 * model.n_kv_heads * (M // model.n_heads)
    attention = 2 * M * M + M * kv + ((2 * M + kv) if gpt2 else 0)
    norms = 2 * (2 * M if gpt2 else M)
    hidden = model.dense_ffn_dim or workload.layer.ffn_dim
    dense_ffn = 2 * M * hidden + hidden + M if gpt2 else 3 * M * hidden
    n_moe = model.n_moe_blocks
    embeddings = model.vocab_size * M + (workload.seq_len * M if gpt2 else 0)
    final = (2 * M if gpt2 else M) + model.vocab_size * M
    return embeddings + model.n_layers * (attention + norms) + (model.n_layers - n_moe) * dense_ffn + final


def expert_rows(workload: Workload, capacity_factor: float | None) -> float:
    """R = T k cf: rows the experts compute (capacity-padded; dropless: every choice)."""
    return workload.tokens_per_step * workload.layer.top_k * (capacity_factor or 1.0)


def moe_layer_activations(shape: LayerShape, tokens: int, rows: float, backward: bool) -> float:
    """Elements one MoE layer's forward keeps for backward, plus its hidden gradients in backward."""
    saved_hidden = rows * shape.ffn_dim * (4 if shape.activation == "swiglu" else 2)
    hidden_grads = rows * shape.ffn_dim * 2 if backward else 0
    io = 2 * tokens * shape.model_dim + 2 * tokens * shape.num_experts
    return saved_hidden + hidden_grads + io


def block_activations(workload: Workload) -> float:
    """Elements one transformer block keeps outside its FFN: norms, q/k/v, attention (and its weights,
    B heads S S, should SDPA take its math path), output projection, residuals."""
    model, M, T = workload.model, workload.layer.model_dim, workload.tokens_per_step
    kv = 2 * model.n_kv_heads * (M // model.n_heads)
    scores = workload.batch_size * model.n_heads * workload.seq_len ** 2
    return T * (8 * M + kv) + scores


def dense_ffn_activations(workload: Workload) -> float:
    hidden = workload.model.dense_ffn_dim or workload.layer.ffn_dim
    return workload.tokens_per_step * hidden * (3 if workload.model.norm == "rmsnorm" else 2)


# ----------------------------------------------------------------- the estimate

def _n_moe(spec: TrialSpec) -> int:
    return spec.workload.model.n_moe_blocks if spec.level == "model" else 1


def _parameters(spec: TrialSpec) -> float:
    moe = _n_moe(spec) * moe_layer_parameters(spec.workload.layer, spec.parallel.ep)
    return moe + (dense_parameters(spec.workload) if spec.level == "model" else 0)


def _activations(spec: TrialSpec, b: int) -> float:
    """Bytes of activations of one step (every MoE layer; at model level every block and the logits)."""
    workload, backward = spec.workload, spec.mode != "forward"
    T, rows = workload.tokens_per_step, expert_rows(workload, spec.knobs.capacity_factor)
    moe = _n_moe(spec) * moe_layer_activations(workload.layer, T, rows, backward) * b
    if spec.level == "layer":
        return moe
    n_dense = workload.model.n_layers - _n_moe(spec)
    blocks = (workload.model.n_layers * block_activations(workload) + n_dense * dense_ffn_activations(workload)) * b
    logits = T * workload.model.vocab_size * (b + 4 + (4 if backward else 0))
    return moe + blocks + logits


def _dispatch(spec: TrialSpec, b: int) -> float:
    rows = expert_rows(spec.workload, spec.knobs.capacity_factor)
    directions = 2 * (2 if spec.parallel.ep > 1 else 1)
    return _n_moe(spec) * directions * rows * spec.workload.layer.model_dim * b


def _inputs(spec: TrialSpec, b: int) -> float:
    workload = spec.workload
    if spec.level == "model":
        return spec.input_pool * 2 * workload.batch_size * workload.seq_len * 8  # int64 tokens and targets
    return (spec.input_pool + 2) * workload.tokens_per_step * workload.layer.model_dim * b


def _check(spec: TrialSpec, b: int) -> float:
    if not spec.check:
        return 0.0
    shape, T = spec.workload.layer, spec.workload.tokens_per_step
    rows = expert_rows(spec.workload, spec.knobs.capacity_factor)
    return (5 * moe_layer_parameters(shape) + moe_layer_activations(shape, T, rows, backward=True)) * b


def _runtime(spec: TrialSpec) -> float:
    """Resident bytes before any tensor: none on CUDA (the peak counts device tensors), else per system."""
    if spec.knobs.device.startswith("cuda"):
        return 0.0
    return float(RUNTIME_BYTES_BY_SYSTEM.get(spec.system, RUNTIME_BYTES))


def estimate_peak(spec: TrialSpec) -> Estimate:
    """The trial's estimated peak per rank, term by term (module docstring), from the spec alone."""
    b = torch_dtype(spec.knobs.dtype).itemsize
    params = _parameters(spec) * b
    backward = spec.mode != "forward"
    terms = {
        "runtime": _runtime(spec),
        "parameters": params,
        "gradients": params if backward else 0.0,
        "optimizer": 2 * params if spec.level == "model" and spec.mode == "train" else 0.0,
        "activations": _activations(spec, b),
        "dispatch": _dispatch(spec, b),
        "inputs": _inputs(spec, b),
        "check": _check(spec, b),
    }
    return Estimate(terms, ranks_here=spec.parallel.world_size // spec.parallel.nnodes)


# ----------------------------------------------------------------- the decision

def available_bytes(device: str) -> int | None:
    """Memory a trial may use here: MemAvailable on CPU; None where it cannot be known (CUDA, no /proc)."""
    if device.startswith("cuda"):
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def decide(spec: TrialSpec, available: int | None, fraction: float = SAFETY_FRACTION) -> Verdict:
    """Whether `spec` fits in `fraction` of `available` bytes (None: not known, the trial runs)."""
    estimate = estimate_peak(spec)
    if available is None:
        why = ("the parent cannot read a GPU's free memory without a CUDA context of its own"
               if spec.knobs.device.startswith("cuda") else "available memory unknown (no /proc/meminfo)")
        return Verdict(None, f"memory guard skipped on {spec.knobs.device}: {why}; {estimate.describe()}")
    relation = "fits in" if estimate.total <= fraction * available else "exceeds"
    message = f"{estimate.describe()} {relation} {fraction:.0%} of the {available / GIB:.1f} GiB available"
    return Verdict(relation == "fits in", message)


def guard(spec: TrialSpec) -> Verdict:
    """decide() against this machine's memory now. A spec the estimate cannot read (a bad shape or
    dtype) is launched anyway: the child then reports what is wrong with it, as an error."""
    try:
        return decide(spec, available_bytes(spec.knobs.device))
    except (ValueError, TypeError, AttributeError, ZeroDivisionError) as exc:
        return Verdict(None, f"memory guard skipped: cannot estimate this trial ({type(exc).__name__}: {exc})")


def killed_by_sigkill(returncode: int | None, stderr_tail: str) -> bool:
    """A child (or, under torchrun, one of its workers) that SIGKILL ended. Nothing of ours sends it
    before a timeout, so it was most likely the kernel's OOM killer: what the guard failed to foresee."""
    if returncode is None or returncode == 0:
        return False
    return returncode == -signal.SIGKILL or SIGKILL_REPORT in stderr_tail
