"""tutel_native against its own Tutel-algorithm path and the peers, shape by shape.

One `moebench run` per shape (layer level, forward+backward, fp32), each an interleaved run of:
  tutel_native                     its defaults: kernel and layout "auto", i.e. the measured cost
                                   model of systems/tutel_native/kernel_choice.py picks them per step
  tutel_native[capacity, mm]       Tutel's own algorithm: the padded [E, C, M] buffer, one batched
                                   GEMM per projection
  deepspeed_moe, megatron_core     the classic peers
  hf_transformers                  transformers' Mixtral / Qwen3-MoE block (grouped_mm experts); it has no
                                   capacity, so it runs on the dropless shapes only
Each entry is compared to tutel_native's defaults by paired per-round ratios (harness/stats.py):
"x/tutel" = x's time / tutel_native's, so above 1 means tutel_native is faster, with a 95% bootstrap
interval over rounds. A speedup is claimed only where the interval's lower end is above 1.

Shapes: "tiny" (M 32, H 128, E 8, top-2, 64 tokens: the gpt2-xl-moe debug layer), the three classic
proxies at their capacity factor 1.2, and the three fine-grained proxies (qwen3-30b-a3b, olmoe-1b-7b,
deepseek-v3: workloads/presets.py, dropless as the models are) under the common softmax router
(`--router softmax`), so every system runs identical work; deepseek-v3's proxy keeps its shared
expert, which the harness adds identically for every system here.

Run (nothing else on the machine): .venv/bin/python benchmarks/shape_sweep.py [--rounds 5]
Writes reports/shape_sweep.md and .json; the raw results files go to results/shape_sweep/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import stats  # noqa: E402
from harness.files import write_json_atomic, write_text_atomic  # noqa: E402
from harness.identity import system_label  # noqa: E402
from harness.tables import markdown_table  # noqa: E402

SOFTMAX = ["--flavor", "proxy", "--router", "softmax"]
SHAPES = {
    "tiny": ["--workload", "gpt2-xl-moe", "--flavor", "debug"],
    "gpt2-xl-moe": ["--workload", "gpt2-xl-moe", "--flavor", "proxy"],
    "mixtral-8x7b": ["--workload", "mixtral-8x7b", "--flavor", "proxy"],
    "mixtral-8x22b": ["--workload", "mixtral-8x22b", "--flavor", "proxy"],
    "qwen3-30b-a3b": ["--workload", "qwen3-30b-a3b", *SOFTMAX],
    "olmoe-1b-7b": ["--workload", "olmoe-1b-7b", *SOFTMAX],
    "deepseek-v3": ["--workload", "deepseek-v3", *SOFTMAX],
}
DROPLESS = ("qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v3")
PEERS = ("deepspeed_moe", "megatron_core", "hf_transformers")
VARIANTS = ("tutel_native:expert_layout=capacity,expert_kernel=mm",)
BASE = "tutel_native"


def run_shape(name: str, rounds: int, out: Path) -> Path:
    """One interleaved run of every entry on this shape; its results file."""
    before = set(out.glob("*.json"))
    peers = [p for p in PEERS if p != "hf_transformers" or name in DROPLESS]
    argv = [sys.executable, "-m", "harness", "run", *SHAPES[name], "--systems", ",".join((BASE, *peers)),
            *[a for v in VARIANTS for a in ("--variant", v)], "--repeats", str(rounds), "--out", str(out)]
    subprocess.run(argv, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (path,) = set(out.glob("*.json")) - before
    return path


def compare(doc: dict) -> dict:
    """Per entry: median ms, and its time over tutel_native's defaults from paired rounds."""
    trials = {system_label(t): t for t in doc["trials"]}
    base = trials[BASE]
    layer = base["workload_spec"]["layer"]
    row = {"shape": {k: layer[k] for k in ("model_dim", "ffn_dim", "num_experts", "top_k", "activation")},
           "tokens": base["workload_spec"]["batch_size"] * base["workload_spec"]["seq_len"],
           "run_id": doc["run_id"], "entries": {}}
    row["kernel_choice"] = kernel_choices(base)
    for label, trial in trials.items():
        entry = {"status": trial["status"], "median_ms": trial["summary"]["median"] * 1e3 if trial["summary"] else None,
                 "check": None if trial["check"] is None else trial["check"]["passed"]}
        if label != BASE and trial["summary"] and base["summary"]:
            paired = stats.speedup(base, trial)  # base time / trial time; we report trial / base
            entry.update(over_tutel=1 / paired.ratio, ci=[1 / paired.ci_high, 1 / paired.ci_low]
                         if paired.has_interval else None, pairs=paired.n_pairs)
        row["entries"][label] = entry
    return row


