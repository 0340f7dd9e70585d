"""Registry of MoE systems. Each entry is imported lazily so a missing peer
package makes that one system unavailable, never the harness.

Three sources, in this order: the built-ins (REGISTRY), systems registered from
plugin references (``--system-plugin``), and installed entry points of group
``moebench.systems`` (systems/plugins.py). A plugin or entry point can never
replace a built-in."""
from __future__ import annotations

import importlib
import warnings

from systems import plugins
from systems.base import Availability, MoESystem

# name -> "module:Class"
REGISTRY: dict[str, str] = {
    "torch_reference": "systems.torch_reference:TorchReference",
    "tutel_native": "systems.tutel_native.adapter:TutelNative",
    "deepspeed_moe": "systems.deepspeed_moe:DeepSpeedMoE",
    "megatron_core": "systems.megatron_core:MegatronCore",
    "tutel": "systems.tutel:Tutel",
    "fsmoe_native": "systems.fsmoe_native.adapter:FSMoENative",
    "hf_transformers": "systems.hf_transformers:HFTransformers",
    "torchtitan": "systems.torchtitan_moe:TorchTitan",
    "liger_kernel": "systems.gpu_only:LigerKernel",
    "megatron_grouped_gemm": "systems.gpu_only:MegatronGroupedGemm",
}


def system_names() -> list[str]:
    """Built-ins, then registered plugins, then entry points (read from the installed metadata once)."""
    names = list(REGISTRY)
    for name in (*plugins.plugin_names(), *plugins.entry_point_names()):
        if name not in names:
            names.append(name)
    return names


def load_system_class(name: str) -> type[MoESystem]:
    if name in REGISTRY:
        module_name, class_name = REGISTRY[name].split(":")
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    cls = plugins.plugin_class(name)
    if cls is not None:
        return cls
    if name in plugins.entry_point_systems():
        return plugins.load_entry_point_class(name)  # ImportError with the reason when it is broken
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(system_names())}")


def get_system(name: str) -> MoESystem:
    return load_system_class(name)()


def availability(name: str) -> Availability:
    """Whether a system can run here; import failures become a reason, not a crash."""
    # Peer packages warn at import about optional accelerators they do not find;
    # that is expected on CPU and would bury the harness's own output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls = load_system_class(name)
        except ImportError as exc:
            return Availability.no(f"cannot import adapter: {exc}")
        if name in REGISTRY:
            return cls.availability()
        try:  # someone else's code: whatever it raises is a reason, never a crash of the harness
            return cls.availability()
        except Exception as exc:  # noqa: BLE001
            return Availability.no(f"availability check failed: {type(exc).__name__}: {exc}")
