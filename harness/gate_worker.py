"""The gate's measuring process: ``python -m harness.gate_worker``, one per side and block.

It answers one JSON request per stdin line with one JSON line on the file
descriptor stdout had at start; everything a library prints goes to stderr,
so the protocol cannot be corrupted. Staying alive between measurements is
what makes fine-grained ABBA interleaving affordable (a fresh process costs
seconds, a measurement well under one); the gate still gets process-level
independence from its second block of fresh workers.

Requests:
  {"op": "ping"}  answered when the process is ready (its imports are done)
  {"op": "setup", "spec": TrialSpec dict}  build the layer or model, record the
      work channel (harness/work_channel.py), run spec.warmup untimed steps;
      answers {"ok", "work", "threads"}
  {"op": "measure", "what": "system" | "gemm", "warmup": n, "steps": n}
      untimed warm-up steps, then timed ones; answers {"ok", "samples_s"}
  {"op": "quit"}
A failure answers {"ok": false, "error": one line} and the worker stays usable
for "quit".

"gemm" is the stored-baseline normaliser: a GEMM of the benchmark's own size
(tokens x model dim times model dim x expert hidden), timed in the same process
right next to the system, so a faster or slower machine moves both.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch


class Worker:
    def __init__(self):
        self.bench = None
        self.step_index = 0
        self.device = "cpu"
        self.gemm = None

    def setup(self, request: dict) -> dict:
        from harness.host_memory import keep_freed_memory
        from harness.trial import build_layer_bench, build_model_bench, default_threads
        from harness.trial_spec import TrialSpec
        from harness.work_channel import record_work
        from systems import get_system
        from systems.plugins import register_plugins

        spec = TrialSpec.from_dict(request["spec"])
        spec.validate()
        register_plugins(list(spec.plugins))
        if spec.malloc == "reuse":
            keep_freed_memory()
        torch.set_num_threads(default_threads(spec))
        self.device = spec.knobs.device
        system = get_system(spec.system)
        support = system.check_support(spec.workload.layer, spec.knobs, spec.parallel)
        if not support.ok:
            raise ValueError(f"{spec.system} cannot run this benchmark: {support.reason}")
        system.init_distributed(spec.parallel)
        build = build_layer_bench if spec.level == "layer" else build_model_bench
        self.bench, _ = build(spec, system, self.device)
        work = record_work(self.bench, spec.mode, spec.knobs.dtype, self.device)
        self.step_index = 2
        for _ in range(spec.warmup):
            self.bench.step(self.step_index)
            self.bench.after()
            self.step_index += 1
        shape, dtype = spec.workload.layer, spec.knobs.torch_dtype
        gen = torch.Generator().manual_seed(spec.knobs.seed)
        a = torch.randn(spec.workload.tokens_per_step, shape.model_dim, generator=gen).to(dtype).to(self.device)
        b = torch.randn(shape.model_dim, shape.ffn_dim, generator=gen).to(dtype).to(self.device)
        self.gemm = lambda: a @ b
        return {"ok": True, "work": work, "threads": torch.get_num_threads(), "pid": os.getpid()}

    def ping(self, request: dict) -> dict:
        """Answered once torch is imported: the gate waits for every worker before any set-up."""
        return {"ok": True, "pid": os.getpid()}

    def measure(self, request: dict) -> dict:
        from harness.timing import StepTimer

        if self.bench is None:
            raise ValueError("measure before setup")
        timer = StepTimer(self.device)
        if request["what"] == "gemm":
            call = self.gemm
        else:
            def call():
                out = self.bench.step(self.step_index)
                self.step_index += 1
                return out

        after = self.bench.after if request["what"] == "system" else (lambda: None)
        for _ in range(int(request.get("warmup", 0))):
            call()
            after()
        samples = []
        for _ in range(int(request["steps"])):
            _, seconds = timer.time(call)
            after()
            samples.append(seconds)
        return {"ok": True, "samples_s": samples, "median_s": statistics.median(samples)}


def main() -> int:
    from harness.trial import describe_exception

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a peer package prints lands on stderr, not in the protocol
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            answer = getattr(worker, request["op"])(request)
        except Exception as exc:  # noqa: BLE001 - any failure of the measured system is an answer, not a crash
            answer = {"ok": False, "error": describe_exception(exc)}
        reply.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
