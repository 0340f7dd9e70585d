"""tutel_native: a native, single-file-per-job implementation of Tutel-style adaptive MoE.

``moe_layer`` takes Tutel's keyword API (docs/tutel-semantics.md).
"""
from systems.tutel_native.layer import MoELayer

moe_layer = MoELayer

__all__ = ["MoELayer", "moe_layer"]
