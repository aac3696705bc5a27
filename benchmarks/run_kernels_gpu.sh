#!/usr/bin/env bash
# One device call: GPU correctness tests, then the kernel benchmark against FLA GDN, then the
# chunk-parallel variants (torch.compile off, bf16 products off) for shape 0 without the peer.
# Usage on the lent GPU machine (from the repo root, with .whl carried):
#   bash benchmarks/run_kernels_gpu.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
MDN_RESULTS_DIR="$OUT" timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python3 tools/bench_kernels.py --out "$OUT/kernels_bench.json" --profile "$OUT/profile.txt" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
if [ -z "${SKIP_VARIANTS:-}" ]; then
  MDN_COMPILE=0 timeout 100 python3 tools/bench_kernels.py --no-fla --shapes 0 --out "$OUT/variant_nocompile.json" 2>&1 | tee -a "$OUT/bench.log"
  MDN_LOWP_MM=0 timeout 100 python3 tools/bench_kernels.py --no-fla --shapes 0 --out "$OUT/variant_fp32mm.json" 2>&1 | tee -a "$OUT/bench.log"
fi
