#!/usr/bin/env bash
# One 1-GPU device call (< 600 s) for MDN_RECOMPUTE_PAIRS (issue 2): the op's GPU exactness tests
# at the K=128 shape for modes 0/1/2 (float64 references) and packed fp32 documents, then the
# kernel benchmark of the default path and both variants beside FLA GDN (time, peak memory,
# relative difference to the default). Usage (repo root, .whl carried):
#   bash benchmarks/run_recompute_gpu.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
MDN_RESULTS_DIR="$OUT" timeout 250 python3 -m pytest -q -s -p no:cacheprovider \
  tests/gpu/test_kernels_gpu.py -k "K128_V256 or packed" 2>&1 | tee "$OUT/gpu_tests.log"
timeout 320 python3 tools/bench_kernels.py --shapes 0 --variant MDN_RECOMPUTE_PAIRS=1 \
  --variant MDN_RECOMPUTE_PAIRS=2 --out "$OUT/kernels_bench.json" 2>&1 | tee "$OUT/bench.log"
