"""The gate suite's benchmarks under pytest-benchmark: one test per (benchmark, system) item.

    .venv/bin/python -m pytest benchmarks/test_gate_suite.py --benchmark-autosave
    .venv/bin/python -m pytest benchmarks/test_gate_suite.py --benchmark-compare --benchmark-compare-fail=median:10%
    .venv/bin/python -m pytest benchmarks/test_gate_suite.py --moebench-suite my_suite.toml --benchmark-json=out.json

Each test builds its item's layer (or model) in this process exactly as the
gate's worker does (harness/gate_worker.py ``Worker.setup``: plugins, host
memory policy, threads, support check, distributed init, build, work channel),
then times the step with ``benchmark.pedantic``: the benchmark's ``warmup``
untimed steps, then ROUNDS_PER_QUARTET x ``quartets`` timed ones, each on the next
batch of the input pool, with ``Bench.after`` and the routing bookkeeping
outside the timed call. The group is the benchmark's name.

``extra_info`` carries the work channel (tokens per expert, drops, FLOPs as
dispatched, checksums, peak memory), the trial spec, the harness's FLOP count,
the routing averaged over the timed steps and the threads, so
``moebench convert`` builds a real moebench trial from a saved file.

Not part of ``./moebench test``: pytest's testpaths is tests/ (pyproject.toml).
"""
from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import pytest
import torch

DEFAULT_SUITE = Path(__file__).with_name("gate_suite.toml")
ROUNDS_PER_QUARTET = 10  # timed rounds = this x the benchmark's quartets (a gate round times 4 x quartets steps)


def suite_file(config) -> Path:
    value = config.getoption("moebench_suite", default=None)
    return Path(value) if value else DEFAULT_SUITE


@cache
def load(path: str):
    from harness.suite import load_suite

    return load_suite(path)


def item_id(bench_name: str, system: str) -> str:
    return f"{bench_name}/{system}"  # the gate's own item key (harness/gate.py item_key)


def item_params(path) -> list:
    """One pytest.param(benchmark name, system) per item of the suite file at `path`."""
    return [pytest.param(bench.name, system, id=item_id(bench.name, system))
            for bench, system in load(str(Path(path).resolve())).items()]


def pytest_generate_tests(metafunc):
    if {"bench_name", "system"} <= set(metafunc.fixturenames):
        from harness.errors import UsageError

        try:
            params = item_params(suite_file(metafunc.config))
        except UsageError as exc:
            raise pytest.UsageError(f"--moebench-suite: {exc}") from None
        metafunc.parametrize(("bench_name", "system"), params)


def test_gate_suite(benchmark, request, bench_name, system):
    from harness.convert import SPEC_KEY
    from harness.environment import thread_record
    from harness.gate_worker import Worker
    from harness.trial import average_routing
    from systems import availability

    suite = load(str(suite_file(request.config).resolve()))
    bench = next(b for b in suite.benchmarks if b.name == bench_name)
    available = availability(system)
    if not available.ok:
        pytest.skip(f"{system} is not available here: {available.reason}")
    spec = bench.trial_spec(system, suite.system_plugins)
    started = time.perf_counter()
    worker = Worker()
    setup = worker.setup({"op": "setup", "spec": spec.to_dict()})
    layer = worker.bench
    cuda = worker.device.startswith("cuda")
    state = {"calls": 0, "out": None}
    routings: list[dict] = []

    def step():
        state["out"] = layer.step(worker.step_index)
        worker.step_index += 1
        if cuda:
            torch.cuda.synchronize()

    def after():  # outside the timed call: finiteness, routing statistics, gradient reset
        state["calls"] += 1
        if not bool(torch.isfinite(state["out"]).all()):
            raise AssertionError(f"step {worker.step_index - 1} gave a non-finite output")
        if state["calls"] > bench.warmup:
            routings.append(layer.routing())
        layer.after()

    benchmark.group = bench.name
    benchmark.pedantic(step, teardown=after, rounds=ROUNDS_PER_QUARTET * bench.quartets, warmup_rounds=bench.warmup)
    routing = average_routing(routings) if routings else layer.routing()
    benchmark.extra_info.update({
        "suite": suite.name, "benchmark": bench.name, "system": system,
        "warmup": bench.warmup, "quartets": bench.quartets, "rounds_per_quartet": ROUNDS_PER_QUARTET,
        "work": setup["work"], "threads": setup["threads"], "threads_measured": thread_record(),
        "tokens_per_step": layer.tokens,
        "flops": layer.flops(routing), "routing_stats": routing,
        "wall_s": time.perf_counter() - started,
        SPEC_KEY: spec.to_dict(),
    })
