"""The Tutel-style MoE layer: gate -> route -> encode -> experts -> decode.

Keyword API and behaviour: docs/tutel-semantics.md (the contract).
One process is complete here; world size > 1 (expert-parallel all-to-all,
sharded experts, adaptive r, overlap d, 2D hierarchical all-to-all) goes
through :meth:`MoELayer._expert_step` into ``systems/tutel_native/parallel.py``.

Legend: S tokens, M model dim, O output dim, E global experts, K top-k,
C capacity, R dispatched rows (N live rows when compact, E*C when padded).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from systems.tutel_native import kernel_choice
from systems.tutel_native.dispatch import decode, encode
from systems.tutel_native.experts import EXPERT_KEYS, build_experts, resolve_kernel
from systems.tutel_native.gates import GateConfig, build_gate, gate_logits
from systems.tutel_native.routing import (
    RoutePlan,
    build_plan,
    grouped_splits,
    gshard_loss,
    importance_load_loss,
    top_k_gates,
)

PHASES = ("gate", "encode", "a2a", "experts", "decode")
LAYOUTS = ("auto", "live", "grouped", "max_fill", "capacity")
# One extra batched GEMM call costs about 0.25 ms at 2 threads on this CPU (~180 GFLOP/s fp32),
# i.e. the FLOPs of this many multiply-adds x 2 (measured, reports/tutel_native_efficiency.md).
CALL_COST_FLOPS = 45e6


@dataclass
class StepStats:
    """What the last forward did (this rank's tokens)."""

    top_k: int
    capacity: int
    dispatch_count: list[int]  # choices routed to each global expert, before dropping
    dropped: int
    live_rows: int  # kept choices
    rows_computed: int  # rows the expert GEMMs actually ran on
    flops_executed: int | None  # forward expert FLOPs actually executed
    flops_useful: int | None  # forward expert FLOPs on kept choices only


class _PhaseClock:
    """Wall time per phase, only when enabled (synchronising costs time)."""

    def __init__(self):
        self.enabled = False
        self.times: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self.times = dict.fromkeys(PHASES, 0.0)
            self._last = self._now()

    def tick(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[phase] = self.times.get(phase, 0.0) + now - self._last
            self._last = now

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()


def parse_parallel_type(parallel_type: str, sharded_count: int) -> int:
    """'adaptive:r' | 'data' (r = 1) | 'model' (r = sc) -> the initial r."""
    if parallel_type == "data":
        return 1
    if parallel_type == "model":
        return sharded_count
    if isinstance(parallel_type, str) and parallel_type.startswith("adaptive:"):
        try:
            return int(parallel_type.split(":", 1)[1])
        except ValueError:
            pass
    raise ValueError(f"parallel_type must be 'data', 'model' or 'adaptive:<r>', got {parallel_type!r}")


def check_adaptive_r(r: int, sharded_count: int) -> int:
    if not isinstance(r, int) or r < 0 or r > sharded_count or (r > 0 and sharded_count % r):
        raise ValueError(f"adaptive_r must be 0 or a divisor of sharded_count {sharded_count}, got {r!r}")
    return r


class MoELayer(nn.Module):
    """Tutel's ``moe_layer`` keyword API (section 1); see the module docstring."""

    def __init__(
        self,
        gate_type,
        model_dim: int,
        experts: dict | None = None,
        *,
        scan_expert_func=None,
        result_func=None,
        group=None,
        seeds=None,
        a2a_ffn_overlap_degree: int = 1,
        is_postscore: bool = True,
        batch_prioritized_routing: bool = False,
        normalize_gate: bool = True,
        is_gshard_loss: bool = True,
        parallel_type: str = "adaptive:1",
        use_2dh: bool = False,
        local_size: int | None = None,
        **unknown,
    ):
        if unknown:
            raise TypeError(f"moe_layer got unknown keyword argument(s): {', '.join(sorted(unknown))}")
        super().__init__()
        if experts is None or not isinstance(experts, dict):
            raise ValueError("experts must be a dict such as {'type': 'ffn', 'hidden_size_per_expert': H}")
        unknown_expert = set(experts) - EXPERT_KEYS if experts.get("type") != "custom" else set()
        if unknown_expert:
            raise TypeError(f"unknown experts key(s) {sorted(unknown_expert)}")
        if not isinstance(model_dim, int) or model_dim <= 0:
            raise ValueError(f"model_dim must be a positive integer, got {model_dim!r}")
        self.group = group
        self.world_size, self.rank = _group_size_and_rank(group)
        self.model_dim = model_dim
        self.num_local_experts, self.num_global_experts, self.sharded_count = _expert_counts(
            experts.get("num_experts_per_device", 1), self.world_size
        )
        self.adaptive_r = check_adaptive_r(parse_parallel_type(parallel_type, self.sharded_count), self.sharded_count)
        if not isinstance(a2a_ffn_overlap_degree, int) or a2a_ffn_overlap_degree < 1:
            raise ValueError(f"a2a_ffn_overlap_degree must be a positive integer, got {a2a_ffn_overlap_degree!r}")
        self.a2a_ffn_overlap_degree = a2a_ffn_overlap_degree
        self.is_postscore = bool(is_postscore)
        self.batch_prioritized_routing = bool(batch_prioritized_routing)
        self.normalize_gate = bool(normalize_gate)
        self.is_gshard_loss = bool(is_gshard_loss)
        self.use_2dh = bool(use_2dh)
        self.local_size = local_size
        self.result_func = result_func
        # Expert GEMM kernel (expert_ops.KERNELS): "onednn" (expert by expert, oneDNN matmul; CPU
        # fp32), "mm" (torch mm/bmm on row ranges of one buffer), "grouped" (torch._grouped_mm over
        # live rows) or "auto" (with layout "auto" at world size 1: the cost model, kernel_choice.py).
        self.expert_kernel = "auto"
        self._kernel = "mm"  # expert_kernel resolved for the current step's input
        # World size 1 buffer layout: "live" rows only (no padding), "grouped" (consecutive groups
        # of experts padded to their largest fill, one bmm per group and GEMM; the group size from
        # a cost model, see _splits_for), "max_fill" (E x largest fill, one bmm per GEMM),
        # "capacity" (E x C, Tutel's) or "auto": with kernel "auto" too, the cost model's choice
        # per step; with a fixed kernel, live with the onednn kernel or one intra-op thread, else
        # grouped (a batched call splits experts across threads and synchronises once). Above one rank the all-to-all
        # always carries Tutel's [E, C, M] buffers; the experts skip their padding rows unless
        # the layout is "capacity" (parallel.LiveRows).
        self.expert_layout = "auto"
        # With both "auto" at world size 1: the measured cost model (kernel_choice.py) and how many
        # steps ran each "kernel/layout" it chose.
        self.kernel_cost_model: kernel_choice.KernelCostModel | None = None
        self.kernel_choices: dict[str, int] = {}
        self._cost_model_key: tuple | None = None

        gate_seed, expert_seed, after_seed = (list(seeds or ()) + [None] * 3)[:3]
        configs = [GateConfig.parse(g) for g in (gate_type if isinstance(gate_type, list | tuple) else [gate_type])]
        if not configs:
            raise ValueError("gate_type must name at least one gate")
        if not self.is_gshard_loss and any(c.gate_noise <= 0 for c in configs):
            raise ValueError("is_gshard_loss=False (importance + load loss) needs gate_noise > 0 on every gate")
        if gate_seed is not None:
            torch.manual_seed(gate_seed)
        self.gates = nn.ModuleList(build_gate(c, model_dim, self.num_global_experts) for c in configs)
        if expert_seed is not None:
            torch.manual_seed(expert_seed + self.rank)
        self.experts = build_experts(experts, model_dim, self.num_local_experts, self.sharded_count)
        for name, param in self.experts.named_parameters():
            param.skip_allreduce = True
            if scan_expert_func is not None:
                scan_expert_func(name, param)
        if after_seed is not None:
            torch.manual_seed(after_seed)
        self.register_buffer("_num_global_experts", torch.tensor(self.num_global_experts, dtype=torch.int64))

        self.l_aux: torch.Tensor | None = None
        self.dispatch_count: torch.Tensor | None = None
        self._last_step: tuple[RoutePlan, int] | None = None  # (plan, rows computed) of the last forward
        self.phase_clock = _PhaseClock()

    # ---- checkpoint -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_num_global_experts"
        if key in state_dict and int(state_dict[key]) != self.num_global_experts:
            error_msgs.append(
                f"_num_global_experts mismatch: checkpoint has {int(state_dict[key])} experts, "
                f"this layer has {self.num_global_experts}"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        gate_index: int = 0,
        capacity_factor: float | None = None,
        top_k: int | None = None,
        a2a_ffn_overlap_degree: int | None = None,
        reserve_dims: int = 1,
        inequivalent_tokens: bool = False,
        adaptive_r: int | None = None,
    ):
        if not 0 <= gate_index < len(self.gates):
            raise ValueError(f"gate_index {gate_index} out of range: this layer has {len(self.gates)} gate(s)")
        if x.dim() < 2 or not 1 <= reserve_dims < x.dim():
            raise ValueError(f"input of shape {tuple(x.shape)} cannot keep reserve_dims={reserve_dims}")
        model_dim = math.prod(x.shape[-reserve_dims:])
        if model_dim != self.model_dim:
            raise ValueError(
                f"input's last {reserve_dims} dim(s) hold {model_dim} values, model_dim is {self.model_dim}"
            )
        gate = self.gates[gate_index]
        E = self.num_global_experts
        k = min(top_k if top_k is not None else gate.cfg.k, E)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        cf = float(capacity_factor if capacity_factor is not None else gate.cfg.capacity_factor)
        d = a2a_ffn_overlap_degree if a2a_ffn_overlap_degree is not None else self.a2a_ffn_overlap_degree
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"a2a_ffn_overlap_degree must be a positive integer, got {d!r}")
        r = check_adaptive_r(adaptive_r if adaptive_r is not None else self.adaptive_r, self.sharded_count)

        clock = self.phase_clock
        clock.start()
        x_SM = x.reshape(-1, self.model_dim)
        self._kernel = resolve_kernel(self.expert_kernel, x_SM)
        S = x_SM.shape[0]
        noisy_SE, clean_SE = gate_logits(gate, x_SM, E, self.training)
        probs_SE = torch.softmax(noisy_SE, dim=1)
        idx_SK, gates_SK = top_k_gates(probs_SE, k, self.normalize_gate)
        if self.is_gshard_loss:
            l_aux = gshard_loss(probs_SE, idx_SK[:, 0])
        else:
            l_aux = importance_load_loss(clean_SE, noisy_SE, k, gate.cfg.gate_noise)
        clock.tick("gate")

        plan = build_plan(
            idx_SK,
            gates_SK.to(x.dtype),
            E,
            cf,
            capacity_multiple=self.sharded_count * d,
            num_tokens_for_capacity=self._group_max(S) if inequivalent_tokens else S,
            priority_S=probs_SE.detach().max(dim=1).values if self.batch_prioritized_routing else None,
            group_max=self._group_max,
            padded=self._needs_padded(),
            splits_for=self._splits_for() if self.world_size == 1 else None,
            layout_for=self._cost_model_layout(x_SM, k) if self._uses_cost_model() and self.world_size == 1
            else None,
        )
        plan.overlap_degree, plan.adaptive_r = d, r
        dispatched_RM = encode(x_SM, plan, self.is_postscore)
        clock.tick("encode")
        y_RO = self._expert_step(dispatched_RM, plan)
        y_SO = decode(y_RO, plan, self.is_postscore)
        clock.tick("decode")

        out_dim = y_SO.shape[1]
        out_shape = x.shape if out_dim == self.model_dim else x.shape[:-reserve_dims] + (out_dim,)
        y = y_SO.view(out_shape)
        self._record(plan, l_aux)
        y.l_aux = l_aux
        if self.result_func is not None:
            y = self.result_func(y)
        return y

    def _uses_cost_model(self) -> bool:
        """Kernel and layout both "auto", whole built-in experts per rank: kernel_choice.py decides (at one
        rank the layout of the dispatch buffer, above one rank whether the experts skip its padding)."""
        return (self.expert_kernel == "auto" and self.expert_layout == "auto" and self.sharded_count == 1
                and hasattr(self.experts, "synthetic_weights"))

    def prepare_kernel_choice(self, num_tokens: int, device, dtype, top_k: int | None = None) -> None:
        """Look up (or measure, once per machine) the kernel cost model for steps of ``num_tokens``
        tokens, so that no step pays for it: call before the first step that is checked, counted or
        timed. A no-op when the cost model is not in use; otherwise the first step would do it."""
        if not self._uses_cost_model():
            return
        k = min(top_k if top_k is not None else self.gates[0].cfg.k, self.num_global_experts)
        rows_per_expert = num_tokens * k / self.num_global_experts * self.world_size  # from every rank
        key = (torch.device(device), dtype, kernel_choice.calibration_rows(rows_per_expert), torch.get_num_threads())
        self._cost_model_tokens = (num_tokens, k)
        if key != self._cost_model_key:  # looked up once per setting, not per step
            # Ranks take turns: the first measures (if the machine's cache lacks the model) on a quiet
            # machine, the others read what it wrote. Every rank of the group gets here with the same key.
            for turn in range(self.world_size):
                if turn == self.rank:
                    self.kernel_cost_model = kernel_choice.model_for(self.experts, key[0], dtype, rows_per_expert)
                if self.world_size > 1:
                    dist.barrier(group=self.group)
            self._cost_model_key = key

    def choose_kernel(self, fills: list[int], padded_rows: int | None = None) -> tuple[str, str]:
        """The cost model's (kernel, layout) for one step, counted in kernel_choices."""
        kernel, layout = self.kernel_cost_model.choose(fills, padded_rows)
        name = f"{kernel}/{layout}"
        self.kernel_choices[name] = self.kernel_choices.get(name, 0) + 1
        return kernel, layout

    def _cost_model_layout(self, x_SM: torch.Tensor, top_k: int):
        """build_plan's layout_for: each step, the candidate the measured cost model predicts cheapest
        for its fills."""
        self.prepare_kernel_choice(x_SM.shape[0], x_SM.device, x_SM.dtype, top_k)

        def layout_for(fills: list[int]):
            self._kernel, layout = self.choose_kernel(fills)
            if layout == "max_fill":
                return True, lambda f: grouped_splits(f, len(f))
            return False, None

        return layout_for

    @property
    def compact_dispatch(self) -> bool:
        return self._layout() == "live"

    @compact_dispatch.setter
    def compact_dispatch(self, value: bool) -> None:
        self.expert_layout = "live" if value else "capacity"

    def _layout(self) -> str:
        if self.expert_layout not in LAYOUTS:
            raise ValueError(f"expert_layout must be one of {', '.join(LAYOUTS)}, got {self.expert_layout!r}")
        if self.expert_layout == "auto":
            one_thread = torch.get_num_threads() == 1
            return "live" if self._kernel == "onednn" or one_thread else "grouped"
        return self.expert_layout

    def _splits_for(self):
        """Rows per expert of a padded buffer at world size 1, as a function of the fills
        (None: Tutel's C per expert).

        "grouped" picks, among the divisors g >= 2 of E, the g minimising padded rows plus
        a fixed cost per extra batched call (CALL_COST_FLOPS, in rows of this layer's GEMMs):
        small groups pad less, large groups make fewer calls. Custom experts take E x the
        largest fill (they are called on one [E, rows, M] view)."""
        layout = self._layout()
        if layout == "capacity":
            return None
        if layout == "max_fill" or not hasattr(self.experts, "compute_rows"):
            return lambda fills: grouped_splits(fills, len(fills))
        if layout == "live":
            return None  # a compact buffer: no padding at all
        gemms = 3 if hasattr(self.experts, "W_fc1") else 2
        call_rows = CALL_COST_FLOPS * gemms / (self._flops_per_row() or 1)

        def grouped(fills: list[int]) -> list[int]:
            E = len(fills)
            candidates = [g for g in range(2, E + 1) if E % g == 0] or [E]
            g = min(candidates, key=lambda g: (sum(grouped_splits(fills, g)) + call_rows * E / g, -g))
            return grouped_splits(fills, g)

        return grouped

    def _needs_padded(self) -> bool:
        """The all-to-all and custom experts need a padded buffer; local built-in experts may take live rows."""
        return self.world_size > 1 or self._layout() != "live" or not hasattr(self.experts, "compute_rows")

    # SEAM (world size > 1 is systems/tutel_native/parallel.py's job).
    # Receives: dispatched_RM, this rank's encoded tokens, and the step's RoutePlan.
    #   plan.padded True  -> dispatched_RM is [E * C, M], row e*C + c = slot c of global expert e
    #                        (zero where no token landed); view it as [E, C, M] for the all-to-all.
    #   plan.padded False -> dispatched_RM is [N, M], live rows only, expert-major; expert e owns the
    #                        next plan.fill_E[e] rows (only at world size 1).
    #   plan.capacity (C, already a multiple of sharded_count * overlap degree), plan.overlap_degree (d),
    #   plan.adaptive_r (r), plan.fill_E, plan.dispatch_count_E.
    # Returns: expert outputs in the same row layout, [R, O] (O = output dim), differentiable; the
    #   decode step gathers the live rows from it.
    # Expert weights: self.expert_weights() gives the local parameters in a fixed order
    #   (self.experts.present_weight_names()); self.experts.compute_rows(x_NM, splits, weights=...) runs
    #   experts on row ranges with any (e.g. all-gathered, full-size) weights in that same order.
    # Also set self._rows_computed to the rows the expert GEMMs ran on (stats/FLOPs).
    def _expert_step(self, dispatched_RM: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        if self.world_size > 1 or self.sharded_count > 1:
            try:
                from systems.tutel_native import parallel
            except ImportError as exc:
                raise NotImplementedError(
                    f"world size {self.world_size} needs systems/tutel_native/parallel.py"
                ) from exc
            return parallel.expert_step(self, dispatched_RM, plan)
        self.phase_clock.tick("a2a")
        y_RO = self._run_local_experts(dispatched_RM, plan)
        self.phase_clock.tick("experts")
        return y_RO

    def _run_local_experts(self, dispatched_RM: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        self._rows_computed = dispatched_RM.shape[0]
        if hasattr(self.experts, "compute_rows"):
            return self.experts.compute_rows(dispatched_RM, plan.row_splits, kernel=self._kernel)
        x_ECM = dispatched_RM.view(self.num_local_experts, -1, self.model_dim)
        y_ECO = self.experts(x_ECM, ctx=self)
        return y_ECO.reshape(dispatched_RM.shape[0], -1)

    def expert_weights(self) -> tuple[torch.Tensor, ...]:
        """Local expert parameters in a fixed order (the tensors to all-gather for r)."""
        if hasattr(self.experts, "local_weights"):
            return self.experts.local_weights()
        return tuple(self.experts.parameters())

    # ---- bookkeeping ------------------------------------------------------------------------
    def _group_max(self, value: int) -> int:
        if self.world_size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self._num_global_experts.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def _record(self, plan: RoutePlan, l_aux: torch.Tensor) -> None:
        """Keep what the statistics need; they are built only when asked for (last_stats), outside
        a timed step, so the forward pays no host conversion for bookkeeping."""
        self.l_aux = l_aux
        self.dispatch_count = plan.dispatch_count_E
        self._last_step = (plan, getattr(self, "_rows_computed", plan.rows))

    @property
    def last_stats(self) -> StepStats | None:
        """What the last forward did (None before the first)."""
        if self._last_step is None:
            return None
        plan, rows = self._last_step
        per_row = self._flops_per_row()
        return StepStats(
            top_k=plan.top_k,
            capacity=plan.capacity,
            dispatch_count=plan.dispatch_count_E.tolist(),
            dropped=plan.dropped,
            live_rows=plan.num_live,
            rows_computed=rows,
            flops_executed=None if per_row is None else per_row * rows,
            flops_useful=None if per_row is None else per_row * plan.num_live,
        )

    def _flops_per_row(self) -> int | None:
        """Forward FLOPs one row costs in the built-in experts (x3 for training)."""
        ex = self.experts
        M = self.model_dim
        if hasattr(ex, "W_fc1"):
            return 3 * 2 * M * ex.hidden
        if hasattr(ex, "batched_fc1_w"):
            H = ex.batched_fc1_w.shape[1]
            return 2 * M * H + 2 * H * ex.batched_fc2_w.shape[2]
        return None


def _group_size_and_rank(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    if group is not None:
        raise ValueError("a process group was given but torch.distributed is not initialised")
    return 1, 0


def _expert_counts(per_device: int, world_size: int) -> tuple[int, int, int]:
    """(local experts, global experts E, sharded_count) from num_experts_per_device (section 1)."""
    if not isinstance(per_device, int) or per_device == 0:
        raise ValueError(f"num_experts_per_device must be a non-zero integer, got {per_device!r}")
    if per_device > 0:
        return per_device, per_device * world_size, 1
    share = -per_device
    if world_size % share:
        raise ValueError(f"num_experts_per_device={per_device}: world size {world_size} is not divisible by {share}")
    E = world_size // share
    return 1, E, world_size // E if E < world_size else 1
