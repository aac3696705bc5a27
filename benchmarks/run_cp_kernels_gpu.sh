#!/usr/bin/env bash
# The CP op's kernels on the GPU (session 6: whole-model CP was wrong on some H100 machines and
# right on others, same code): tools/check_cp_kernels_gpu.py at the 400M and 1.3B mixer shapes
# (bf16 q/k/v, fp32 gates, packed documents) at world 1 (several groups: tree + INIT_ONLY pass),
# then compute-sanitizer memcheck at a small shape (one process), CP = 2 and 4, racecheck.
#   bash benchmarks/run_cp_kernels_gpu.sh "$OUT"      (4 GPUs; results: $OUT/cp_kernels/*.log)
set -uo pipefail
OUT=${1:-/tmp/out}/cp_kernels
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
machine_identity > "$OUT/machine.txt" 2>&1
NGPU=$(nvidia-smi -L | wc -l)
TR="python3 -m torch.distributed.run --standalone"
run() {  # name limit command...
  local name=$1 lim=$2; shift 2
  local t0=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s: $(grep -ho 'RESULT.*' "$OUT/$name.log" | cut -c1-60; grep -h 'ERROR SUMMARY' "$OUT/$name.log" | head -1)"
}
# which kind of machine this is: the 1.3B trainer step at CP = 2 (2 layers) gave NaN grad norms
# on the machines where CP was wrong (plans p, t), 10.7 where it was right (plan r); on GPUs 2, 3
# beside the one-GPU checks (the step also runs and records the trainer's CP startup check)
[ "$NGPU" -ge 4 ] && (CUDA_VISIBLE_DEVICES=2,3 run bench_cp2_1p3b_2l 110 $TR --nproc-per-node 2 \
  tools/bench_model.py --steps 3 --warmup 1 --out "$OUT/bench_cp2_1p3b_2l.json" --config configs/mdn_1.3b.yaml \
  --cp 2 --seq-len 8192 --micro-batch 1 --microbatches 2 model.num_layers=2) &
export CUDA_VISIBLE_DEVICES=0
run w1_k128 120 python3 tools/check_cp_kernels_gpu.py --K 128 --V 256 --group-chunks 8
run w1_k256 60 python3 tools/check_cp_kernels_gpu.py --K 256 --V 512 --group-chunks 8
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
SMALL="--T 1024 --H 1 --group-chunks 2 --docs 0,300,301"
# no caching allocator under memcheck: an access past a tensor is then past its allocation
MC="env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck --print-limit 20"
GL="--dist-backend gloo"   # NCCL's init hung under the sanitizer (session 6)
[ -n "$SAN" ] || echo "no compute-sanitizer on this machine"
[ -n "$SAN" ] && run memcheck_k128 100 $MC python3 tools/check_cp_kernels_gpu.py --K 128 --V 256 $SMALL $GL
[ -n "$SAN" ] && run memcheck_k256 100 $MC python3 tools/check_cp_kernels_gpu.py --K 256 --V 512 $SMALL $GL
wait
unset CUDA_VISIBLE_DEVICES
grep -h "grad_norms" -A4 "$OUT/bench_cp2_1p3b_2l.json" 2>/dev/null | tr -d ' \n'; echo
grep -h "\[cp-check\]" "$OUT/bench_cp2_1p3b_2l.log"   # the layer-0 startup check it ran first
[ "$NGPU" -ge 2 ] && run cp2_k128 60 $TR --nproc-per-node 2 tools/check_cp_kernels_gpu.py --K 128 --V 256
[ "$NGPU" -ge 2 ] && run cp2_k256 60 $TR --nproc-per-node 2 tools/check_cp_kernels_gpu.py --K 256 --V 512
[ "$NGPU" -ge 4 ] && run cp4_k128 60 $TR --nproc-per-node 4 tools/check_cp_kernels_gpu.py --K 128 --V 256
[ "$NGPU" -ge 4 ] && run cp4_k256 60 $TR --nproc-per-node 4 tools/check_cp_kernels_gpu.py --K 256 --V 512
[ -n "$SAN" ] && run racecheck_k128 80 "$SAN" --tool racecheck --print-limit 20 python3 tools/check_cp_kernels_gpu.py --K 128 --V 256 $SMALL $GL
