#!/usr/bin/env bash
# fsmoe_native against tutel_native (at d = 1 and at each fixed overlap degree, so its best fixed d is in
# the same interleaved run), DeepSpeed-MoE and Megatron-Core, at EP 2 and EP 4 on gloo, layer and model
# level, on the classic mixtral-8x7b proxy and the fine-grained qwen3-30b-a3b proxy, and with sharded experts
# (ep > E) at layer level. Every trial is
# checked against the reference in its first round; rounds are interleaved and paired. Results carry
# each step's exposed communication (harness/exposed_comm.py).
#
#   benchmarks/fsmoe_compare.sh [--repeats N] [--dry-run]
#
# Run it with nothing else on the machine. 4 ranks share the 2 cores here (1 thread each).
# Results go to results/fsmoe/, tables to reports/fsmoe/.
set -euo pipefail
cd "$(dirname "$0")/.."

repeats=5
source benchmarks/run_steps.sh "$@"

SYSTEMS=fsmoe_native,tutel_native,deepspeed_moe,megatron_core
TUTEL_D=(--variant tutel_native:overlap_degree=2 --variant tutel_native:overlap_degree=4)
for ep in 2 4; do
  step ./moebench run --workload mixtral-8x7b,qwen3-30b-a3b --level layer --nproc-per-node "$ep" --ep "$ep" \
    --systems "$SYSTEMS" "${TUTEL_D[@]}" --repeats "$repeats" --out results/fsmoe
  # model level: also fsmoe_native with the one all-reduce after backward (its partitioned one is the default)
  step ./moebench run --workload mixtral-8x7b,qwen3-30b-a3b --level model --nproc-per-node "$ep" --ep "$ep" \
    --systems "$SYSTEMS" "${TUTEL_D[@]}" --variant fsmoe_native:grad_sync=after_backward \
    --repeats "$repeats" --out results/fsmoe
done
# Sharded experts (ESP): 2 experts over 4 ranks, 2 holders each (FSMoE's all-gather / reduce-scatter vs
# Tutel's sharded all-to-all at r = 1 and r = 2); DeepSpeed-MoE and Megatron-Core cannot shard (skipped).
step ./moebench run --workload mixtral-8x7b --experts 2 --level layer --nproc-per-node 4 --ep 4 \
  --systems fsmoe_native,tutel_native --variant tutel_native:adaptive_r=2 --repeats "$repeats" --out results/fsmoe
# Ablation: fsmoe_native with both degrees pinned to 1 against tutel_native (d = 1), so what is left
# between them is the expert step's implementation, not the schedule.
step ./moebench run --workload mixtral-8x7b,qwen3-30b-a3b --level layer --nproc-per-node 2 --ep 2 \
  --systems fsmoe_native,tutel_native --variant fsmoe_native:forward_degree=1,backward_degree=1 \
  --repeats "$repeats" --out results/fsmoe_d1  # its own folder: its trial ids would supersede the paired ones above
step ./moebench report results/fsmoe --out reports/fsmoe --baseline fsmoe_native --title "fsmoe_native vs the others"
step ./moebench report results/fsmoe_d1 --out reports/fsmoe_d1 --baseline tutel_native \
  --title "fsmoe_native at degree 1 vs tutel_native at degree 1"
