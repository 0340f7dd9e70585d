"""Test-only plugin: tutel_native plus a known, injected change, for testing and calibrating the gate.

SLOWDOWN adds real extra compute in proportion to the layer's own work, step by
step: after the forward, an elementwise kernel (tanh over a cache-resident
buffer) repeats for SLOWDOWN x the time that forward just took; when the
layer's backward ends, it repeats for SLOWDOWN x the time that backward took
(two identity autograd functions mark where the backward starts and ends).
Measuring live keeps the injected fraction right whatever the machine is doing:
an earlier version sized a fixed repeat count once from a burst of quiet steps,
and on a loaded CI machine the interleaved steps ran slower than that burst, so
a "30%" slowdown came out at 15%. The kernel's work on a private 256 KiB buffer
is invisible to the work channel (no FLOPs in torch.utils.flop_counter, no
routing, no checksums). OUTPUT_CHANGE scales the output by (1 + OUTPUT_CHANGE):
a different result at the same speed.

The gate's tests and benchmarks/gate_calibration.py copy this file into a
scratch git repository and commit it with different constants.
"""
import time

import torch

from systems.base import MoEOutput
from systems.tutel_native.adapter import TutelNative

SLOWDOWN = 0.0
OUTPUT_CHANGE = 0.0
BURN_ELEMENTS = 1 << 16  # 256 KiB of fp32: stays in cache, so the work is compute, not memory traffic


class Burner:
    def __init__(self, fraction: float):
        self.fraction = fraction
        self.buffer = torch.rand(BURN_ELEMENTS)
        self.out = torch.empty_like(self.buffer)
        self.backward_began = 0.0

    def burn_for(self, seconds: float) -> None:
        """Real compute, not sleep: tanh kernels until `seconds` have passed."""
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            torch.tanh(self.buffer, out=self.out)

    def backward_begins(self) -> None:
        self.backward_began = time.perf_counter()

    def backward_ends(self) -> None:
        self.burn_for(self.fraction * (time.perf_counter() - self.backward_began))


class _OnBackward(torch.autograd.Function):
    """Identity on x whose backward first calls `hook`. `anchor` (a leaf that requires grad) makes the
    backward run even where x itself needs no gradient."""

    @staticmethod
    def forward(ctx, x, anchor, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook()
        return grad, None, None


class SlowedTutelNative(TutelNative):
    name = "slowed_tutel"
    description = "test only: tutel_native with an injected slowdown or output change"

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        layer = super().build_layer(shape, knobs, parallel, layer_index)
        plain_forward = layer.forward
        burner = Burner(SLOWDOWN)
        anchor = torch.zeros((), requires_grad=True)

        def forward(x_TM):
            if not SLOWDOWN:
                out = plain_forward(x_TM)
            else:
                began = time.perf_counter()
                out = plain_forward(_OnBackward.apply(x_TM, anchor, burner.backward_ends))
                burner.burn_for(SLOWDOWN * (time.perf_counter() - began))
                out = MoEOutput(_OnBackward.apply(out.y_TM, anchor, burner.backward_begins), out.l_aux)
            if OUTPUT_CHANGE:
                out = MoEOutput(out.y_TM * (1 + OUTPUT_CHANGE), out.l_aux)
            return out

        layer.forward = forward  # nn.Module.__call__ looks forward up on the instance first
        return layer
