"""Just enough to run megatron-core 0.16.1's MoELayer on a machine without CUDA.

Applied by systems/megatron_core.py ONLY when ``torch.cuda.is_available()`` is
False; on a GPU the adapter runs Megatron unpatched. Each patch names the
failure it addresses (docs/peers-on-cpu.md lists them). The numerics
are Megatron's own: no patch touches routing, permutation or the experts.

Not patched but handled in the adapter's config: ``use_cpu_initialization=True``
(building the layer would otherwise call ``torch.cuda.current_device()``).
"""
from __future__ import annotations

import types

import torch

_applied = False


class _CpuCudaNamespace:
    """``torch.cuda`` as seen by one Megatron module: the "current device" is the CPU."""

    def current_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCpuDevice:
    """``torch`` for one Megatron module, with ``torch.cuda.current_device()`` on the CPU."""

    cuda = _CpuCudaNamespace()

    def __getattr__(self, name):
        return getattr(torch, name)


class _NoStream:
    """Stands in for the CUDA stream the all-to-all dispatcher makes (never used on CPU)."""


def apply() -> None:
    """Install the module-level patches (idempotent)."""
    global _applied
    if _applied:
        return
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Failure: tensor-parallel/expert-parallel mappings (all-gather, reduce-scatter,
    # used by EP > 1 all-gather and dropless all-to-all) allocate their output on
    # torch.cuda.current_device(). Give that one module a torch whose current
    # device is the CPU.
    mappings.torch = _TorchWithCpuDevice()
    # Failure: the same for GlobalMemoryBuffer.get_tensor (megatron.core.utils), which the
    # all-gather dispatcher's gather at EP > 1 uses for its output buffer.
    from megatron.core import utils as megatron_utils

    megatron_utils.torch = _TorchWithCpuDevice()

    # Failure: RouterGatingLinearFunction tests `te_general_gemm is not None`, but
    # the name is only defined when TransformerEngine imports (NameError without
    # it). None is the value Megatron's own code expects for "no TE".
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # Failure: MoEAlltoAllTokenDispatcher.__init__ creates a torch.cuda.Stream()
    # for device-to-host copies when its class attribute is None.
    if token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()
    _applied = True


SPLIT_ATTRS = ("input_splits", "output_splits", "output_splits_tp")


def _host_sync_without_streams(self, point, tokens_per_expert=None):
    # What the GPU path does at its device-to-host point, minus the CUDA stream
    # wait/record: the all-to-all split sizes become host (numpy) arrays, which
    # all_to_all_single needs (it rejects tensors). Everything else already lives
    # in host memory on a CPU machine.
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in SPLIT_ATTRS:
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def patch_layer(layer) -> None:
    """Per-instance patches for one built MoELayer."""
    dispatcher = layer.token_dispatcher
    # Failure: the all-to-all dispatcher's dropless path synchronises through
    # torch.cuda.current_stream()/torch.cuda.stream() in _maybe_dtoh_and_synchronize.
    if hasattr(dispatcher, "_maybe_dtoh_and_synchronize"):
        dispatcher._maybe_dtoh_and_synchronize = types.MethodType(_host_sync_without_streams, dispatcher)
