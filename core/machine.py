"""Which machine this is, as far as a measured result depends on it (shared by systems and harness)."""
from __future__ import annotations

import platform


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The "model name" line of /proc/cpuinfo; platform.processor() elsewhere."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
