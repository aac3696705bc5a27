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
