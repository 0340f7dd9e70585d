#!/usr/bin/env bash
# The fine-grained workloads (qwen3-30b-a3b, olmoe-1b-7b, deepseek-v3 proxies) on every system here,
# at layer and model level: under each model's declared router (systems that cannot express it are
# recorded as skipped, with the reason) and under the common softmax router (identical work for all);
# in fp32, and in bf16 (the only precision torchtitan runs). Each command is one interleaved run; the
# report pairs rounds inside each run.
#
#   benchmarks/fine_grained.sh [--repeats N] [--dry-run]
#
# Run it with nothing else on the machine (about 45 minutes on 2 cores). Results go to
# results/fine_grained/, tables to reports/fine_grained/.
set -euo pipefail
cd "$(dirname "$0")/.."

repeats=5
source benchmarks/run_steps.sh "$@"

FINE=qwen3-30b-a3b,olmoe-1b-7b,deepseek-v3
COMMON=(--workload "$FINE" --repeats "$repeats" --out results/fine_grained)
# Layer level. fp32 under the common router is benchmarks/shape_sweep.py's job.
step ./moebench run --level layer --dtype float32 "${COMMON[@]}"
step ./moebench run --level layer --dtype bfloat16 "${COMMON[@]}"
step ./moebench run --level layer --dtype bfloat16 --router softmax "${COMMON[@]}"
# Model level: the iteration time papers report (forward, backward, optimizer step; the bias update
# of the sigmoid router inside it).
step ./moebench run --level model --dtype float32 --router softmax "${COMMON[@]}"
step ./moebench run --level model --dtype float32 "${COMMON[@]}"
step ./moebench run --level model --dtype bfloat16 "${COMMON[@]}"
step ./moebench report results/fine_grained --out reports/fine_grained --title "fine-grained MoE"
