"""Harness adapter: tutel_native behind the uniform MoELayerAdapter interface.

With option gate='cosine_top' only the experts come from canonical weights (canonical
gates are linear); the cosine gate keeps its init seeded from knobs.seed.

Canonical -> Tutel layout (systems/base.py): llama_ffn W_fc1 = w1^T, W_fc2 = w3^T,
W_fc3 = w2 (stored flat); ffn batched_fc1_w = w1, batched_fc2_w = w2, biases as is.
Legend: T tokens, M model dim, H expert hidden, E experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.values import CanonicalWeights, LayerShape, MoEKnobs, ParallelSpec
from systems.base import (
    Availability,
    GradientsNotComparable,
    MoELayerAdapter,
    MoEOutput,
    MoESystem,
    RoutingStats,
    grad_of,
)
from systems.peer_common import canonical_from_tutel_experts
from systems.tutel_native.checkpoint import experts_from_canonical, shard_expert_tensor
from systems.tutel_native.layer import MoELayer

OPTIONS = {
    "overlap_degree": "a2a_ffn_overlap_degree (int >= 1)",
    "adaptive_r": "adaptive degree r (0 or a divisor of sharded_count)",
    "bpr": "batch-prioritized routing (bool)",
    "is_postscore": "scale by the gate after the experts (bool)",
    "gate": "'top' or 'cosine_top'",
    "use_2dh": "2D hierarchical all-to-all (bool)",
    "local_size": "ranks per node for use_2dh (int)",
    "profile_phases": "measure per-phase wall time (bool; adds synchronisation)",
    "expert_kernel": "expert GEMM kernel: 'auto' (default: with expert_layout 'auto', a measured cost model "
                     "picks kernel and layout each step, kernel_choice.py), 'onednn', 'mm' or 'grouped'",
    "expert_layout": "world-size-1 expert buffer layout: 'auto', 'live', 'grouped', 'max_fill' or 'capacity'",
    "tune": "run the adaptive (r, d) tuner in the first forward, a warm-up step (bool; tuner.py)",
    "tune_steps": "timed forward+backward steps per tuner candidate (int >= 1, default 3)",
    "tune_warmup": "untimed steps per tuner candidate (int >= 0, default 1)",
}


class TutelNativeLayer(MoELayerAdapter):
    layer_class = MoELayer  # a system built on tutel_native's layer swaps in its subclass

    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec):
        super().__init__()
        shape.validate()
        self.shape, self.knobs, self.parallel = shape, knobs, parallel
        opts = knobs.options
        group, self.ep_rank = None, 0
        if parallel.ep > 1:
            from systems.distributed import expert_parallel_group

            group, self.ep_rank = expert_parallel_group(parallel.ep)
        # ep > E: |n| = ep / E ranks share (shard) each expert, Tutel's negative num_experts_per_device.
        self.sharded_count = max(1, parallel.ep // shape.num_experts)
        self.num_local = shape.num_experts // parallel.ep if self.sharded_count == 1 else 1
        per_device = self.num_local if self.sharded_count == 1 else -self.sharded_count
        if shape.activation == "swiglu":
            experts = {"type": "llama_ffn", "activation_fn": F.silu}
        else:
            experts = {
                "type": "ffn",
                "activation_fn": F.gelu if shape.activation == "gelu" else F.relu,
                "has_fc1_bias": shape.expert_bias,
                "has_fc2_bias": shape.expert_bias,
            }
        experts.update(num_experts_per_device=per_device, hidden_size_per_expert=shape.ffn_dim)
        cf = knobs.capacity_factor
        self.layer = self.layer_class(
            {"type": opts.get("gate", "top"), "k": shape.top_k, "capacity_factor": 0.0 if cf is None else cf},
            shape.model_dim,
            experts,
            group=group,
            a2a_ffn_overlap_degree=int(opts.get("overlap_degree", 1)),
            normalize_gate=shape.renormalize,
            is_postscore=bool(opts.get("is_postscore", True)),
            batch_prioritized_routing=bool(opts.get("bpr", False)),
            parallel_type=f"adaptive:{int(opts.get('adaptive_r', 1))}",
            use_2dh=bool(opts.get("use_2dh", False)),
            local_size=opts.get("local_size"),
            seeds=(knobs.seed, knobs.seed + 1, None),
        ).to(knobs.torch_dtype)
        self.layer.phase_clock.enabled = bool(opts.get("profile_phases", False))
        self.layer.expert_kernel = str(opts.get("expert_kernel", "auto"))
        self.layer.expert_layout = str(opts.get("expert_layout", "auto"))
        self.tune = bool(opts.get("tune", False))
        self._tuning: dict | None = None

    def load_canonical(self, weights: CanonicalWeights) -> None:
        """Each rank takes its part exactly as a converted checkpoint would give it: whole
        experts under expert parallelism, shards of one expert when ep > E."""
        ex = self.layer.experts
        with torch.no_grad():
            gate = self.layer.gates[0]
            if hasattr(gate, "wg"):  # a cosine_top gate keeps its seeded init: canonical gates are linear
                gate.wg.weight.copy_(weights.gate_EM)
            full_experts = experts_from_canonical(weights, self.shape.activation, self.shape.expert_bias)
            for name, full in full_experts.items():
                local = shard_expert_tensor(name, full, self.shape.num_experts, self.parallel.ep, self.ep_rank)
                getattr(ex, name).copy_(local.reshape(getattr(ex, name).shape))

    def export_canonical(self) -> CanonicalWeights:
        """This rank's whole experts in canonical layout (the inverse of load_canonical) with the
        full gate. Sharded experts (ep > E) have no per-rank canonical form: gather a checkpoint."""
        with torch.no_grad():
            return self._to_canonical(lambda t: None if t is None else t.detach().clone(), "export")

    def canonical_gradients(self) -> CanonicalWeights:
        return self._to_canonical(grad_of, "compare gradients")

    def _to_canonical(self, take, what: str) -> CanonicalWeights:
        if self.sharded_count > 1:
            raise GradientsNotComparable(f"sharded experts (ep {self.parallel.ep} > E {self.shape.num_experts}): "
                                         f"gather the ranks' checkpoints (checkpoint.gather) to {what}")
        gate = self.layer.gates[0]
        if not hasattr(gate, "wg"):
            raise GradientsNotComparable("a cosine_top gate has no canonical (linear) form")
        ex = self.layer.experts
        names = ("W_fc1", "W_fc2", "W_fc3", "batched_fc1_w", "batched_fc2_w", "batched_fc1_bias", "batched_fc2_bias")
        tensors = {n: take(getattr(ex, n)) for n in names if getattr(ex, n, None) is not None}
        return canonical_from_tutel_experts(tensors, self.shape.activation, self.num_local, self.shape.model_dim,
                                            self.shape.ffn_dim, take(gate.wg.weight))

    def local_experts(self) -> tuple[int, int]:
        return self.ep_rank * self.num_local, self.num_local

    def aux_loss_mismatch(self) -> str:
        gate = self.knobs.options.get("gate", "top")
        return "" if gate == "top" else f"gate {gate!r} has its own loss"

    def prepare(self, num_tokens: int) -> None:
        """The expert kernel cost model (kernel_choice.py): read from the machine's cache, or measured."""
        self.layer.prepare_kernel_choice(num_tokens, self.knobs.device, self.knobs.torch_dtype)

    def forward(self, x_TM: torch.Tensor, **kwargs) -> MoEOutput:
        """``kwargs`` pass through to the layer (capacity_factor, top_k, ... at run time)."""
        if self.tune and self._tuning is None:
            self._run_tuner(x_TM)
        y_TM = self.layer(x_TM, **kwargs)
        return MoEOutput(y_TM, y_TM.l_aux)

    def _run_tuner(self, x_TM: torch.Tensor) -> None:
        """Option tune: time every valid (adaptive r, overlap d) on this input and keep the fastest.

        Runs inside the first forward, which the trial makes a warm-up step, so the
        timed steps all use the chosen setting. A tuner step is this layer's forward +
        backward (torch.autograd.grad: nothing accumulates into .grad); every rank runs
        the same candidates in the same order and the slowest rank's time decides.
        """
        import time

        from systems.tutel_native.tuner import AdaptiveTuner, candidates_for_layer

        opts = self.knobs.options
        tuner = AdaptiveTuner(candidates_for_layer(self.layer), warmup_steps=int(opts.get("tune_warmup", 1)),
                              measure_steps=int(opts.get("tune_steps", 3)), logger=lambda line: None)
        x = x_TM.detach().requires_grad_(x_TM.requires_grad)
        inputs = ([x] if x.requires_grad else []) + [p for p in self.layer.parameters() if p.requires_grad]
        started = time.perf_counter()
        with torch.enable_grad():
            while not tuner.done:
                with tuner.step() as candidate:
                    y = self.layer(x, **candidate.forward_kwargs())
                    if inputs:
                        torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
        chosen = tuner.chosen
        self.layer.adaptive_r, self.layer.a2a_ffn_overlap_degree = chosen.adaptive_r, chosen.overlap_degree
        self._tuning = {
            "tuner": "adaptive (r, d), systems/tutel_native/tuner.py",
            "where": "first forward (a warm-up step); score = median forward+backward of this layer, max over ranks",
            "warmup_steps": tuner.warmup_steps, "measure_steps": tuner.measure_steps,
            "candidates": tuner.report(), "chosen": chosen.forward_kwargs(), "log": list(tuner.lines),
            "wall_s": time.perf_counter() - started,
        }

    def tuning_report(self) -> dict | None:
        """The (r, d) tuner's report (option tune) and the expert kernel cost model's: its constants,
        where they came from, and how many steps ran each kernel/layout it chose."""
        report = dict(self._tuning or {})
        model = self.layer.kernel_cost_model
        if model is not None:
            report["kernel_choice"] = {**model.report(), "steps": dict(self.layer.kernel_choices)}
        return report or None

    def routing_stats(self) -> RoutingStats:
        """Read off the layer's StepStats, which it builds on request (the host copies of the counts
        and the l_aux sync happen here, outside the timed step); forward keeps only the route plan."""
        stats = self.layer.last_stats
        if stats is None:
            raise RuntimeError("routing_stats() called before the first forward")
        return RoutingStats(
            tokens_per_expert=stats.dispatch_count,
            dropped=stats.dropped,
            capacity=stats.capacity,
            l_aux=float(self.layer.l_aux.detach()),
            expert_rows_computed=stats.rows_computed,
        )

    def phase_times(self) -> dict[str, float] | None:
        clock = self.layer.phase_clock
        return dict(clock.times) if clock.enabled and clock.times else None


