"""Test-only plugin systems that fail on purpose, one way each, for tests/test_failing_trials.py.

Each is torch_reference (expert parallel, so it runs at any ep) with a forward that goes wrong:
it raises, returns NaN, asks for more memory than the machine has, hangs on rank 1, or is killed
by SIGKILL as the kernel's OOM killer would kill it. Load one with
``--system-plugin tests/plugins/faulty_systems.py:ClassName``.
"""
import os
import signal
import time

import torch

from systems.base import MoEOutput
from systems.torch_reference import TorchReference

TOO_MANY_BYTES = 2**50  # 1 PiB: the allocator refuses it at once, nothing is touched


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _Faulty(TorchReference):
    """torch_reference whose layers call fault(out) after every forward."""

    description = "test only: torch_reference that fails on purpose"

    def fault(self, out: MoEOutput) -> MoEOutput:
        raise NotImplementedError

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        layer = super().build_layer(shape, knobs, parallel, layer_index)
        plain_forward = layer.forward

        def forward(x_TM):
            return self.fault(plain_forward(x_TM))

        layer.forward = forward  # nn.Module.__call__ looks forward up on the instance first
        return layer


class RaisingSystem(_Faulty):
    name = "faulty_raise"

    def fault(self, out):
        raise RuntimeError(f"forward failed on purpose on rank {_rank()} (faulty_raise test plugin)")


class NaNSystem(_Faulty):
    name = "faulty_nan"

    def fault(self, out):
        return MoEOutput(out.y_TM * float("nan"), out.l_aux)


class OOMSystem(_Faulty):
    name = "faulty_oom"

    def fault(self, out):
        torch.empty(TOO_MANY_BYTES, dtype=torch.uint8)
        return out


class HangOnRank1System(_Faulty):
    name = "faulty_hang"

    def fault(self, out):
        while _rank() == 1:  # rank 0 then waits for it in the next collective
            time.sleep(1)
        return out


class SigkillSystem(_Faulty):
    name = "faulty_sigkill"

    def fault(self, out):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does: no exception, no result
        return out
