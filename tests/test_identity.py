"""Trial identity: every field that changes the measured work changes the id; nothing else does."""
from __future__ import annotations

import copy

import pytest

from harness.identity import identity_differences, system_label, trial_id, work_key


def record(**changes) -> dict:
    trial = {
        "system": "tutel_native", "workload": "mixtral-8x7b", "flavor": "proxy", "level": "layer",
        "mode": "forward_backward", "routing": "learned", "dtype": "float32", "seed": 0,
        "workload_spec": {"name": "mixtral-8x7b", "flavor": "proxy", "batch_size": 2, "seq_len": 512,
                          "layer": {"model_dim": 512, "ffn_dim": 1792, "num_experts": 8, "top_k": 2}},
        "knobs": {"capacity_factor": 1.25, "dtype": "float32", "device": "cpu", "seed": 0, "options": {}},
        "parallel": {"world_size": 1, "ep": 1, "tp": 1, "nnodes": 1, "threads_per_rank": None},
        "setup": {"warmup": 2, "steps": 5, "malloc": "reuse", "threads_per_rank": 2, "input_pool": 4},
    }
    for path, value in changes.items():
        node = trial
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return trial


CHANGES = {
    "overridden preset field": {"workload_spec__layer": {"model_dim": 512, "ffn_dim": 1792, "num_experts": 16,
                                                        "top_k": 2}},
    "device": {"knobs__device": "cuda"},
    "dtype": {"dtype": "bfloat16"},
    "seed": {"seed": 1},
    "warm-up": {"setup__warmup": 5},
    "steps": {"setup__steps": 10},
    "allocator policy": {"setup__malloc": "system"},
    "threads per rank": {"setup__threads_per_rank": 1},
    "nodes": {"parallel__nnodes": 2},
    "capacity factor": {"knobs__capacity_factor": None},
    "input pool": {"setup__input_pool": 8},
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_each_field_changes_the_id_and_the_work_key(what):
    base, changed = record(), record(**CHANGES[what])
    assert trial_id(base) != trial_id(changed)
    assert work_key(base) != work_key(changed)
    assert identity_differences([base, changed]), what


def test_overridden_preset_keeps_its_readable_name_but_not_its_id():
    """`--experts 16` on mixtral-8x7b must not collide with the stock preset."""
    stock = record()
    override = record(**CHANGES["overridden preset field"])
    assert trial_id(stock).split("#")[0] == trial_id(override).split("#")[0]
    assert trial_id(stock) != trial_id(override)
    assert identity_differences([stock, override]) == {"workload.layer.num_experts": [8, 16]}


def test_system_options_change_the_id_but_not_the_work():
    plain = record()
    variant = record(knobs__options={"expert_kernel": "mm"})
    assert trial_id(plain) != trial_id(variant)
    assert work_key(plain) == work_key(variant)  # the same work: comparable side by side
    assert system_label(variant) == "tutel_native[expert_kernel=mm]" and system_label(plain) == "tutel_native"


def test_measured_results_do_not_change_the_id():
    a, b = record(), record()
    b["samples_s"], b["status"], b["summary"] = [0.1, 0.2], "ok", {"median": 0.15}
    assert trial_id(a) == trial_id(b)


def test_key_order_does_not_matter():
    a = record()
    b = copy.deepcopy(a)
    b["workload_spec"] = dict(reversed(list(b["workload_spec"].items())))
    assert trial_id(a) == trial_id(b)
