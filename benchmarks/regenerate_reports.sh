#!/usr/bin/env bash
# Regenerates the committed results/ and reports/ on a quiet machine (check `uptime` first: nothing
# else may run while it times). About 55 minutes on a 2-core CPU.
#
# Method (README "Results"): every comparison is side by side in one run, at least 10 interleaved
# rounds, a seeded random order of the entries inside each round, each round in a fresh process,
# identical canonical weights and a shared seeded input pool, every trial checked against
# torch_reference in its first round and by checksum in every later round. Speedups are paired
# per-round ratios with a bootstrap interval over rounds (harness/stats.py).
set -euo pipefail
cd "$(dirname "$0")/.."
W=gpt2-xl-moe,mixtral-8x7b,mixtral-8x22b
R=10
# 1. Proxy MoE layers, forward+backward, cf 1.25, every available system, plus the expert-kernel
#    ablation (tutel_native with torch's mm/bmm kernel instead of oneDNN) as a labelled entry.
./moebench run --workload "$W" --capacity-factor 1.25 --repeats "$R" --variant tutel_native:expert_kernel=mm
# 2. The same layers dropless.
./moebench run --workload "$W" --capacity-factor dropless --repeats "$R"
# 3. Host-memory ablation: glibc's default allocator behaviour instead of the harness's reuse policy.
./moebench run --workload mixtral-8x7b --capacity-factor 1.25 --repeats "$R" --malloc system
# 4. Expert parallelism on this machine's 2 cores: 2 ranks, EP 2.
./moebench run --workload mixtral-8x7b --capacity-factor 1.25 --nproc-per-node 2 --ep 2 --repeats "$R"
# 5. Model level: the iteration time papers report (proxy model: attention + MoE, AdamW).
./moebench run --workload mixtral-8x7b --level model --repeats "$R"
# Collectives (calibrate the alpha-beta model).
./moebench comm --nproc-per-node 2
./moebench report results/ --out reports/
