"""Registry of MoE systems. Each entry is imported lazily so a missing peer
package makes that one system unavailable, never the harness."""
from __future__ import annotations

import importlib
import warnings

from systems.base import Availability, MoESystem

# name -> "module:Class"
REGISTRY: dict[str, str] = {
    "torch_reference": "systems.torch_reference:TorchReference",
    "tutel_native": "systems.tutel_native.adapter:TutelNative",
    "deepspeed_moe": "systems.deepspeed_moe:DeepSpeedMoE",
    "megatron_core": "systems.megatron_core:MegatronCore",
    "tutel": "systems.tutel:Tutel",
}


def system_names() -> list[str]:
    return list(REGISTRY)


def load_system_class(name: str) -> type[MoESystem]:
    if name not in REGISTRY:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


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
        return cls.availability()
