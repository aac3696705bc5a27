#!/usr/bin/env bash
# GPU triage of MDN_RECOMPUTE_PAIRS=2's state backward variants (kernels/mdn/state_pass.py
# FUSE_VARIANTS), one process per variant (a fault breaks the CUDA context), each under 60 s:
#   1. every variant at the memcheck shape (B=1 T=200 H=2), CUDA_LAUNCH_BLOCKING, vs mode 0
#   2. the variants that ran, at the bench shape (B=8 T=4096 H=6), with timings vs mode 0
#   3. compute-sanitizer memcheck of the default variant at the small shape, if present
#   bash benchmarks/run_mode2_triage_gpu.sh "$OUT" [variant ...]
set -uo pipefail
OUT=${1:-/tmp/out}
shift || true
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
VARIANTS=${*:-trans-w8-halfbv stack-w8-halfbv strided-w8-halfbv trans-w8 trans-w4-halfbv strided-w4 strided-w8}
ok=()
for v in $VARIANTS; do
  (MDN_RECOMPUTE_PAIRS=2 CUDA_LAUNCH_BLOCKING=1 timeout 55 python3 tools/check_recompute_pairs_gpu.py \
    --B 1 --T 200 --H 2 --no-time --fuse-variant "$v") > "$OUT/small_$v.log" 2>&1
  rc=$?; echo "small $v rc=$rc: $(grep RESULT "$OUT/small_$v.log" || tail -1 "$OUT/small_$v.log")"
  [ $rc -eq 0 ] && ok+=("$v")
done
for v in "${ok[@]}"; do
  (MDN_RECOMPUTE_PAIRS=2 timeout 55 python3 tools/check_recompute_pairs_gpu.py --B 8 --T 4096 \
    --fuse-variant "$v") > "$OUT/bench_$v.log" 2>&1
  echo "bench $v rc=$?: $(grep -h 'fwd+bwd\|RESULT' "$OUT/bench_$v.log" | tr '\n' ' ')"
done
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  (MDN_RECOMPUTE_PAIRS=2 timeout 58 "$SAN" --tool memcheck --print-limit 5 python3 \
    tools/check_recompute_pairs_gpu.py --B 1 --T 200 --H 2 --no-time) > "$OUT/memcheck_default.log" 2>&1
  echo "memcheck default rc=$?: $(grep 'ERROR SUMMARY' "$OUT/memcheck_default.log")"
fi
