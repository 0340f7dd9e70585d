"""tutel_native against its own Tutel-algorithm path, its other kernel, and the peers, shape by shape.

One `moebench run` per shape (layer level, forward+backward, fp32, the shape's capacity factor), each
an interleaved run of:
  tutel_native                     its defaults (kernel "auto", layout "auto")
  tutel_native[expert_kernel=mm]   the other kernel (torch mm/bmm on row ranges; grouped layout)
  tutel_native[capacity, mm]       Tutel's own algorithm: the padded [E, C, M] buffer, one batched
                                   GEMM per projection
  deepspeed_moe, megatron_core     the peers that run here (torch_reference is the check's loop)
Each entry is compared to tutel_native's defaults by paired per-round ratios (harness/stats.py):
"x/tutel" = x's time / tutel_native's, so above 1 means tutel_native is faster, with a 95% bootstrap
interval over rounds. A speedup is claimed only where the interval's lower end is above 1.

Shapes: "tiny" (M 32, H 128, E 8, top-2, 64 tokens: the gpt2-xl-moe debug layer), the three classic
proxies, and three fine-grained stand-ins built from the mixtral-8x7b proxy (M 512, 1024 tokens) by
the proxy rule (keep E, top-k and the expert-hidden/model ratio of the published config):
  qwen3-like     E 128, top-8, H 192  (Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size
                                       768, num_experts 128, num_experts_per_tok 8)
  olmoe-like     E 64,  top-8, H 256  (allenai/OLMoE-1B-7B-0924 config.json: hidden_size 2048,
                                       intermediate_size 1024, num_experts 64, num_experts_per_tok 8)
  deepseek-like  E 256, top-8, H 144  (DeepSeek-V3 inference/configs/config_671B.json: dim 7168,
                                       moe_inter_dim 2048, n_routed_experts 256, n_activated_experts 8;
                                       7168:2048 at M 512 is 146, rounded to 144 for 16-byte strides)
They use the common softmax top-k router and no shared expert, so they measure the expert path's
shape only, not those models' own routers (the workload presets of issue 11 are still to come).

Run (nothing else on the machine): .venv/bin/python benchmarks/shape_sweep.py [--rounds 4]
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

FINE = ["--workload", "mixtral-8x7b", "--flavor", "proxy", "--top-k", "8"]
SHAPES = {
    "tiny": ["--workload", "gpt2-xl-moe", "--flavor", "debug"],
    "gpt2-xl-moe": ["--workload", "gpt2-xl-moe", "--flavor", "proxy"],
    "mixtral-8x7b": ["--workload", "mixtral-8x7b", "--flavor", "proxy"],
    "mixtral-8x22b": ["--workload", "mixtral-8x22b", "--flavor", "proxy"],
    "qwen3-like": [*FINE, "--experts", "128", "--ffn-dim", "192"],
    "olmoe-like": [*FINE, "--experts", "64", "--ffn-dim", "256"],
    "deepseek-like": [*FINE, "--experts", "256", "--ffn-dim", "144"],
}
PEERS = ("deepspeed_moe", "megatron_core")
VARIANTS = ("tutel_native:expert_kernel=mm", "tutel_native:expert_layout=capacity,expert_kernel=mm")
BASE = "tutel_native"


def run_shape(name: str, rounds: int, out: Path) -> Path:
    """One interleaved run of every entry on this shape; its results file."""
    before = set(out.glob("*.json"))
    argv = [sys.executable, "-m", "harness", "run", *SHAPES[name], "--systems", ",".join((BASE, *PEERS)),
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
    for label, trial in trials.items():
        entry = {"status": trial["status"], "median_ms": trial["summary"]["median"] * 1e3 if trial["summary"] else None,
                 "check": None if trial["check"] is None else trial["check"]["passed"]}
        if label != BASE and trial["summary"] and base["summary"]:
            paired = stats.speedup(base, trial)  # base time / trial time; we report trial / base
            entry.update(over_tutel=1 / paired.ratio, ci=[1 / paired.ci_high, 1 / paired.ci_low]
                         if paired.has_interval else None, pairs=paired.n_pairs)
        row["entries"][label] = entry
    return row


def cell(entry: dict | None) -> str:
    if not entry or entry.get("over_tutel") is None:
        return "-" if not entry else entry["status"]
    ci = entry["ci"]
    text = f"{entry['over_tutel']:.2f}x " + (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "(too few rounds)")
    return f"**{text}**" if ci and (ci[0] > 1 or ci[1] < 1) else text


def report(rows: dict[str, dict], rounds: int, command: str) -> str:
    labels = [f"{BASE}[expert_kernel=mm]", f"{BASE}[expert_kernel=mm,expert_layout=capacity]", *PEERS]
    header = ["shape", "E", "k", "M", "H", "tokens", "tutel_native ms", "mm kernel / tutel",
              "Tutel algorithm / tutel", *[f"{p} / tutel" for p in PEERS]]
    body = []
    for name, row in rows.items():
        s = row["shape"]
        base = row["entries"][BASE]
        body.append([name, s["num_experts"], s["top_k"], s["model_dim"], s["ffn_dim"], row["tokens"],
                     "-" if base["median_ms"] is None else f"{base['median_ms']:.1f}",
                     *[cell(row["entries"].get(label)) for label in labels]])
    return "\n".join([
        "# tutel_native across shapes: against its own Tutel-algorithm path, its other kernel, and the peers",
        "",
        f"Command: `{command}` ({rounds} interleaved rounds per shape; layer level, forward+backward, fp32, "
        "capacity factor 1.2, 5 timed steps per round after 2 warm-up steps, 2 threads).",
        "",
        "Each cell is that entry's time over tutel_native's defaults (above 1: tutel_native is faster): "
        "the geometric mean of paired per-round ratios, with a 95% bootstrap interval over rounds. Bold: "
        "the interval excludes 1. Every entry passed the equivalence check against torch_reference "
        "unless its cell says otherwise.",
        "",
        markdown_table(header, body),
        "",
        "Shapes: tiny is the gpt2-xl-moe debug layer; the fine-grained rows are stand-ins built from the "
        "mixtral-8x7b proxy (M 512, 1024 tokens) with the published configs' expert count, top-k and "
        "expert-hidden/model ratio, under the common softmax router and without a shared expert "
        "(benchmarks/shape_sweep.py says which configs).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
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
    command = "python benchmarks/shape_sweep.py" + (f" --rounds {args.rounds}" if args.rounds != 4 else "")
    text = report(rows, args.rounds, command)
    out = Path(args.out)
    write_text_atomic(text, out.with_suffix(".md"))
    write_json_atomic({"command": command, "rounds": args.rounds, "wall_s": time.monotonic() - started,
                       "rows": rows}, out.with_suffix(".json"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
