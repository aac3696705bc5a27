#!/usr/bin/env bash
# Session 7, one 4-GPU call (nvidia-h100-x4, carry .whl): is 16-bit whole-model CP right on this
# lent machine, and does Triton's Hopper MMA path (MMAv3 = async wgmma) decide it?
#   BUDGET_S=560 bash benchmarks/run_cp_probe_gpu.sh "$OUT"        (results: $OUT/cp_probe.tar.gz)
#
# Why MMAv3: the fault depends on the machine, not on the code (BENCHMARKS.md, session 6), and
# plans o and p gave bit-identical wrong numbers, so it is deterministic per machine: a timing-
# dependent hazard in generated code fits that, and Triton 3.4-3.7.0 is known to mis-compile
# some Hopper dot patterns (DESIGN §9). DISABLE_MMA_V3=1 makes Triton use the synchronous MMAv2
# path instead (a cache-invalidating variable, so both variants can share the cache).
#
# Phase A (GPUs 0,1 and 2,3 side by side): the 1.3B trainer step at CP = 2 (2 layers, 2 × 8192
# tokens; NaN on the wrong machines of plans p and t), with its CP startup check, as is and with
# DISABLE_MMA_V3=1. Phase B depends on phase A's verdict:
#   wrong machine: the op alone (tools/check_cp_kernels_gpu.py) at world 1 and CP = 2, K = 256
#     and 128, both variants side by side, then the 400M CP = 2 step both ways;
#   right machine: issue 9's missing numbers: PP = 2 (1F1B, 24 layers) on GPUs 0,1, the 1.3B
#     step on one GPU (MDN, then the GDN mode) on GPU 2, the 400M step as is and with
#     DISABLE_MMA_V3=1 on GPU 3 (what the variant would cost).
set -uo pipefail
ROOT=${1:-/tmp/out}
mkdir -p "$ROOT"
. benchmarks/gpu_env.sh
session_start cp_probe 560
export PATH=/tmp/site/bin:$PATH
NOMMA3="DISABLE_MMA_V3=1"
TR="python3 -m torch.distributed.run --standalone"
BM="tools/bench_model.py"
CP2="--cp 2 --seq-len 8192 --micro-batch 1 --microbatches 2 model.num_layers=2"

pack() { tar czf "$ROOT/cp_probe.tar.gz" -C "$WORK" cp_probe; }
run() { run_job "$@"; }
step13() { run "$1" "$2" 150 "$3" $TR --nproc-per-node 2 $BM --steps 3 --warmup 1 --out "$OUT/$1.json" \
  --config configs/mdn_1.3b.yaml $CP2; }
step400() { run "$1" "$2" 110 "$3" $TR --nproc-per-node 2 $BM --steps 3 --warmup 1 --out "$OUT/$1.json" \
  --config configs/mdn_400m.yaml $CP2; }
check() {  # name gpus env world K V
  if [ "$4" = 1 ]; then run "$1" "$2" 110 "$3" python3 tools/check_cp_kernels_gpu.py --K "$5" --V "$6" --group-chunks 8
  else run "$1" "$2" 90 "$3" $TR --nproc-per-node "$4" tools/check_cp_kernels_gpu.py --K "$5" --V "$6"; fi
}

echo "== phase A: $(left) s left"
step13 cp2_1p3b_2l 0,1 "" & step13 cp2_1p3b_2l_nomma3 2,3 "$NOMMA3" & wait
pack
VERDICT=$(python3 - "$OUT/cp2_1p3b_2l.json" <<'EOF'
import json, math, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:  # no JSON: the step did not finish
    print("unknown"); sys.exit()
chk, norms = r.get("cp_check") or {}, r.get("grad_norms") or []
bad = (chk.get("passed") is False) or any(not math.isfinite(n) or n > 1e3 for n in norms)
print("wrong" if bad else "right")
EOF
)
echo "== machine verdict from the default step: $VERDICT ($(left) s left)"
echo "$VERDICT" > "$OUT/verdict.txt"
if [ "$VERDICT" = right ]; then
  echo "== phase B (right machine): issue 9"
  run pp2_1f1b_400m_24l 0,1 400 "" $TR --nproc-per-node 2 $BM --steps 5 --warmup 3 --out "$OUT/pp2_1f1b_400m_24l.json" \
    --config configs/mdn_400m.yaml --pp 2 --micro-batch 1 --microbatches 8 model.num_layers=24 &
  ( run mdn_1p3b 2 180 "" $TR --nproc-per-node 1 $BM --steps 5 --warmup 3 --out "$OUT/mdn_1p3b.json" \
      --config configs/mdn_1.3b.yaml --micro-batch 2 --microbatches 2
    run gdn_1p3b 2 180 "" $TR --nproc-per-node 1 $BM --steps 5 --warmup 3 --out "$OUT/gdn_1p3b.json" \
      --config configs/mdn_1.3b.yaml --mixer gdn --micro-batch 2 --microbatches 2 ) &
  ( run mdn_400m 3 150 "" $TR --nproc-per-node 1 $BM --steps 5 --warmup 3 --out "$OUT/mdn_400m.json" \
      --config configs/mdn_400m.yaml --micro-batch 4
    run mdn_400m_nomma3 3 150 "$NOMMA3" $TR --nproc-per-node 1 $BM --steps 5 --warmup 3 \
      --out "$OUT/mdn_400m_nomma3.json" --config configs/mdn_400m.yaml --micro-batch 4 ) &
  wait
else
  echo "== phase B ($VERDICT machine): the op alone, MMAv3 on and off"
  check w1_k256 0 "" 1 256 512 & check w1_k256_nomma3 1 "$NOMMA3" 1 256 512 &
  check w1_k128 2 "" 1 128 256 & check w1_k128_nomma3 3 "$NOMMA3" 1 128 256 & wait; pack
  check cp2_k256 0,1 "" 2 256 512 & check cp2_k256_nomma3 2,3 "$NOMMA3" 2 256 512 & wait; pack
  check cp2_k128 0,1 "" 2 128 256 & check cp2_k128_nomma3 2,3 "$NOMMA3" 2 128 256 & wait; pack
  step400 cp2_400m_2l 0,1 "" & step400 cp2_400m_2l_nomma3 2,3 "$NOMMA3" & wait
fi
pack
echo "== done, $(left) s left"
