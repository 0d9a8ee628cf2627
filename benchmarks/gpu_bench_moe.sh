#!/usr/bin/env bash
# The MoE dispatch benchmark (bench_moe.py) at the real DBRX layer shape on one GPU. As
# gpu_check.sh: wheels found in ./.whl (for a machine without network) are installed to
# /tmp/site, the repo goes on PYTHONPATH, results go to $OUT (default ./bench_out).
#   bash benchmarks/gpu_bench_moe.sh          # GPU: the dbrx-132b layer, 8192 tokens, bf16
#   SMOKE=1 bash benchmarks/gpu_bench_moe.sh  # any machine: tiny shapes, checks the script
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
  shape=(--config=configs/bench.py:dbrx-tiny --config.model.d_model=32
    --config.model.ffn_hidden_size=48 --config.model.dtype=float32 --tokens=128 --iters=1)
  impls=dense,dropless,capacity
else
  shape=(--config=configs/bench.py:dbrx-132b --config.model.dtype=bfloat16 --tokens=8192
    --iters=10)
  impls=capacity,dropless:tokamax,dropless:mgpu,dropless:ragged_dot
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>/dev/null || true
python3 -m benchmarks.bench_moe "${shape[@]}" --impls="$impls" \
  --json_out="$OUT/bench_moe.json" 2>&1 | tee "$OUT/bench_moe.txt"
