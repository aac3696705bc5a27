#!/usr/bin/env bash
# DeepSpeed vs Megatron backend, 1.3B MDN, on the lent GPU machine (not run yet: written on a
# machine without a GPU). The machine has no network: carry wheels in .whl/, built here with
#   DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed==0.19.8 hjson msgpack ninja py-cpuinfo \
#       einops pydantic pydantic-core annotated-types typing-inspection megatron-core==0.16.1 ...
# (pydantic-core is a compiled wheel: download the cp312 manylinux one for the device's Python).
# Usage (repo root): CASES=ds_z3_offload_1,megatron_1 bash benchmarks/run_deepspeed_gpu.sh "$OUT"
# Each device call has 10 minutes: split the cases over calls (1 GPU, then 2, then 4 GPUs).
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh
# TESTS=1: the GPU equivalence tests of the backend instead of the benchmark (one device call)
if [ -n "${TESTS:-}" ]; then
  timeout 580 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_deepspeed_gpu.py 2>&1 | tee "$OUT/deepspeed_gpu_tests.log"
  exit
fi
timeout 580 python3 tools/bench_deepspeed.py --out "$OUT/deepspeed_1p3b.json" \
  --cases "${CASES:-megatron_1,ds_z3_offload_1}" --steps "${STEPS:-6}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/deepspeed_1p3b.log"
