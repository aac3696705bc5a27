#!/bin/bash
# Multi-node training under SLURM: one task per GPU, started by srun (no torchrun), so SLURM's
# warning signal reaches the training processes themselves: 5 minutes before the time limit
# every rank gets SIGUSR1, saves a checkpoint and exits; the job requeues and resumes from it.
#
#   sbatch --nodes=4 launch/slurm_pretrain.sh --config configs/400m.yaml data.datasets=[...]
#
# Arguments go to launch/pretrain.py. Set GPUS_PER_NODE for nodes with other than 8 GPUs, and
# PYTHON for the interpreter of the environment (default: .venv/bin/python of the checkout).
# Not yet run on a SLURM cluster at the time of writing.
#SBATCH --job-name=mdn-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# exec: the task *is* the Python process, so SIGUSR1/SIGTERM go straight to its handler.
status=0
srun --kill-on-bad-exit=1 bash -c "exec $PYTHON launch/pretrain.py $(printf '%q ' "$@")" || status=$?
# A run stopped by the warning signal exits 0 before its last step: requeue it to go on.
if [ $status -eq 0 ] && grep -q "stopped by signal" "slurm-${SLURM_JOB_ID}.out" 2>/dev/null; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $status
