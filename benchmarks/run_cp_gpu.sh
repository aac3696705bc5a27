#!/usr/bin/env bash
# Context parallelism on the lent GPU machine: the CP GPU tests, then tools/bench_cp.py under
# torchrun on 1, 2 and 4 GPUs (as many as the machine has), with FLA's CP GDN as the peer when
# fla is importable. Usage (repo root, .whl carried as for run_kernels_gpu.sh):
#   SKIP_TESTS=1 RS="2 4" bash benchmarks/run_cp_gpu.sh "$OUT"   # BENCH_ARGS="--skip strong" passes through
#   PROFILE=1 adds --profile "$OUT/cp_profile_r$R.txt" (torch.profiler tables of the weak step)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ -n "${SKIP_TESTS:-}" ] || MDN_RESULTS_DIR="$OUT" timeout 400 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_cp_gpu.py 2>&1 | tee "$OUT/cp_gpu_tests.log"
for R in ${RS:-1 2 4}; do   # RS="4" runs one size (each call of the device tool has 10 minutes)
  [ "$R" -le "$NGPU" ] || continue
  timeout 540 python3 -m torch.distributed.run --standalone --nproc-per-node "$R" tools/bench_cp.py \
    --out "$OUT/cp_bench_r$R.json" --fla-peer ${PROFILE:+--profile "$OUT/cp_profile_r$R.txt"} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/cp_bench_r$R.log"
done
