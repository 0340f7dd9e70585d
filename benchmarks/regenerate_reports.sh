#!/usr/bin/env bash
# Regenerates the committed results/ and reports/ (about 28 minutes on a quiet 2-core CPU).
# Every comparison is side by side in one run: interleaved rounds, fresh process per round,
# identical canonical weights, each trial checked against torch_reference first.
set -euo pipefail
cd "$(dirname "$0")/.."
W=gpt2-xl-moe,mixtral-8x7b,mixtral-8x22b
# Proxy MoE layers, forward+backward, every available system: capacity factor 1.25 and dropless.
./moebench run --workload "$W" --capacity-factor 1.25 --repeats 5
./moebench run --workload "$W" --capacity-factor dropless --repeats 3
# Expert parallelism on this machine's cores: EP 2 and EP 4 (EP 1 is the first run above).
./moebench run --workload mixtral-8x7b --capacity-factor 1.25 --nproc-per-node 2 --ep 2 --repeats 2
./moebench run --workload mixtral-8x7b --capacity-factor 1.25 --nproc-per-node 4 --ep 4 --repeats 2
# Model level: the iteration time papers report (proxy models: attention + MoE, AdamW).
./moebench run --workload "$W" --level model --repeats 2
# Collectives (calibrate the alpha-beta model).
./moebench comm --nproc-per-node 2
./moebench comm --nproc-per-node 4
./moebench report results/ --out reports/
