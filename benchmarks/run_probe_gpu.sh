#!/usr/bin/env bash
# Session-3 triage on one H100 (nvidia-h100-x1), results under $OUT:
#   1. where MDN_RECOMPUTE_PAIRS=2 fails (CUDA_LAUNCH_BLOCKING at the bench shape; memcheck small)
#   2. the mixer's conv + SiLU: eager against FLA's Triton causal_conv1d (tools/bench_conv.py)
#   3. a torch.profiler breakdown of the 400M MDN training step (tools/bench_model.py --profile)
#   bash benchmarks/run_probe_gpu.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
export TRITON_CACHE_AUTOTUNING=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
(MDN_RECOMPUTE_PAIRS=2 CUDA_LAUNCH_BLOCKING=1 timeout 90 python3 tools/check_recompute_pairs_gpu.py \
  --B 8 --T 4096) > "$OUT/mode2_blocking.log" 2>&1; echo "mode2 blocking rc=$?"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "sanitizer: ${SAN:-none}"
if [ -n "$SAN" ]; then
  (MDN_RECOMPUTE_PAIRS=2 timeout 120 "$SAN" --tool memcheck --print-limit 20 python3 \
    tools/check_recompute_pairs_gpu.py --B 1 --T 200 --H 2) > "$OUT/mode2_memcheck.log" 2>&1
  echo "memcheck rc=$?"
fi
timeout 120 python3 tools/bench_conv.py --out "$OUT/conv_h100.json" > "$OUT/conv.log" 2>&1; echo "conv rc=$?"
timeout 170 python3 -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_model.py \
  --steps 5 --warmup 3 --config configs/mdn_400m.yaml --micro-batch 4 \
  --profile "$OUT/model_profile_mdn_400m.txt" --out "$OUT/model_mdn_400m.json" > "$OUT/model.log" 2>&1
echo "model rc=$?"
tail -5 "$OUT"/*.log
