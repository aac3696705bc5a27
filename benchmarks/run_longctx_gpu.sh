#!/usr/bin/env bash
# Long-context memory on the lent GPU machine, in ONE device call on a 4-GPU H100 machine
# (about 9 minutes; repo root, .whl carried with megatron-core & co, see run_deepspeed_gpu.sh):
#   bash benchmarks/run_longctx_gpu.sh "$OUT"
# Phase "a" (side by side, disjoint GPUs):
#   GPU 0     tests/gpu/test_longctx_memory_gpu.py -k 1gpu  (estimate within 15% of the measured peak)
#   GPU 1     benchmarks/longctx_search.py --gpus 1          (longest 1.3B context on one GPU)
#   GPUs 2,3  tests/gpu/test_longctx_memory_gpu.py -k 2gpu  (CP = 2 with ZeRO-1, TP = 2)
# Phase "b": benchmarks/longctx_search.py --gpus 4 (CP = 4) with the time that is left.
# Each search starts at the estimator's longest, rounded down to the ladder 2^k, 3·2^(k-1),
# and steps up on success / down on out-of-memory; every attempt is a torchrun of
# benchmarks/longctx_memory.py (2 optimizer steps) under a time limit.
# Everything lands in $OUT/longctx.tar.gz (re-packed after each phase: a cut call keeps the earlier
# ones): versions.json (card, driver, torch, triton, megatron-core, date, command), per job
# a log, gpu_tests.json / longctx_<case>.json, search_g{1,4}.json (every attempt with its command).
# Knobs: PHASES="a b", T_A (phase a limit, s), TOTAL (whole-call budget, s), ATT1/ATT4 (attempts),
# T_ATT1/T_ATT4 (s per attempt), START1/START4 (first length, e.g. to resume), CASE_TIMEOUT (s per
# memory case), LOSS_CHUNK (model.loss_chunk_tokens of the searches).
set -uo pipefail
OUT=${1:-/tmp/out}
R=$OUT/longctx
mkdir -p "$R"
T0=$(date +%s)
TOTAL=${TOTAL:-535}
. benchmarks/gpu_env.sh
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 - "$R/versions.json" "$0 $*" <<'EOF'
import datetime, json, subprocess, sys
from importlib.metadata import version, PackageNotFoundError
import torch, triton
def v(n):
    try:
        return version(n)
    except PackageNotFoundError:
        return None
def out(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
smi = out(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]).splitlines()
git = out(["git", "rev-parse", "HEAD"]) or None
meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv[2], "cards": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "megatron_core": v("megatron-core"), "python": sys.version.split()[0],
        "git_commit": git}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
print(meta)
EOF

pack() { tar -czf "$OUT/longctx.tar.gz" -C "$OUT" longctx; }
left() { echo $((TOTAL - ($(date +%s) - T0))); }
job() {  # job NAME GPUS LIMIT_S CMD... : in the background on the given GPUs, output to NAME.log
  local name=$1 gpus=$2 limit=$3; shift 3
  mkdir -p "$R/$name"
  ( export CUDA_VISIBLE_DEVICES=$gpus MDN_RESULTS_DIR=$R/$name MDN_LONGCTX_TIMEOUT=${CASE_TIMEOUT:-150}
    echo "[$(date -u +%FT%TZ)] CUDA_VISIBLE_DEVICES=$gpus $*" >"$R/$name.log"
    timeout -k 10 "$limit" "$@" >>"$R/$name.log" 2>&1; echo "exit $?" >>"$R/$name.log" ) &
}
search() {  # search NAME GPUS N ATTEMPTS T_ATTEMPT BUDGET START
  local name=$1 gpus=$2 n=$3 att=$4 tatt=$5 budget=$6 start=$7
  job "$name" "$gpus" $((budget + 15)) python3 benchmarks/longctx_search.py --model configs/mdn_1.3b.yaml \
    --gpus "$n" --out "$R/$name.json" --max-attempts "$att" --timeout "$tatt" --budget-s "$budget" \
    --loss-chunk-tokens "${LOSS_CHUNK:-4096}" ${start:+--start $start}
}

for phase in ${PHASES:-a b}; do
  case $phase in
  a)
    TA=${T_A:-250}
    job mem_1gpu 0 "$TA" python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_longctx_memory_gpu.py -k 1gpu
    [ "$NGPU" -ge 2 ] && search search_g1 1 1 "${ATT1:-2}" "${T_ATT1:-150}" $((TA - 15)) "${START1:-}"
    [ "$NGPU" -ge 4 ] && job mem_2gpu 2,3 "$TA" python3 -m pytest -q -s -p no:cacheprovider \
      tests/gpu/test_longctx_memory_gpu.py -k 2gpu
    wait ;;
  b)
    B=$(( $(left) - 20 ))
    if [ "$NGPU" -ge 4 ] && [ "$B" -gt 60 ]; then
      search search_g4 0,1,2,3 4 "${ATT4:-3}" "${T_ATT4:-150}" "$B" "${START4:-}"
      wait
    else
      echo "phase b skipped: $NGPU GPUs, $B s left" | tee "$R/search_g4.skipped"
    fi ;;
  esac
  pack
done
grep -h "LONGCTX_MEMORY\|fits\|does not fit\|timeout\|failed\|passed\|longest\|exit" "$R"/*.log | cut -c1-400
echo "total $(( $(date +%s) - T0 )) s"
