"""Equivalence check of every available system against torch_reference.

Each system runs in a fresh Python process (DeepSpeed and Megatron keep global
process-group state), all its cases in that process, on small shapes and
identical canonical weights; the process prints one JSON line with its
results. ``python -m harness.check --worker`` is that process (it reads its
job as JSON on stdin).

Cases: top-1 GELU and top-2 SwiGLU (plus top-2 GELU with expert biases), each
dropless and capacity-limited (cf 1.0, so some choices are dropped), in fp32
(tolerance 1e-5) and fp64 (1e-10, or fp32's for systems that route in fp32).
Compared: forward output, input gradient, tokens per expert (exactly); see
harness/equivalence.py for how peers' capacity and drop rules are mirrored.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from core.values import LayerShape

MODEL_DIM, FFN_DIM, NUM_EXPERTS, NUM_TOKENS = 32, 48, 4, 64
WORKER_TIMEOUT_S = 600


@dataclass(frozen=True)
class CheckCase:
    name: str
    top_k: int
    activation: str
    capacity_factor: float | None
    dtype: str
    expert_bias: bool = False

    @property
    def shape(self) -> LayerShape:
        return LayerShape(MODEL_DIM, FFN_DIM, NUM_EXPERTS, self.top_k, self.activation, self.expert_bias)


def default_cases() -> list[CheckCase]:
    cases = []
    for k, act in ((1, "gelu"), (2, "swiglu")):
        for cf in (None, 1.0):
            for dtype in ("float32", "float64"):
                routing = "dropless" if cf is None else f"cf{cf:g}"
                cases.append(CheckCase(f"top{k}-{act}-{routing}-{dtype.replace('float', 'fp')}", k, act, cf, dtype))
    cases.append(CheckCase("top2-gelu-bias-cf1-fp32", 2, "gelu", 1.0, "float32", expert_bias=True))
    return cases


@dataclass
class CaseResult:
    system: str
    case: str
    status: str  # "pass" | "FAIL" | "n/a" (unsupported) | "error"
    max_rel_err_y: float | None = None
    max_rel_err_dx: float | None = None
    tolerance: float | None = None
    note: str = ""
    routing: dict = field(default_factory=dict)


def run_cases(system_name: str, cases: list[CheckCase], options: dict | None = None) -> list[CaseResult]:
    """Run `cases` for one system in this process (call it in a fresh process)."""
    import torch

    from core.values import CanonicalWeights, MoEKnobs, ParallelSpec
    from harness.equivalence import check_against_reference
    from systems import get_system

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    system = get_system(system_name)
    parallel = ParallelSpec()
    results, initialised = [], False
    for case in cases:
        knobs = MoEKnobs(capacity_factor=case.capacity_factor, dtype=case.dtype, options=dict(options or {}))
        support = system.check_support(case.shape, knobs, parallel)
        if not support.ok:
            results.append(CaseResult(system_name, case.name, "n/a", note=support.reason))
            continue
        if not initialised:
            system.init_distributed(parallel)
            initialised = True
        weights = CanonicalWeights.random(case.shape, seed=11, dtype=torch.float64)
        gen = torch.Generator().manual_seed(5)
        x_TM = torch.randn(NUM_TOKENS, MODEL_DIM, generator=gen, dtype=torch.float64).to(knobs.torch_dtype)
        layer = system.build_layer(case.shape, knobs, parallel)
        layer.load_canonical(weights)
        check = check_against_reference(layer, case.shape, knobs, parallel, weights, x_TM)
        results.append(CaseResult(system_name, case.name, "pass" if check.passed else "FAIL", check.max_rel_err_y,
                                  check.max_rel_err_dx, check.tolerance, check.note,
                                  layer.routing_stats().to_dict()))
    return results


def _worker_main() -> int:
    job = json.loads(sys.stdin.read())
    cases = [CheckCase(**c) for c in job["cases"]]
    results = run_cases(job["system"], cases, job.get("options"))
    sys.stdout.flush()
    print("\n" + json.dumps([asdict(r) for r in results]))
    return 0


def run_system_in_subprocess(system_name: str, cases: list[CheckCase], options: dict | None = None,
                             timeout_s: float = WORKER_TIMEOUT_S) -> list[CaseResult]:
    """All cases of one system in a fresh process; a crash becomes an "error" row with its last line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(root, ".cache", "torch_extensions"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a lone process picks its own free port
    job = json.dumps({"system": system_name, "cases": [asdict(c) for c in cases], "options": options or {}})
    try:
        proc = subprocess.run([sys.executable, "-m", "harness.check", "--worker"], input=job, capture_output=True,
                              text=True, cwd=root, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [CaseResult(system_name, c.name, "error", note=f"worker timed out after {timeout_s:g} s") for c in cases]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [CaseResult(system_name, c.name, "error", note=f"worker exit {proc.returncode}: {tail}") for c in cases]
    return [CaseResult(**r) for r in json.loads(lines[-1])]


def any_failed(results: list[CaseResult]) -> bool:
    return any(r.status in ("FAIL", "error") for r in results)


def format_table(results: list[CaseResult]) -> str:
    def err(v):
        return "-" if v is None else f"{v:.1e}"

    header = ("system", "case", "result", "rel err y", "rel err dx", "tol", "note")
    rows = [header] + [(r.system, r.case, r.status, err(r.max_rel_err_y), err(r.max_rel_err_dx), err(r.tolerance),
                        r.note) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1])
    return "\n".join(lines)


def write_json_atomic(path: str, payload) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    print("usage: python -m harness.check --worker (job JSON on stdin); use `moebench check`", file=sys.stderr)
    sys.exit(2)
