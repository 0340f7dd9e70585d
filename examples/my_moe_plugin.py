"""A user's own MoE layer as a moebench system: ./moebench check --system-plugin examples/my_moe_plugin.py"""
import torch
from torch import nn

from systems.base import MoELayerAdapter, MoEOutput, MoESystem, ReferencePolicy, RoutingStats


class MyMoE(nn.Module):  # the user's layer: softmax gate, top-k (renormalised if k > 1), a loop over experts
    def __init__(self, dim, hidden, experts, k, activation="gelu", bias=False, **factory):
        super().__init__()
        self.k, self.act = k, getattr(nn.functional, "silu" if activation == "swiglu" else activation)
        self.gate = nn.Linear(dim, experts, bias=False, **factory)
        param = lambda *size, on=True: nn.Parameter(torch.zeros(*size, **factory)) if on else None  # noqa: E731
        self.w1, self.w2, self.w3 = (param(experts, hidden, dim, on=on) for on in (True, True, activation == "swiglu"))
        self.b1, self.b2 = param(experts, hidden, on=bias), param(experts, dim, on=bias)

    def forward(self, x):
        gates, idx = torch.softmax(self.gate(x), dim=-1).topk(self.k, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True) if self.k > 1 else gates
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            tok, choice = torch.nonzero(idx == e, as_tuple=True)
            h = x[tok] @ self.w1[e].T + (0 if self.b1 is None else self.b1[e])
            h = self.act(h) * (x[tok] @ self.w3[e].T) if self.w3 is not None else self.act(h)
            out = h @ self.w2[e] + (0 if self.b2 is None else self.b2[e])
            y = y.index_add(0, tok, out * gates[tok, choice, None])  # every choice is kept: no capacity
        return y, idx


class MyMoEAdapter(MoELayerAdapter):  # MyMoE behind moebench's interface (systems/base.py)
    def __init__(self, shape, knobs):
        super().__init__()
        self.shape, self.idx = shape, None
        self.moe = MyMoE(shape.model_dim, shape.ffn_dim, shape.num_experts, shape.top_k, shape.activation,
                         shape.expert_bias, dtype=knobs.torch_dtype, device=knobs.device)

    def canonical_parameters(self):  # canonical name (core/values.py) -> the parameter that holds it as is
        m = self.moe  # this gives load_canonical() and canonical_gradients() their default
        return {"gate_EM": m.gate.weight, "w1_EHM": m.w1, "w2_EHM": m.w2, "w3_EHM": m.w3, "b1_EH": m.b1, "b2_EM": m.b2}

    def forward(self, x_TM):
        y_TM, self.idx = self.moe(x_TM)
        return MoEOutput(y_TM, l_aux=None)  # the user's layer has no aux loss

    def routing_stats(self):
        counts = torch.bincount(self.idx.flatten(), minlength=self.shape.num_experts).tolist()
        return RoutingStats(counts, dropped=0, capacity=None, l_aux=None, expert_rows_computed=self.idx.numel())

    def reference_policy(self):  # no capacity rule, so the reference must keep every choice too
        return ReferencePolicy(dropless=True, note="my_moe is dropless: it ignores the capacity factor")


class MyMoESystem(MoESystem):
    name = "my_moe"
    description = "a user's own top-k MoE layer (dropless loop over experts), loaded as a plugin"
    expert_parallel = False  # every rank holds all experts, so it runs at ep 1 only

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return MyMoEAdapter(shape, knobs)
