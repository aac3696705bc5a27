#!/usr/bin/env bash
# DeepSpeed vs Megatron backend, 1.3B MDN (tools/bench_deepspeed.py), in one device call on a
# 4-GPU machine (nvidia-h100-x4), ending within ~540 s. Not run yet: written without a GPU.
#   phase gpu1: megatron_1, ds_z3_offload_1 (torch AdamW on the CPU partitions),
#               ds_z3_offload_cpuadam_1 (DeepSpeedCPUAdam, JIT-compiled), ds_z3_1
#               side by side, one GPU each (CUDA_VISIBLE_DEVICES=0..3)
#   phase gpu2: megatron_2 and ds_z3_2 side by side (GPUs 0,1 and 2,3)
#   phase gpu4: megatron_4, then ds_z3_4 (all four GPUs)
# After every phase everything is tarred into $OUT/deepspeed.tar.gz (the device tool returns at
# most 8 files): deepspeed/deepspeed_1p3b.json (one JSON for all phases), CASE.log per case,
# PHASE.log per phase. Each case has its phase's time limit (T1, T2, T4 seconds) and all end by
# the deadline (BUDGET_S after the start), so a slow phase shortens the later ones.
# The machine has no network: carry wheels in .whl/, built here with
#   DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed==0.19.8 hjson msgpack ninja py-cpuinfo \
#       einops pydantic pydantic-core annotated-types typing-inspection megatron-core==0.16.1 ...
# (pydantic-core is a compiled wheel: download the cp312 manylinux one for the device's Python).
# Usage (repo root): bash benchmarks/run_deepspeed_gpu.sh "$OUT"
#   PHASES="gpu1 gpu2 gpu4" picks phases; STEPS, WARMUP, GB (global batch), MB (micro batch),
#   SEQ, BENCH_ARGS (more tools/bench_deepspeed.py arguments).
set -uo pipefail
START=$(date +%s)
OUT=${1:-/tmp/out}
R=$OUT/deepspeed
mkdir -p "$R"
. benchmarks/gpu_env.sh
# DeepSpeed compiles its ops on first use (DS_BUILD_OPS=0 wheel): ninja from the carried wheel
# (or the image's), extensions built under /tmp
export PATH=/tmp/site/bin:$PATH TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
# TESTS=1: the GPU equivalence tests of the backend instead of the benchmark (one device call)
if [ -n "${TESTS:-}" ]; then
  timeout 580 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_deepspeed_gpu.py 2>&1 | tee "$OUT/deepspeed_gpu_tests.log"
  exit
fi
DEADLINE=$((START + ${BUDGET_S:-505}))  # + up to 30 s to stop a case cut at the deadline
ARGS=(--out "$R/deepspeed_1p3b.json" --steps "${STEPS:-6}" --warmup "${WARMUP:-2}"
      --global-batch "${GB:-8}" --micro-batch "${MB:-1}" --seq-len "${SEQ:-4096}" --deadline "$DEADLINE")

phase() {  # phase NAME LIMIT_S CASES
  echo "== phase $1 (cases $3, limit $2 s each, $((DEADLINE - $(date +%s))) s to the deadline)"
  python3 tools/bench_deepspeed.py "${ARGS[@]}" --case-timeout "$2" --cases "$3" ${BENCH_ARGS:-} >"$R/$1.log" 2>&1
  echo "exit $?" >>"$R/$1.log"
  grep '^\[bench_deepspeed\]' "$R/$1.log"
  tar -czf "$OUT/deepspeed.tar.gz" -C "$OUT" deepspeed   # after every phase: a cut call keeps the earlier ones
}

for p in ${PHASES:-gpu1 gpu2 gpu4}; do
  case $p in
  gpu1) phase gpu1 "${T1:-180}" megatron_1,ds_z3_offload_1,ds_z3_offload_cpuadam_1,ds_z3_1 ;;
  gpu2) phase gpu2 "${T2:-120}" megatron_2,ds_z3_2 ;;
  gpu4) phase gpu4 "${T4:-90}" megatron_4,ds_z3_4 ;;
  esac
done
echo "done in $(($(date +%s) - START)) s"
