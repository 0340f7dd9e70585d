"""What makes two trials the same experiment: the trial id, the work key, and the system label.

Why a hash of everything: a trial id that only names the workload preset
("mixtral-8x7b/proxy") lets an overridden preset (``--experts 16``) collide
with the stock one, and a report would then silently treat different work as
the same row. The identity therefore covers everything that changes what is
measured: the full workload spec, level, mode, routing, dtype, device, seed,
capacity factor, parallel layout (world size, ep, tp, nodes, threads per
rank), warm-up and timed steps, the host allocator policy, the input pool,
and the system with its options (and, for a plugin system, the plugin
reference it was loaded from: built-in ids never carry one).

* ``trial_id``: a readable prefix plus a stable hash of the whole identity;
  equal ids mean the same experiment (the only case where a newer run may
  supersede an older one).
* ``work_key``: the hash of the identity without the system and its options;
  trials with the same work key ran identical work and may be compared.
"""
from __future__ import annotations

import hashlib
import json

ID_HASH_CHARS = 12


def stable_hash(value, chars: int = ID_HASH_CHARS) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys), first `chars` hex digits."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def system_options(trial: dict) -> dict:
    return dict((trial.get("knobs") or {}).get("options") or {})


def system_label(trial: dict) -> str:
    """The system's name, with its options when set (tutel_native[expert_kernel=mm]): each variant is an entry."""
    options = system_options(trial)
    if not options:
        return trial["system"]
    return f"{trial['system']}[{','.join(f'{k}={options[k]}' for k in sorted(options))}]"


def workload_label(trial: dict, with_flavor: bool = True) -> str:
    """The workload's name as tables show it: "name/flavor", plus the router when it is not the common
    softmax one and who computed the shared expert when there is one: "deepseek-v3/proxy
    [sigmoid+bias/g8:4/x2.5, shared expert: harness]"."""
    notes = []
    if trial.get("router") not in (None, "softmax"):
        notes.append(trial["router"])
    if trial.get("shared_expert"):
        notes.append(f"shared expert: {trial['shared_expert']}")
    label = f"{trial['workload']}/{trial['flavor']}" if with_flavor else trial["workload"]
    return f"{label} [{', '.join(notes)}]" if notes else label


def work_identity(trial: dict) -> dict:
    """Everything about a trial record that changes the measured work, except which system runs it."""
    knobs = trial.get("knobs") or {}
    parallel = trial.get("parallel") or {}
    setup = trial.get("setup") or {}
    return {
        "workload": trial.get("workload_spec") or {"name": trial.get("workload"), "flavor": trial.get("flavor")},
        "level": trial.get("level"), "mode": trial.get("mode"), "routing": trial.get("routing"),
        "dtype": trial.get("dtype") or knobs.get("dtype"), "device": knobs.get("device"),
        "seed": trial.get("seed", knobs.get("seed")), "capacity_factor": knobs.get("capacity_factor"),
        "parallel": {k: parallel.get(k) for k in ("world_size", "ep", "tp", "nnodes")},
        "threads_per_rank": setup.get("threads_per_rank", parallel.get("threads_per_rank")),
        "warmup": setup.get("warmup"), "steps": setup.get("steps"), "malloc": setup.get("malloc"),
        "input_pool": setup.get("input_pool"),
    }


def trial_identity(trial: dict) -> dict:
    """The system part (its name, options and, for a plugin system only, the plugin reference it was
    loaded from: two plugins may share a name) plus the work identity."""
    system = {"system": trial["system"], "options": system_options(trial)}
    if trial.get("plugins"):
        system["plugins"] = list(trial["plugins"])
    return {**system, **work_identity(trial)}


def work_key(trial: dict) -> str:
    return stable_hash(work_identity(trial))


def _format_cf(capacity_factor) -> str:
    return "dropless" if capacity_factor is None else f"cf{capacity_factor:g}"


def trial_id(trial: dict) -> str:
    """"system/workload/flavor/level/mode/routing/dtype/cf/wsN-epE[/options]#hash", e.g.
    tutel_native/mixtral-8x7b/proxy/layer/forward_backward/learned/float32/cf1.25/ws1-ep1#3f2a9c01d4e5."""
    knobs = trial.get("knobs") or {}
    parallel = trial["parallel"]
    parts = [trial["system"], trial["workload"], trial["flavor"], trial["level"], trial["mode"], trial["routing"],
             trial.get("dtype") or knobs.get("dtype", "float32"), _format_cf(knobs.get("capacity_factor")),
             f"ws{parallel['world_size']}-ep{parallel['ep']}"]
    options = system_options(trial)
    if options:
        parts.append(",".join(f"{key}={options[key]}" for key in sorted(options)))
    return "/".join(str(p) for p in parts) + "#" + stable_hash(trial_identity(trial))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def identity_differences(trials: list[dict]) -> dict[str, list]:
    """{field: distinct values} for the work-identity fields on which `trials` differ (dotted names)."""
    return differences([work_identity(t) for t in trials])


def differences(identities: list[dict]) -> dict[str, list]:
    """{dotted field: distinct values} for the fields on which the identity dicts differ."""
    flat = [_flatten(i) for i in identities]
    keys = sorted(set().union(*flat)) if flat else []
    differences = {}
    for key in keys:
        values = []
        for f in flat:
            if f.get(key) not in values:
                values.append(f.get(key))
        if len(values) > 1:
            differences[key] = values
    return differences
