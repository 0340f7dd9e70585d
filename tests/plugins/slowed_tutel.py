"""Test-only plugin: tutel_native plus a known, injected change, for testing and calibrating the gate.

SLOWDOWN adds real extra compute after every forward: an elementwise kernel
(tanh over a cache-resident buffer) repeated so that it takes that fraction of
the layer's own forward+backward time. The repeat count is sized once, on the
second forward (the first is the gate's work-channel step, which runs under
torch's flop counter): a median of timed forward+backward passes of the plain
layer against a median of timed kernels, in the same thread and conditions as
the timed steps. Elementwise work on a private buffer is invisible to the work
channel (no FLOPs in torch.utils.flop_counter, no routing, no checksums, a
256 KiB buffer). OUTPUT_CHANGE scales the output by (1 + OUTPUT_CHANGE): a
different result at the same speed.

The gate's tests and benchmarks/gate_calibration.py copy this file into a
scratch git repository and commit it with different constants.
"""
import statistics
import time

import torch

from systems.base import MoEOutput
from systems.tutel_native.adapter import TutelNative

SLOWDOWN = 0.0
OUTPUT_CHANGE = 0.0
BURN_ELEMENTS = 1 << 16  # 256 KiB of fp32: stays in cache, so the work is compute, not memory traffic
TIMING_REPEATS = 5


def median_seconds(fn) -> float:
    times = []
    for _ in range(TIMING_REPEATS):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


class Burner:
    def __init__(self, fraction: float):
        self.fraction, self.reps, self.calls = fraction, 0, 0
        self.buffer = torch.rand(BURN_ELEMENTS)
        self.out = torch.empty_like(self.buffer)

    def size(self, layer, forward, x_TM: torch.Tensor) -> None:
        """reps = fraction x (forward+backward time) / (one kernel's time); gradients are put back."""
        saved = {p: p.grad for p in layer.parameters()}
        x = x_TM.detach().clone().requires_grad_(True)
        dy = torch.randn_like(x)
        step_s = median_seconds(lambda: torch.autograd.backward([forward(x).y_TM], [dy]))
        burn_s = median_seconds(lambda: torch.tanh(self.buffer, out=self.out))
        for param, grad in saved.items():
            param.grad = grad
        self.reps = round(self.fraction * step_s / burn_s)

    def after_forward(self, layer, forward, x_TM: torch.Tensor) -> None:
        self.calls += 1
        if self.fraction <= 0 or self.calls == 1:
            return
        if self.calls == 2:
            self.size(layer, forward, x_TM)
        for _ in range(self.reps):
            torch.tanh(self.buffer, out=self.out)


class SlowedTutelNative(TutelNative):
    name = "slowed_tutel"
    description = "test only: tutel_native with an injected slowdown or output change"

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        layer = super().build_layer(shape, knobs, parallel, layer_index)
        plain_forward = layer.forward
        burner = Burner(SLOWDOWN)

        def forward(x_TM):
            out = plain_forward(x_TM)
            burner.after_forward(layer, plain_forward, x_TM)
            if OUTPUT_CHANGE:
                out = MoEOutput(out.y_TM * (1 + OUTPUT_CHANGE), out.l_aux)
            return out

        layer.forward = forward  # nn.Module.__call__ looks forward up on the instance first
        return layer
