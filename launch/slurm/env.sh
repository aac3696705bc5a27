# Environment for training processes on a cluster, sourced by launch/slurm/node.sh on every node.
# Every value is a default: a variable already set in the job's environment (exported before
# sbatch, or by the site's modules) wins. docs/multinode.md explains each choice.

# --- NCCL --------------------------------------------------------------------------------------
# NVLink SHARP / multicast off. Safe everywhere (NCCL falls back to its ring and tree algorithms,
# a few percent slower for large all-reduces on NVSwitch systems); on shared hosts a program that
# uses multicast objects has put GPUs out of service, and multicast needs driver, fabric manager
# and container support that many clusters lack. Turn on (=1) only where the site says it works.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
# Errors and warnings only; INFO (plus NCCL_DEBUG_SUBSYS=INIT,NET) when a job hangs at start.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A failed or timed-out collective ends the process (and so the job, which then requeues)
# instead of hanging until the wall-clock limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Site-specific, left to the cluster (examples, not defaults):
#   NCCL_SOCKET_IFNAME=ib0 or =^lo,docker   the interface for NCCL's bootstrap and socket traffic
#   NCCL_IB_HCA=mlx5                        the InfiniBand adapters to use
#   NCCL_IB_GID_INDEX=3                     RoCE clusters
#   FI_PROVIDER=efa                         AWS EFA (with the aws-ofi-nccl plugin)

# --- CUDA / Megatron ---------------------------------------------------------------------------
# One hardware queue per device: Megatron relies on it to order tensor-parallel communication
# kernels before the compute that overlaps them (it warns when sequence parallelism runs without).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# --- threads -----------------------------------------------------------------------------------
# The CPUs SLURM gave this node's task, shared by the node's training processes. Without this
# every process starts one OpenMP thread per core of the machine and they fight over the cores.
_cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
_procs=${MDN_PROCS_ON_NODE:-1}
_threads=$(( _cpus / _procs ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( _threads > 0 ? _threads : 1 ))}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
unset _cpus _procs _threads

# --- logging -----------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1   # log lines reach the job's files as they happen, also on a crash
