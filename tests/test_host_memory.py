"""The host allocator policy of trial processes, and the model-level optimizer.

The policy is process-global, so its effect is measured in fresh interpreters.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.host_memory import keep_freed_memory
from harness.trial import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from harness.host_memory import keep_freed_memory
if {reuse}:
    assert keep_freed_memory()
def step():  # like a training step: two 64 MiB tensors written, then both freed
    a, b = torch.empty(16 << 20).fill_(1.0), torch.empty(16 << 20).fill_(2.0)
    return float(a[0] + b[0])
for _ in range(10):  # the heap reaches its steady layout (glibc needs a few steps to coalesce the holes)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(reuse: bool) -> int:
    script = FAULTS_SCRIPT.format(root=str(ROOT), reuse=reuse)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
def test_reuse_policy_stops_large_blocks_faulting_in_every_step():
    """glibc mmaps each 64 MiB block afresh: 16k page faults per block, 160k for 5 steps of two;
    with the policy the freed blocks stay in the heap and, once the heap has settled, are written
    again without faulting."""
    default, reuse = minor_faults(False), minor_faults(True)
    assert default > 10 * 16384 * 0.9, default
    assert reuse < default / 20, (reuse, default)


def test_keep_freed_memory_reports_success_here():
    assert keep_freed_memory() == sys.platform.startswith("linux")


def test_model_optimizer_is_fused_adamw_where_available():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = make_optimizer(params)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    before = [p.detach().clone() for p in params]
    sum(p.sum() for p in params).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
