#!/usr/bin/env bash
# Long-context memory on the lent GPU machine (not yet run at the time of writing):
#   1. tests/gpu/test_longctx_memory_gpu.py: the estimate within 15% of the measured peak;
#   2. benchmarks/longctx_search.py: the longest 1.3B context that trains on 1, 2 and 4 GPUs
#      (starting at the estimate; each attempt a torchrun of benchmarks/longctx_memory.py).
# Each call of the device tool has 10 minutes: run the parts separately, e.g.
#   SKIP_SEARCH=1 bash benchmarks/run_longctx_gpu.sh "$OUT"                  (the 15% check)
#   SKIP_TESTS=1 GPUS="4" ATTEMPTS=3 bash benchmarks/run_longctx_gpu.sh "$OUT"  (one search)
# The results: $OUT/gpu_tests.json, $OUT/longctx_search_g{1,2,4}.json (append; START=N resumes).
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ -n "${SKIP_TESTS:-}" ] || MDN_RESULTS_DIR="$OUT" timeout 580 python3 -m pytest -q -s -p no:cacheprovider \
  tests/gpu/test_longctx_memory_gpu.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/longctx_memory_tests.log"
[ -n "${SKIP_SEARCH:-}" ] && exit 0
for G in ${GPUS:-1 2 4}; do
  [ "$G" -le "$NGPU" ] || continue
  python3 benchmarks/longctx_search.py --model configs/mdn_1.3b.yaml --gpus "$G" \
    --out "$OUT/longctx_search_g$G.json" --max-attempts "${ATTEMPTS:-3}" ${START:+--start $START} \
    2>&1 | tee -a "$OUT/longctx_search_g$G.log"
done
