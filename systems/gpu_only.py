"""Systems that need CUDA: adapters that say "needs CUDA" here and run on a GPU machine.

They are exercised by benchmarks/gpu_check.sh when a GPU is lent; on this CPU machine their
availability names what is missing, so a run lists them as skipped with the reason.

* liger_kernel: Liger-Kernel 0.8.5's ``LigerExperts``, its Triton fused-MoE drop-in for the
  transformers experts (``gate_up_proj [E, 2H, M]``, ``down_proj [E, M, H]``, the same layout).
  The block around it, its router and the weight mapping are hf_transformers' (systems/hf_transformers.py),
  so the two differ only in the expert kernels.
* megatron_grouped_gemm: Megatron-Core's grouped-GEMM experts (``moe_grouped_gemm=True``):
  ``TEGroupedMLP`` where TransformerEngine is installed, else the legacy ``GroupedMLP`` on the
  ``grouped_gemm`` package. Router, dispatchers and capacity rules are megatron_core's
  (systems/megatron_core.py); only the expert module differs.
"""
from __future__ import annotations

import importlib.util

import torch

from core.values import LayerShape, MoEKnobs, ParallelSpec
from systems.base import Availability
from systems.hf_transformers import HFTransformers, HFTransformersLayer, block_config
from systems.megatron_core import MegatronCore, MegatronMoELayer, transformer_engine_present

NEEDS_CUDA = "needs CUDA: no CUDA device here"


def _cuda_or_why(package: str, module: str) -> Availability:
    if not torch.cuda.is_available():
        return Availability.no(f"{NEEDS_CUDA} ({package}'s kernels are Triton/CUDA only)")
    if importlib.util.find_spec(module) is None:
        return Availability.no(f"{package} is not installed (requirements/gpu.txt)")
    return Availability.yes()


class LigerExpertsLayer(HFTransformersLayer):
    def build_block(self) -> torch.nn.Module:
        from liger_kernel.transformers.swiglu import LigerExperts

        block = super().build_block()
        block.experts = LigerExperts(block_config(self.shape, self.block_kind, self.experts_kind))
        return block


class LigerKernel(HFTransformers):
    name = "liger_kernel"
    description = "Liger-Kernel's fused Triton experts (LigerExperts) inside transformers' MoE block; GPU only"
    options = {"block": HFTransformers.options["block"]}

    @classmethod
    def availability(cls) -> Availability:
        base = HFTransformers.availability()
        return base if not base.ok else _cuda_or_why("liger-kernel", "liger_kernel")

    def check_support(self, shape: LayerShape, knobs: MoEKnobs, parallel: ParallelSpec) -> Availability:
        common = super().check_support(shape, knobs, parallel)
        if not common.ok:
            return common
        if knobs.dtype == "float64":
            return Availability.no("Liger's fused experts have no float64 kernel")
        return Availability.yes()

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return LigerExpertsLayer(shape, knobs)


class MegatronGroupedGemm(MegatronCore):
    name = "megatron_grouped_gemm"
    description = "Megatron-Core MoELayer with grouped-GEMM experts (TEGroupedMLP or GroupedMLP); GPU only"
    options = {"dispatcher": MegatronCore.options["dispatcher"]}

    @classmethod
    def availability(cls) -> Availability:
        base = MegatronCore.availability()
        if not base.ok:
            return base
        if not torch.cuda.is_available():
            return Availability.no(f"{NEEDS_CUDA} (grouped_gemm and TransformerEngine's grouped GEMMs are CUDA only)")
        if not transformer_engine_present() and importlib.util.find_spec("grouped_gemm") is None:
            return Availability.no("neither TransformerEngine nor the grouped_gemm package is installed")
        return Availability.yes()

    def build_layer(self, shape, knobs, parallel, layer_index=0):
        return MegatronMoELayer(shape, knobs, parallel, grouped_gemm=True)
