"""Harness adapter for fsmoe_native: tutel_native's adapter with FSMoE's layer and schedule.

Options forward_degree and backward_degree take 1, 2, 4, 8 or "auto" (the default). With
"auto", prepare() profiles the ops on the live process group (profiling.py) and picks each
direction's degree with the cost model (schedule.py); the tuning report keeps what was
measured, what every candidate was predicted to cost, and what was chosen.
"""
from __future__ import annotations

import time

from core.values import LayerShape, MoEKnobs, ParallelSpec
from systems.base import Availability
from systems.fsmoe_native.layer import FSMoELayer
from systems.fsmoe_native.schedule import (
    DEGREES,
    LayerWork,
    allreduce_bytes_within,
    backward_gap_ms,
    choose_degree,
)
from systems.tutel_native.adapter import OPTIONS as TUTEL_OPTIONS
from systems.tutel_native.adapter import TutelNative, TutelNativeLayer

DEGREE_OPTIONS = ("forward_degree", "backward_degree")
GRAD_SYNCS = ("partitioned", "after_backward")
OPTIONS = {
    "forward_degree": "forward pipeline degree: 1, 2, 4, 8 or 'auto' (default: profiled cost model, schedule.py)",
    "backward_degree": "backward pipeline degree: 1, 2, 4, 8 or 'auto' (default: profiled cost model)",
    "grad_sync": "model level, data-parallel gradient all-reduce: 'partitioned' (default: in the MoE layers' "
                 "backward gaps, grad_sync.py) or 'after_backward' (one all-reduce, as the harness does)",
    **{k: TUTEL_OPTIONS[k] for k in ("bpr", "is_postscore", "profile_phases", "expert_kernel", "expert_layout")},
}


def layer_work(shape: LayerShape, knobs: MoEKnobs, num_tokens: int, ep: int = 1) -> LayerWork:
    """FSMoE's work terms for this rank's step: f = top-k x capacity factor (dropless: top-k); es the
    ranks sharing each expert (ep > E)."""
    cf = knobs.capacity_factor if knobs.capacity_factor else 1.0
    return LayerWork(f=shape.top_k * cf, b=1, s=num_tokens, m=shape.model_dim, h=shape.ffn_dim,
                     es=max(1, ep // shape.num_experts), n_gemm=3 if shape.activation == "swiglu" else 2)


class FSMoENativeLayer(TutelNativeLayer):
    layer_class = FSMoELayer

    def __init__(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec):
        super().__init__(shape, knobs, parallel)
        wanted = [knobs.options.get(k, "auto") for k in DEGREE_OPTIONS]
        self.auto = [w == "auto" for w in wanted]
        self.layer.set_degrees(*(1 if w == "auto" else int(w) for w in wanted))
        self._schedule: dict | None = None

    def prepare(self, num_tokens: int) -> None:
        """Above one rank: profile the ops (once per process and work: every MoE layer of a model shares
        it), choose the degrees left to 'auto', and keep the prediction for the gradient-sync plan."""
        super().prepare(num_tokens)
        if self.parallel.ep == 1 or self._schedule is not None:
            return
        started = time.perf_counter()
        work = layer_work(self.shape, self.knobs, num_tokens, self.parallel.ep)
        profile = _profile(work, self.parallel.ep, self.layer.num_local_experts, self.knobs.torch_dtype,
                           self.layer.group, self._intra_group())
        choices = [choose_degree(profile, work, backward) for backward in (False, True)]
        degrees = [c.chosen if auto else fixed for c, auto, fixed in
                   zip(choices, self.auto, (self.layer.forward_degree, self.layer.backward_degree), strict=True)]
        self.layer.set_degrees(*degrees)
        self.backward_gap_ms = backward_gap_ms(profile, work, degrees[1])
        self.backward_gap_bytes = allreduce_bytes_within(profile, self.backward_gap_ms)
        self._schedule = {"scheduler": "FSMoE-style degree choice, systems/fsmoe_native/schedule.py",
                          "where": "prepare(): before any checked or timed step", "work": vars(work),
                          "profile": profile.to_dict(), "choices": [c.to_dict() for c in choices],
                          "chosen": {"forward_degree": degrees[0], "backward_degree": degrees[1]},
                          "given": [not auto for auto in self.auto], "backward_gap_ms": self.backward_gap_ms,
                          "wall_s": time.perf_counter() - started}

    def _intra_group(self):
        """The process group of the ranks sharing this rank's expert (None without sharding)."""
        if self.layer.sharded_count == 1:
            return None
        from systems.tutel_native.comm import subgroup
        from systems.tutel_native.parallel import layer_shard_plan

        return subgroup(layer_shard_plan(self.layer).expert_ranks())

    def tuning_report(self) -> dict | None:
        report = dict(super().tuning_report() or {})
        report["fsmoe_schedule"] = self._schedule or {
            "chosen": {"forward_degree": self.layer.forward_degree, "backward_degree": self.layer.backward_degree},
            "note": "degrees as given" if not any(self.auto) else "one rank: nothing to pipeline"}
        return report


_PROFILES: dict[tuple, object] = {}


def _profile(work: LayerWork, ep: int, num_local: int, dtype, group, intra_group):
    """Profiling runs collectives: every rank reaches this with the same key, in the same order."""
    from systems.fsmoe_native.profiling import profile_layer

    key = (tuple(vars(work).items()), ep, num_local, str(dtype))
    if key not in _PROFILES:
        _PROFILES[key] = profile_layer(work, ep, num_local, dtype, group=group, intra_group=intra_group)
    return _PROFILES[key]


class FSMoENative(TutelNative):
    name = "fsmoe_native"
    description = ("FSMoE-style scheduled MoE on tutel_native's layer: per-direction pipeline degrees from a "
                   "profiled cost model")
    options = OPTIONS
    shards_experts = True  # ep > E: FSMoE's expert sharding (pipeline.py)

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        common = super().check_support(shape, knobs, parallel)
        if not common.ok:
            return common
        for key in DEGREE_OPTIONS:
            value = knobs.options.get(key, "auto")
            if value != "auto" and value not in DEGREES:
                return Availability.no(f"{key} must be one of {', '.join(map(str, DEGREES))} or 'auto', got {value!r}")
        if knobs.options.get("grad_sync", GRAD_SYNCS[0]) not in GRAD_SYNCS:
            return Availability.no(f"grad_sync must be one of {', '.join(GRAD_SYNCS)}, "
                                   f"got {knobs.options['grad_sync']!r}")
        if parallel.ep == 1:
            return Availability.no("fsmoe_native schedules the expert-parallel communication; at one rank it is "
                                   "tutel_native's layer (run it with --ep 2 or more)")
        return Availability.yes()

    def gradient_sync(self, parallel: ParallelSpec, layers):
        """The partitioned all-reduce in the MoE layers' backward gaps (grad_sync.py), above one rank."""
        from systems.fsmoe_native.grad_sync import PartitionedGradientSync

        layers = [getattr(layer, "routed", layer) for layer in layers]  # inside the harness's shared expert
        if parallel.world_size == 1 or not layers or \
                layers[0].knobs.options.get("grad_sync", GRAD_SYNCS[0]) != "partitioned":
            return None
        gaps = [getattr(layer, "backward_gap_bytes", 0.0) for layer in reversed(layers)]  # backward order
        return PartitionedGradientSync(parallel.world_size, parallel.ep, gaps)

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return FSMoENativeLayer(shape, knobs, parallel)
