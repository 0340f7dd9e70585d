#!/usr/bin/env bash
# The measured trials the performance model is validated against (benchmarks/model_validation.py):
# layer forward+backward and model-level train steps, fp32, the classic mixtral-8x7b and the fine-grained qwen3-30b-a3b proxies,
# every system available here, EP 1, 2 and 4 on gloo; then this machine's calibration, taken right
# after the trials so both see the machine in the same state, then the report.
#
#   benchmarks/model_validation_runs.sh [--repeats N] [--dry-run]
#
# Run it with nothing else on the machine (about 50 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

repeats=3
source benchmarks/run_steps.sh "$@"

WORKLOADS=mixtral-8x7b,qwen3-30b-a3b
step ./moebench run --workload "$WORKLOADS" --level layer --repeats "$repeats" --out results/validation
for ep in 2 4; do
  step ./moebench run --workload "$WORKLOADS" --level layer --nproc-per-node "$ep" --ep "$ep" \
    --systems tutel_native,fsmoe_native,deepspeed_moe,megatron_core,torch_reference \
    --repeats "$repeats" --out results/validation
done
# model level (forward, backward, gradient all-reduce, AdamW step): one rank, and EP 2 over 2 ranks
step ./moebench run --workload "$WORKLOADS" --level model --repeats "$repeats" --out results/validation
step ./moebench run --workload "$WORKLOADS" --level model --nproc-per-node 2 --ep 2 \
  --systems tutel_native,fsmoe_native,deepspeed_moe,megatron_core,torch_reference --repeats "$repeats" \
  --out results/validation
step ./moebench calibrate
step .venv/bin/python benchmarks/model_validation.py results/validation
