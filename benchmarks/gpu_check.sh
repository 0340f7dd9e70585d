#!/usr/bin/env bash
# The GPU check: the systems that need CUDA (liger_kernel, megatron_grouped_gemm) checked against
# torch_reference and timed beside the others, in bf16, on one GPU. Run it where a GPU is lent:
#
#   benchmarks/gpu_check.sh [--dry-run] [--python PYTHON] [--wheels DIR] [--out DIR] [--repeats N]
#
#   --dry-run      print the commands and exit 0 without running anything (the test suite runs this)
#   --python       the interpreter that has torch with CUDA (default python3); moebench runs as
#                  `PYTHON -m harness` with this repository on PYTHONPATH (no .venv on GPU machines)
#   --wheels DIR   install requirements/gpu.txt's packages from wheel files in DIR first (machines
#                  without a network), with pip --no-index
#   --out DIR      results and reports (default results/gpu_check)
#   --repeats N    interleaved rounds per run (default 5)
#
# Each run checks every trial against torch_reference in its first round (outputs, every gradient,
# tokens per expert) before any time counts; a system that cannot run says why in its row.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0 python=python3 wheels="" out=results/gpu_check repeats=5
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --python) python="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"

step() {  # print a command; run it unless --dry-run
  echo "+ $*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

GPU_SYSTEMS=liger_kernel,megatron_grouped_gemm
PEERS=torch_reference,tutel_native,hf_transformers,torchtitan,deepspeed_moe,megatron_core
COMMON=(--device cuda --dtype bfloat16 --repeats "$repeats" --out "$out")

if [ "$dry_run" = 0 ]; then
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: torch sees no CUDA device')"
fi
if [ -n "$wheels" ]; then
  step "$python" -m pip install --no-index --find-links "$wheels" -r requirements/gpu.txt
  step "$python" -m pip install --no-index --no-deps --find-links "$wheels" -r requirements/nodeps.txt
fi
step "$python" -m harness list
# 1. Fine-grained proxy layer under the common softmax router: every system, both transformers
#    expert implementations.
step "$python" -m harness run --workload qwen3-30b-a3b --router softmax --systems "$PEERS,$GPU_SYSTEMS" \
  --variant hf_transformers:experts=eager "${COMMON[@]}"
# 2. The classic Mixtral proxy layer, dropless (transformers and Liger have no capacity).
step "$python" -m harness run --workload mixtral-8x7b --capacity-factor dropless --systems "$PEERS,$GPU_SYSTEMS" \
  "${COMMON[@]}"
# 3. DeepSeek-V3's declared router (sigmoid, bias, group-limited): the systems that express it.
step "$python" -m harness run --workload deepseek-v3 --systems torch_reference,torchtitan "${COMMON[@]}"
# 4. Model level, the iteration time: the Mixtral proxy model.
step "$python" -m harness run --workload mixtral-8x7b --level model --capacity-factor dropless \
  --systems "$PEERS,$GPU_SYSTEMS" "${COMMON[@]}"
step "$python" -m harness report "$out" --out "$out/reports"
