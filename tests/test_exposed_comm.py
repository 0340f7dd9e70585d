"""harness/exposed_comm.py: time a step's thread spends blocked in collectives, on 2 gloo ranks."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from harness.exposed_comm import exposed_communication
from tests.test_tutel_native_distributed import spawn


def test_no_process_group_no_communication():
    with exposed_communication() as comm:
        torch.ones(3).sum()
    assert comm.seconds == 0.0 and comm.calls == 0


def _blocking_and_overlapped(rank, world):
    x = torch.ones(1 << 16)
    originals = (dist.distributed_c10d.Work.wait,)
    with exposed_communication() as sync:
        if rank == 1:
            time.sleep(0.2)  # rank 0 waits for rank 1 inside the collective: exposed
        dist.all_reduce(x)
    assert torch.equal(x, torch.full_like(x, world))
    if rank == 0:
        assert 0.15 < sync.seconds < 5 and sync.calls >= 1
    with exposed_communication() as overlapped:
        start = time.perf_counter()
        work = dist.all_reduce(x, async_op=True)  # returns at once ...
        time.sleep(0.05)  # ... this "compute" overlaps it ...
        work.wait()  # ... and only what is left is waited for
        elapsed = time.perf_counter() - start
    assert 0 <= overlapped.seconds <= elapsed - 0.04
    assert dist.distributed_c10d.Work.wait is originals[0]  # hooks removed on exit
    dist.barrier()


@pytest.mark.slow
def test_blocked_time_is_counted_and_overlap_is_not():
    spawn(_blocking_and_overlapped, 2)
