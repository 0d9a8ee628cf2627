#!/usr/bin/env bash
# The MoE dispatch benchmark at the real DBRX layer shape on one GPU. As gpu_check.sh: wheels
# found in ./.whl (for a machine without network) are installed to /tmp/site, the repo goes on
# PYTHONPATH, results go to $OUT (default ./bench_out).
#   bash experiments/gpu_bench_moe.sh          # GPU: tokens 8192, d 6144, F 10752, E 16, k 4, bf16
#   SMOKE=1 bash experiments/gpu_bench_moe.sh  # any machine: tiny shapes, checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [[ "${SMOKE:-0}" == 1 ]]; then
  shape=(--tokens=128 --d_model=32 --ffn=48 --iters=1 --dtype=float32)
  impls=dense,dropless,capacity
else
  shape=(--tokens=8192 --d_model=6144 --ffn=10752 --iters=10 --dtype=bfloat16)
  impls=capacity,dropless:tokamax,dropless:mgpu,dropless:ragged_dot
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>/dev/null || true
python3 experiments/bench_moe.py "${shape[@]}" --experts=16 --top_k=4 --impls="$impls" \
  --json_out="$OUT/bench_moe.json" 2>&1 | tee "$OUT/bench_moe.txt"
