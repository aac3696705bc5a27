#!/usr/bin/env bash
# Session 7, one 4-GPU call (nvidia-h100-x4, carry .whl): which of our kernel groups must compile
# without Hopper's wgmma for the 16-bit CP op to be right (mdn_kernels.mdn.wgmma, MDN_NO_WGMMA).
#   BUDGET_S=540 bash benchmarks/run_wgmma_bisect_gpu.sh "$OUT"     (results: $OUT/wgmma.tar.gz)
#
# Phase A: tools/check_cp_kernels_gpu.py at CP = 2, K = 256 (GPUs 0,1) and K = 128 (GPUs 2,3),
#   once per MDN_NO_WGMMA choice in one process each ("none" first: is this machine wrong?).
# Phase B: the smallest choice that fixed both (benchmarks/wgmma_pick.py) in the trainer's CP = 2
#   steps (1.3B on GPUs 0,1, 400M on 2,3), then what it costs without CP: the kernel benchmark
#   (forward+backward, B = 8, T = 4096, K = 128 and 256) with and without it, and the GPU test.
set -uo pipefail
ROOT=${1:-/tmp/out}
mkdir -p "$ROOT"
. benchmarks/gpu_env.sh
session_start wgmma 540
TR="python3 -m torch.distributed.run --standalone"
CP2="--cp 2 --seq-len 8192 --micro-batch 1 --microbatches 2 model.num_layers=2"
pack() { tar czf "$ROOT/wgmma.tar.gz" -C "$WORK" wgmma; }
run() { run_job "$@"; }
CHOICES=""
for c in none all state_bwd state_fwd prepare_bwd output_bwd prepare output_fwd level_affine group_map \
         state_fwd+state_bwd prepare_bwd+state_bwd output_bwd+state_bwd; do CHOICES="$CHOICES --no-wgmma $c"; done

echo "== phase A: $(left) s left"
run bisect_k256 0,1 200 "" $TR --nproc-per-node 2 tools/check_cp_kernels_gpu.py --K 256 --V 512 $CHOICES &
run bisect_k128 2,3 200 "" $TR --nproc-per-node 2 tools/check_cp_kernels_gpu.py --K 128 --V 256 $CHOICES &
wait; pack
PICK=$(python3 benchmarks/wgmma_pick.py "$OUT/bisect_k256.log" "$OUT/bisect_k128.log" 2> "$OUT/pick.txt")
cat "$OUT/pick.txt"; echo "== pick: ${PICK:-none found} ($(left) s left)"
[ -n "$PICK" ] || PICK=all
echo "$PICK" > "$OUT/pick_value.txt"

echo "== phase B"
run cp2_1p3b_2l_pick 0,1 150 "MDN_NO_WGMMA=$PICK" $TR --nproc-per-node 2 tools/bench_model.py --steps 3 \
  --warmup 1 --out "$OUT/cp2_1p3b_2l_pick.json" --config configs/mdn_1.3b.yaml $CP2 &
( run cp2_400m_2l_pick 2,3 110 "MDN_NO_WGMMA=$PICK" $TR --nproc-per-node 2 tools/bench_model.py --steps 3 \
    --warmup 1 --out "$OUT/cp2_400m_2l_pick.json" --config configs/mdn_400m.yaml $CP2
  run wgmma_gpu_test 2 60 "" python3 -m pytest -q -p no:cacheprovider -rfEs tests/gpu/test_wgmma_gpu.py ) &
wait; pack
run bench_kernels_pick 0 200 "" python3 tools/bench_kernels.py --shapes 0,1 --no-fla \
  --variant "MDN_NO_WGMMA=$PICK" --out "$OUT/bench_kernels_pick.json"
pack
echo "== done, $(left) s left"
