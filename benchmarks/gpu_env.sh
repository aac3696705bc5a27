# Sourced by the benchmarks/run_*_gpu.sh scripts on the lent GPU machine (repo root): installs
# the carried wheels (.whl/, if any) into /tmp/site, exposes kernels/ under its import name
# mdn_kernels without installing the package, and prints the card.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/mdn_kernels
export PYTHONPATH=/tmp/shim:/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/triton_cache
# NVLink multicast off (the lent multi-GPU machines require it; harmless elsewhere)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Which machine this is (16-bit whole-model CP was wrong on some lent machines and right on
# others with the same code, session 6): host, GPU serials and UUIDs, topology, clocks, ECC.
# run_suite_gpu.sh and run_cp_kernels_gpu.sh keep it in $OUT/machine.txt.
machine_identity() {
  echo "host $(hostname) kernel $(uname -r) date $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=index,name,driver_version,uuid,serial,pci.bus_id,vbios_version,clocks.max.sm,clocks.max.mem,clocks.sm,ecc.mode.current,ecc.errors.uncorrected.volatile.total,power.limit,persistence_mode,mig.mode.current,compute_mode,pcie.link.gen.current,pcie.link.width.current,temperature.gpu --format=csv
  nvidia-smi -q | grep -iE "product (name|brand|architecture)|board part|gsp firmware|cuda version|vbios" | sort | uniq -c
  nvidia-smi nvlink -s -i 0 2>/dev/null | head -20
  python3 -c "import torch; p = torch.cuda.get_device_properties(0); print('device', p.name, 'sms', p.multi_processor_count, 'mem', p.total_memory, 'l2', getattr(p, 'L2_cache_size', '?'))" 2>/dev/null
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null
  nvidia-smi topo -m 2>/dev/null
  python3 -c "import torch; print('nccl', torch.cuda.nccl.version(), 'cuda', torch.version.cuda)" 2>/dev/null
  env | grep -E '^(NCCL|CUDA|TORCH|PYTORCH|TRITON)_' | sort
}

# Job helpers of the session scripts (run_cp_probe_gpu.sh, run_wgmma_bisect_gpu.sh).
# session_start NAME DEFAULT_BUDGET: logs go to OUT=/tmp/NAME_work/NAME (only a tarball of it goes
# under $OUT: 8 files come back at most), BUDGET = $BUDGET_S or the default (s), T0 = now, and the
# machine's identity into $OUT/machine.txt.
session_start() {
  WORK=/tmp/$1_work OUT=/tmp/$1_work/$1 BUDGET=${BUDGET_S:-$2} T0=$(date +%s)
  mkdir -p "$OUT"
  machine_identity > "$OUT/machine.txt" 2>&1
}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# run_job NAME GPUS LIMIT ENV COMMAND...: ENV is "" or VAR=value; the limit is cut to the budget
# left; prints rc, wall time and the log's RESULT / [cp-check] / tok/s lines
run_job() {
  local name=$1 gpus=$2 lim=$3 envs=$4; shift 4
  local l; l=$(left); (( l - 5 < lim )) && lim=$(( l - 5 ))
  if (( lim < 20 )); then echo "$name: skipped, $l s left"; return; fi
  local t0; t0=$(date +%s)
  ( export CUDA_VISIBLE_DEVICES=$gpus; [ -n "$envs" ] && export "$envs"
    echo "[$(date -u +%FT%TZ)] CUDA_VISIBLE_DEVICES=$gpus $envs $*"
    timeout "$lim" "$@" ) > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s: $(grep -ho 'RESULT.*' "$OUT/$name.log" | head -1 | cut -c1-80)$(grep -h '\[cp-check\]\|tok/s/GPU' "$OUT/$name.log" | tail -2 | tr '\n' ' ')"
}
