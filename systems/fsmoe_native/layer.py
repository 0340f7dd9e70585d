"""tutel_native's layer with FSMoE's schedule: separate forward and backward pipeline degrees.

Everything but the expert step is tutel_native's (gate, routing, capacity, encode, decode),
so the layer computes the same function; above one rank the expert step is
pipeline.pipelined_experts, with the degrees this layer holds (switchable between calls,
like Tutel's knobs). The capacity is kept a multiple of the larger degree, as Tutel keeps it
a multiple of its one overlap degree.
"""
from __future__ import annotations

import torch

from systems.fsmoe_native.pipeline import Schedule, pipelined_experts
from systems.fsmoe_native.schedule import DEGREES
from systems.tutel_native.comm import subgroup
from systems.tutel_native.layer import MoELayer
from systems.tutel_native.parallel import layer_exchange, layer_expert_fn, layer_shard_plan


class FSMoELayer(MoELayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_degree = self.backward_degree = 1

    def set_degrees(self, forward: int, backward: int) -> None:
        for name, d in (("forward", forward), ("backward", backward)):
            if d not in DEGREES:
                raise ValueError(f"{name} pipeline degree must be one of {DEGREES}, got {d!r}")
        self.forward_degree, self.backward_degree = int(forward), int(backward)
        self.a2a_ffn_overlap_degree = max(forward, backward)  # the capacity multiple

    def _expert_step(self, dispatched_RM: torch.Tensor, plan) -> torch.Tensor:
        if self.world_size == 1:
            return super()._expert_step(dispatched_RM, plan)
        if not hasattr(self.experts, "compute_rows"):
            raise NotImplementedError("fsmoe_native pipelines built-in experts (ffn, llama_ffn), not custom ones")
        shards = layer_shard_plan(self)
        E, C, sc = self.num_global_experts, plan.capacity, shards.sharded_count
        # Sharded: this rank's hidden slice of its expert (Tutel's degree r = sc: ffn shards are slices
        # already; llama_ffn's flat shards are gathered and cut each step).
        weights = layer_expert_fn(self, shards, sc)
        schedule = Schedule(shards.world, shards.num_local_experts, self.forward_degree, self.backward_degree,
                            layer_exchange(self), weights.kind, weights.activation, sharded=sc,
                            intra_group=subgroup(shards.expert_ranks()) if sc > 1 else None)
        if weights.kind == "llama_ffn":
            args = (weights.w1, weights.w2, weights.w3, None, None)
        else:
            b2 = None if weights.b2 is None else weights.b2 * weights.b2_scale  # added by one holder only
            args = (weights.w1, None, weights.w2, weights.b1, b2)
        self.phase_clock.tick("a2a")
        Y_ECO = pipelined_experts(dispatched_RM.view(E, C, -1), schedule, *args)
        self.phase_clock.tick("experts")
        self._rows_computed = shards.num_local_experts * shards.world * C
        return Y_ECO.reshape(E * C, -1)