def kernel_choices(trial: dict) -> dict[str, int]:
    """Steps each kernel/layout ran in tutel_native's rounds (its cost model's choices)."""
    steps: dict[str, int] = {}
    for rnd in trial.get("rounds") or []:
        for report in rnd.get("tuning") or []:
            for name, n in ((report or {}).get("kernel_choice") or {}).get("steps", {}).items():
                steps[name] = steps.get(name, 0) + n
    return steps


def cell(entry: dict | None) -> str:
    if not entry or entry.get("over_tutel") is None:
        return "-" if not entry else entry["status"]
    ci = entry["ci"]
    text = f"{entry['over_tutel']:.2f}x " + (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "(too few rounds)")
    return f"**{text}**" if ci and (ci[0] > 1 or ci[1] < 1) else text


def report(rows: dict[str, dict], rounds: int, command: str) -> str:
    labels = [f"{BASE}[expert_kernel=mm,expert_layout=capacity]", *PEERS]
    header = ["shape", "E", "k", "M", "H", "tokens", "tutel_native ms", "its choice", "Tutel algorithm / tutel",
              *[f"{p} / tutel" for p in PEERS]]
    body = []
    for name, row in rows.items():
        s = row["shape"]
        base = row["entries"][BASE]
        choice = ", ".join(sorted(row.get("kernel_choice", {}), key=lambda n: -row["kernel_choice"][n])) or "-"
        body.append([name, s["num_experts"], s["top_k"], s["model_dim"], s["ffn_dim"], row["tokens"],
                     "-" if base["median_ms"] is None else f"{base['median_ms']:.1f}", choice,
                     *[cell(row["entries"].get(label)) for label in labels]])
    return "\n".join([
        "# tutel_native across shapes: against its own Tutel-algorithm path and the peers",
        "",
        f"Command: `{command}` ({rounds} interleaved rounds per shape; layer level, forward+backward, fp32, "
        "5 timed steps per round after 2 warm-up steps, 2 threads; the classic shapes at capacity factor "
        "1.2, the fine-grained ones dropless under the common softmax router).",
        "",
        "Each cell is that entry's time over tutel_native's defaults (above 1: tutel_native is faster): "
        "the geometric mean of paired per-round ratios, with a 95% bootstrap interval over rounds. Bold: "
        "the interval excludes 1. Every entry passed the equivalence check against torch_reference "
        "unless its cell says otherwise; '-' means the system does not run that shape (transformers' "
        "blocks have no capacity, so they run the dropless shapes only). 'its choice' is the "
        "kernel/layout tutel_native's cost model ran (systems/tutel_native/kernel_choice.py; "
        "docs/expert-kernels.md), most steps first.",
        "",
        markdown_table(header, body),
        "",
        "Shapes: tiny is the gpt2-xl-moe debug layer; the others are the workloads' proxy flavours "
        "(workloads/presets.py). deepseek-v3's proxy has a shared expert, added by the harness "
        "identically for every system.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--out", default=str(ROOT / "reports" / "shape_sweep"), help="report path without suffix")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    raw = ROOT / "results" / "shape_sweep"
    raw.mkdir(parents=True, exist_ok=True)
    rows, started = {}, time.monotonic()
    for name in names:
        rows[name] = compare(json.loads(run_shape(name, args.rounds, raw).read_text()))
    command = "python benchmarks/shape_sweep.py" + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
    text = report(rows, args.rounds, command)
    out = Path(args.out)
    write_text_atomic(text, out.with_suffix(".md"))
    write_json_atomic({"command": command, "rounds": args.rounds, "wall_s": time.monotonic() - started,
                       "rows": rows}, out.with_suffix(".json"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
