"""Equivalence check of every available system against torch_reference.

Each system runs in a fresh Python process (DeepSpeed and Megatron keep global
process-group state), all its cases in that process, on small shapes and
identical canonical weights; the process prints one JSON line with its
results. ``python -m harness.check --worker`` is that process (it reads its
job as JSON on stdin).

Cases: top-1 GELU and top-2 SwiGLU, each dropless and capacity-limited (cf 1.0,
so some choices are dropped), in fp32 and fp64, plus top-2 GELU with expert
biases (cf 1.0 fp32, dropless fp64). Compared (harness/equivalence.py): the
forward output, the input gradient, every weight gradient in canonical layout
(gate_EM, w1_EHM, w2_EHM, w3_EHM, b1_EH, b2_EM; the worst is the "grad" column),
l_aux where the system returns the reference's GShard loss, and tokens per
expert (exactly). Tolerance 1e-5 (fp32) and 1e-10 (fp64), or the tolerance of
the lower internal precision a system declares (DeepSpeed's and Megatron's fp32
gates, real Tutel's fp32 dispatch), with the declared reason in the note.
See harness/equivalence.py for how peers' capacity and drop rules are mirrored.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from core.values import LayerShape
from harness import procs

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
    shared_ffn_dim: int = 0  # a dense shared expert of this width (the harness's, unless the system has one)

    @property
    def shape(self) -> LayerShape:
        return LayerShape(MODEL_DIM, FFN_DIM, NUM_EXPERTS, self.top_k, self.activation, self.expert_bias,
                          shared_ffn_dim=self.shared_ffn_dim)


def default_cases() -> list[CheckCase]:
    cases = []
    for k, act in ((1, "gelu"), (2, "swiglu")):
        for cf in (None, 1.0):
            for dtype in ("float32", "float64"):
                routing = "dropless" if cf is None else f"cf{cf:g}"
                cases.append(CheckCase(f"top{k}-{act}-{routing}-{dtype.replace('float', 'fp')}", k, act, cf, dtype))
    cases.append(CheckCase("top2-gelu-bias-cf1-fp32", 2, "gelu", 1.0, "float32", expert_bias=True))
    cases.append(CheckCase("top2-gelu-bias-dropless-fp64", 2, "gelu", None, "float64", expert_bias=True))
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
    rel_err: dict = field(default_factory=dict)  # every compared quantity (harness/equivalence.py)
    max_rel_err_grad: float | None = None  # worst weight-gradient error
    declared_precision: str = ""  # the system's declared lower internal precision, if any


def run_cases(system_name: str, cases: list[CheckCase], options: dict | None = None) -> list[CaseResult]:
    """Run `cases` for one system in this process (call it in a fresh process)."""
    import torch

    from core.values import CanonicalWeights, MoEKnobs, ParallelSpec
    from harness.equivalence import check_against_reference
    from systems import get_system
    from systems.shared_expert import build_moe_layer

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
        layer = build_moe_layer(system, case.shape, knobs, parallel)
        layer.load_canonical(weights)
        layer.prepare(NUM_TOKENS)
        check = check_against_reference(layer, case.shape, knobs, parallel, weights, x_TM)
        results.append(CaseResult(system_name, case.name, "pass" if check.passed else "FAIL", check.max_rel_err_y,
                                  check.max_rel_err_dx, check.tolerance, check.note,
                                  layer.routing_stats().to_dict(), check.rel_err, check.max_rel_err_grad,
                                  check.declared_precision))
    return results


def _worker_main() -> int:
    from systems.plugins import register_plugins

    job = json.loads(sys.stdin.read())
    register_plugins(job.get("plugins"))  # a plugin system is registered again in this fresh process
    cases = [CheckCase(**c) for c in job["cases"]]
    results = run_cases(job["system"], cases, job.get("options"))
    sys.stdout.flush()
    print("\n" + json.dumps([asdict(r) for r in results]))
    return 0


def run_system_in_subprocess(system_name: str, cases: list[CheckCase], options: dict | None = None,
                             timeout_s: float = WORKER_TIMEOUT_S, plugins=None) -> list[CaseResult]:
    """All cases of one system in a fresh process; a crash becomes an "error" row with its last line.

    plugins: the absolute plugin references the worker registers first (default: the ones that
    provide `system_name` in this process, systems.plugins.references_for)."""
    from systems.plugins import references_for

    plugins = references_for(system_name) if plugins is None else tuple(plugins)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(root, ".cache", "torch_extensions"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a lone process picks its own free port
    job = json.dumps({"system": system_name, "cases": [asdict(c) for c in cases], "options": options or {},
                      "plugins": list(plugins)})
    proc = procs.run([sys.executable, "-m", "harness.check", "--worker"], timeout_s, input=job, text=True,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root, env=env)
    if proc.timed_out:  # its whole tree was killed
        return [CaseResult(system_name, c.name, "error", note=f"worker timed out after {timeout_s:g} s") for c in cases]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [CaseResult(system_name, c.name, "error", note=f"worker exit {proc.returncode}: {tail}") for c in cases]
    return [CaseResult(**r) for r in json.loads(lines[-1])]


def any_failed(results: list[CaseResult]) -> bool:
    return any(r.status in ("FAIL", "error") for r in results)


def results_table(results: list[CaseResult]) -> str:
    """The `moebench check` table: errors of y, dx, the worst weight gradient and l_aux against one
    tolerance, then each system's declared lower internal precision, once."""
    from harness.tables import text_table

    def err(v):
        return "-" if v is None else f"{v:.1e}"

    rows = []
    for r in results:
        note = r.note.replace(r.declared_precision, "declared precision (below)") if r.declared_precision else r.note
        rows.append((r.system, r.case, r.status, err(r.max_rel_err_y), err(r.max_rel_err_dx),
                     err(r.max_rel_err_grad), err(r.rel_err.get("l_aux")), err(r.tolerance), note))
    header = ("system", "case", "result", "y", "dx", "grad (worst)", "l_aux", "tol", "note")
    lines = [text_table(header, rows)]
    declared = dict.fromkeys((r.system, r.declared_precision) for r in results if r.declared_precision)
    lines += [f"{system}: {note}" for system, note in declared]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    print("usage: python -m harness.check --worker (job JSON on stdin); use `moebench check`", file=sys.stderr)
    sys.exit(2)
