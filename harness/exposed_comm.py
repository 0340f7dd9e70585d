"""Exposed communication: the time a step's thread spends blocked in collectives, for any system.

Communication that overlaps compute costs a step nothing; what it costs is the time the
training thread cannot compute because it waits for a collective. On the CPU (gloo) every
collective is either synchronous (the call blocks until the exchange is done) or
asynchronous (the call returns at once and ``Work.wait()`` blocks until it is done). So the
exposed communication of a step is measured directly, for every system alike, as the wall
time this thread spends inside the process-group calls and the waits on their work:

    exposed = sum over collective calls and Work.wait() calls on this thread of their duration

The hooks sit on the process-group and work classes of torch.distributed (every
``torch.distributed`` collective, whatever module-level name a system calls it by, ends in a
method of the group's backend and a wait on its work), are installed only for the steps
being measured, and count nested calls once. What this does not see: communication a
system does outside torch.distributed, and on a GPU, kernels that wait on the device
(there a trace or CUDA events are needed; see the module's use in harness/trial.py).

It is never more than the step's time (it is part of it) and never negative.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch.distributed as dist

# Methods of torch's ProcessGroup that issue a collective (each returns a Work).
COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "_allgather_base",
               "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base",
               "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base", "broadcast", "reduce",
               "gather", "scatter", "send", "recv", "barrier")


class _Clock:
    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.thread = threading.get_ident()
        self.depth = 0

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            if threading.get_ident() != self.thread or self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                self.depth -= 1

        return wrapper


def _classes():
    c10d = dist.distributed_c10d
    classes = [c10d.ProcessGroup]
    for name in ("ProcessGroupGloo", "ProcessGroupNCCL"):
        cls = getattr(c10d, name, None)
        if cls is not None:
            classes.append(cls)
    return classes, c10d.Work


@contextlib.contextmanager
def exposed_communication():
    """Within the block, time this thread spends in collectives and waits (``.seconds``, ``.calls``)."""
    clock = _Clock()
    if not (dist.is_available() and dist.is_initialized()):
        yield clock
        return
    groups, work = _classes()
    saved = []
    for cls in groups:
        for name in COLLECTIVES:
            if name in vars(cls):
                saved.append((cls, name, vars(cls)[name]))
    saved.append((work, "wait", vars(work)["wait"]))
    for cls, name, original in saved:
        setattr(cls, name, clock.timed(original))
    try:
        yield clock
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)
