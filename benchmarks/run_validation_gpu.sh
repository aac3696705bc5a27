#!/usr/bin/env bash
# One device call on a 4-GPU machine: the GPU tests the CPU suite cannot run, side by side on
# disjoint GPUs, then the CP op benchmark over all four. Usage (repo root, .whl carried with
# megatron-core, webdataset, deepspeed and their needs; see run_deepspeed_gpu.sh):
#   bash benchmarks/run_validation_gpu.sh "$OUT"
# Everything lands in $OUT/validation.tar.gz (the device tool returns at most 8 files).
# PHASES="tests cp" picks phases; CP_RS="2 4" the CP world sizes; each phase has a time limit so
# the call ends inside the tool's 10 minutes.
set -uo pipefail
OUT=${1:-/tmp/out}
R=$OUT/validation
mkdir -p "$R"
. benchmarks/gpu_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$R/versions.txt"

job() {  # job NAME GPUS LIMIT_S CMD... : one pytest/bench in the background on the given GPUs
  local name=$1 gpus=$2 limit=$3; shift 3
  mkdir -p "$R/$name"
  ( export CUDA_VISIBLE_DEVICES=$gpus MDN_RESULTS_DIR=$R/$name
    timeout "$limit" "$@" >"$R/$name.log" 2>&1; echo "exit $?" >>"$R/$name.log" ) &
}

for phase in ${PHASES:-tests cp}; do
  case $phase in
  tests)
    # per-test limit so a slow case fails with its traceback instead of cutting the summary;
    # MDN_COMPILE=0: the tiny runs would spend most of their time in torch.compile
    PT="python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short --timeout=${T_CASE:-170}"
    MDN_COMPILE=0 job model 0,1 ${T_TESTS:-330} $PT tests/gpu/test_model_gpu.py
    MDN_COMPILE=0 job train 2,3 ${T_TESTS:-330} $PT tests/gpu/test_train_gpu.py ${TRAIN_K:+-k "$TRAIN_K"}
    wait
    MDN_COMPILE=0 job deepspeed 0,1 ${T_TESTS:-330} $PT tests/gpu/test_deepspeed_gpu.py ${DS_K:+-k "$DS_K"}
    wait ;;
  longctx)
    job longctx 0,1 ${T_LONGCTX:-330} python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_longctx_memory_gpu.py
    wait ;;
  cp)
    for n in ${CP_RS:-2 4}; do
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout ${T_CP:-200} python3 -m torch.distributed.run \
        --standalone --nproc-per-node "$n" tools/bench_cp.py --out "$R/cp_bench_r$n.json" \
        --skip ${CP_SKIP:-fla} >"$R/cp_bench_r$n.log" 2>&1
      echo "exit $?" >>"$R/cp_bench_r$n.log"
    done ;;
  esac
  tar -czf "$OUT/validation.tar.gz" -C "$OUT" validation   # after every phase: a cut call keeps the earlier ones
done
tail -n 3 "$R"/*.log
