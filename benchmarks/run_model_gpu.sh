#!/usr/bin/env bash
# Whole-model training benchmark (issue 9: tools/bench_model.py) in one device call on a 4-GPU
# machine. Usage (repo root, .whl carried with megatron-core 0.16.1, fla-core 0.6.0 and the
# trainer's needs, as for run_validation_gpu.sh):
#   bash benchmarks/run_model_gpu.sh "$OUT"
# Phases (PHASES="single scale pp" by default, in that order; also scale2):
#   single  1-GPU cases side by side, one lane per GPU (CUDA_VISIBLE_DEVICES): MDN, GDN (our
#           layer, momentum off), Megatron-core's GatedDeltaNet (FLA) at 400M and 1.3B, a
#           Transformer at 400M, and the 24-layer PP = 1 reference; all at 4K tokens.
#   scale   DP = 2 and TP = 2 (400M; TP = 4 does not divide 6 heads), then CP weak scaling of
#           the whole model: seq_len = 4·4096 with CP = 4 (each GPU holds 4K tokens of every
#           sequence, as CP = 1 at 4096 does), 400M, then 1.3B.
#   pp      PP = 2 with 1F1B and interleaved (vp 2) side by side, then PP = 4 1F1B, then PP = 4
#           interleaved (vp 2) if time is left: 24 layers
#           (21 do not split), 8 microbatches; losses against the PP = 1 reference of `single`.
#   scale2  CP = 2 weak scaling (400M and 1.3B side by side), DP = 4 (for a second call).
# Every case has a time limit, and no case starts with less than MIN_LEFT seconds of the
# DEADLINE (540 s from the start) left, so the call ends inside the tool's 10 minutes.
# Everything lands in $OUT/model_bench.tar.gz, re-made after every round (the tool returns at
# most 8 files; a cut call keeps what finished). tools/summarize_model_bench.py prints the table.
set -uo pipefail
OUT=${1:-/tmp/out}
R=$OUT/model_bench
mkdir -p "$R"
START=$SECONDS
DEADLINE=${DEADLINE:-540}
MIN_LEFT=${MIN_LEFT:-75}
T_CASE=${T_CASE:-200}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-3}
. benchmarks/gpu_env.sh
export TRITON_CACHE_AUTOTUNING=1  # autotuning results on disk: later processes skip FLA's ~150 s
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$R/versions.txt"
python3 -c "import fla; print('fla', fla.__version__)" >>"$R/versions.txt" 2>&1

M400=configs/mdn_400m.yaml; G400=configs/gdn_400m.yaml; T400=configs/transformer_400m.yaml
M13=configs/mdn_1.3b.yaml

left() { echo $((DEADLINE - (SECONDS - START))); }

run_case() {  # run_case NAME GPUS ARGS... : tools/bench_model.py under torchrun on GPUS
  local name=$1 gpus=$2; shift 2
  local n; n=$(awk -F, '{print NF}' <<<"$gpus")
  local cap=${CASE_LIMIT:-$T_CASE}
  local limit; limit=$(( $(left) - 10 )); [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$(left)" -lt "$MIN_LEFT" ]; then echo "skip $name: $(left) s left" | tee "$R/$name.log"; return; fi
  ( export CUDA_VISIBLE_DEVICES=$gpus
    timeout "$limit" python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
      tools/bench_model.py --out "$R/$name.json" --steps "$STEPS" --warmup "$WARMUP" "$@" \
      >"$R/$name.log" 2>&1
    echo "exit $? after $((SECONDS - START)) s" >>"$R/$name.log" )
}
case_() { run_case "$@" & }  # in the background (cases of one round on disjoint GPUs)

round_done() {  # wait for the round's cases, then pack everything so far
  wait
  tar -czf "$OUT/model_bench.tar.gz" -C "$OUT" model_bench
  echo "== round done at $((SECONDS - START)) s: $(ls "$R"/*.json 2>/dev/null | wc -l) results"
}

PP_ARGS=(--micro-batch 1 --microbatches 8 model.num_layers=24)
for phase in ${PHASES:-single scale pp}; do
  case $phase in
  single)  # one lane of cases per GPU; Megatron GDN's lanes carry FLA's cold autotuning (~150 s)
    ( run_case mdn_400m 0 --config $M400 --micro-batch 4
      run_case mdn_1p3b 0 --config $M13 --micro-batch 2 --microbatches 2
      run_case pp1_400m_24l 0 --config $M400 "${PP_ARGS[@]}" ) &
    ( run_case gdn_400m 1 --config $G400 --micro-batch 4
      run_case gdn_1p3b 1 --config $M13 --mixer gdn --micro-batch 2 --microbatches 2
      run_case transformer_400m 1 --config $T400 --micro-batch 4 ) &
    CASE_LIMIT=${T_FLA:-300} case_ megatron_gdn_400m 2 --config $G400 --mixer megatron_gdn --micro-batch 4
    CASE_LIMIT=${T_FLA:-300} case_ megatron_gdn_1p3b 3 --config $M13 --mixer megatron_gdn --micro-batch 2 --microbatches 2
    round_done ;;
  scale)
    case_ dp2_400m 0,1 --config $M400 --micro-batch 4
    case_ tp2_400m 2,3 --config $M400 --micro-batch 4 --tp 2
    round_done
    case_ cp4_400m 0,1,2,3 --config $M400 --micro-batch 4 --cp 4 --seq-len 16384
    round_done
    case_ cp4_1p3b 0,1,2,3 --config $M13 --micro-batch 2 --microbatches 2 --cp 4 --seq-len 16384
    round_done ;;
  scale2)  # not in the default set: CP = 2 weak scaling, DP = 4
    case_ cp2_400m 0,1 --config $M400 --micro-batch 4 --cp 2 --seq-len 8192
    case_ cp2_1p3b 2,3 --config $M13 --micro-batch 2 --microbatches 2 --cp 2 --seq-len 8192
    round_done
    case_ dp4_400m 0,1,2,3 --config $M400 --micro-batch 4
    round_done ;;
  pp)
    case_ pp2_1f1b_400m_24l 0,1 --config $M400 --pp 2 "${PP_ARGS[@]}"
    case_ pp2_vp2_400m_24l 2,3 --config $M400 --pp 2 --vp 2 "${PP_ARGS[@]}"
    round_done
    case_ pp4_1f1b_400m_24l 0,1,2,3 --config $M400 --pp 4 "${PP_ARGS[@]}"
    round_done
    case_ pp4_vp2_400m_24l 0,1,2,3 --config $M400 --pp 4 --vp 2 "${PP_ARGS[@]}"   # if time is left
    round_done ;;
  esac
done
python3 tools/summarize_model_bench.py "$R" | tee "$R/summary.txt"
tar -czf "$OUT/model_bench.tar.gz" -C "$OUT" model_bench