class TutelNative(MoESystem):
    name = "tutel_native"
    description = "native Tutel-style adaptive MoE: sparse dispatch, live-row experts, adaptive r/d/capacity"
    options = OPTIONS
    shards_experts = True  # ep > E: Tutel's negative num_experts_per_device

    def router_support(self, shape: LayerShape) -> str:
        """Tutel's router: softmax top-k, renormalised or not (its normalize_gate); no bias, groups or scale."""
        if not shape.has_softmax_router:
            return (f"tutel_native routes by softmax top-k (renormalised or not) only; this workload's router is "
                    f"{shape.router_label()} (run it with router=softmax for the common softmax variant)")
        return ""

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        common = super().check_support(shape, knobs, parallel)
        if not common.ok:
            return common
        gate = knobs.options.get("gate", "top")
        if gate not in ("top", "cosine_top"):
            return Availability.no(f"gate must be 'top' or 'cosine_top', got {gate!r}")
        from systems.tutel_native.expert_ops import KERNELS
        from systems.tutel_native.layer import LAYOUTS

        for key, allowed in (("expert_kernel", KERNELS), ("expert_layout", LAYOUTS)):
            value = knobs.options.get(key, "auto")
            if value not in allowed:
                return Availability.no(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        for key, least in (("tune_steps", 1), ("tune_warmup", 0)):
            value = knobs.options.get(key, least)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                return Availability.no(f"{key} must be an integer >= {least}, got {value!r}")
        if parallel.world_size > 1:
            try:
                from systems.tutel_native import parallel as _parallel  # noqa: F401
            except ImportError:
                return Availability.no("multi-rank tutel_native needs systems/tutel_native/parallel.py")
        return Availability.yes()

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return TutelNativeLayer(shape, knobs, parallel)
