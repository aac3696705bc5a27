#!/bin/bash
# One node's share of a training job: torchrun with a c10d rendezvous, started once per node by
# `srun --ntasks-per-node=1` (launch/slurm/pretrain.sbatch). Arguments go to launch/pretrain.py.
#
# Everything comes from SLURM's environment; each value can be overridden (the tests run two
# "nodes" on one machine this way):
#   NNODES           node count, or MIN:MAX for an elastic job   (SLURM_JOB_NUM_NODES)
#   NODE_RANK        this node's index; 0 hosts the rendezvous   (SLURM_NODEID)
#   RDZV_HOST        rendezvous host: the first node of the job  (scontrol show hostnames)
#   RDZV_PORT        rendezvous port                             (20000 + job id % 20000)
#   RDZV_ID          rendezvous id                               (SLURM_JOB_ID)
#   NPROC_PER_NODE   training processes on this node             (GPUs of the allocation; with
#                    none: CPU_PROCS_PER_NODE, default 1, and the trainer uses gloo on CPU)
#   MAX_RESTARTS     torchrun restarts of this node's workers after a failure (0); every
#                    restart resumes from the newest checkpoint
#   PYTHON           interpreter with the package (.venv/bin/python of the checkout, else python3)
#
# Signals: SLURM's warning signal (--signal=USR1@N) and SIGTERM must reach the training
# processes, which save a checkpoint and exit 0. torchrun itself would die of SIGUSR1 (it has no
# handler for it) and answers SIGTERM by killing its workers 30 s later, so it runs with both
# ignored; this script forwards them to the workers (SLURM's proctrack usually signals every
# process of the step as well; a second signal is harmless, the trainer only sets a flag).
set -euo pipefail

ROOT=${MDN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

gpus_on_node() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        case "$CUDA_VISIBLE_DEVICES" in
            "" | NoDevFiles | -1) echo 0 ;;
            *) tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c . ;;
        esac
        return
    fi
    if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
        return
    fi
    echo 0
}

nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
if [ -z "${RDZV_HOST:-}" ]; then
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    else
        RDZV_HOST=127.0.0.1
    fi
fi
rdzv_port=${RDZV_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-mdn-local}}

gpus=$(gpus_on_node)
if [ -n "${NPROC_PER_NODE:-}" ]; then
    nproc=$NPROC_PER_NODE
elif [ "$gpus" -gt 0 ]; then
    nproc=$gpus
else
    nproc=${CPU_PROCS_PER_NODE:-1}
fi
export MDN_PROCS_ON_NODE=$nproc
# shellcheck source=launch/slurm/env.sh
source "$ROOT/launch/slurm/env.sh"

# The node that hosts the rendezvous store says so; the others connect to it. (torchrun's guess
# from host names fails where every "node" is the same machine, as in the tests.)
rdzv_conf=join_timeout=${RDZV_JOIN_TIMEOUT:-900}
if [ -n "$node_rank" ]; then
    if [ "$node_rank" = 0 ]; then rdzv_conf+=,is_host=1; else rdzv_conf+=,is_host=0; fi
fi
if [[ "$nnodes" == *:* ]]; then  # elastic: after a node is lost, wait this long for others
    rdzv_conf+=,last_call_timeout=${RDZV_LAST_CALL_TIMEOUT:-30}
fi

echo "[node.sh] $(hostname) node ${node_rank:-?} of $nnodes: $nproc processes" \
     "($gpus GPUs), rendezvous $rdzv_id at $RDZV_HOST:$rdzv_port, OMP_NUM_THREADS=$OMP_NUM_THREADS," \
     "restart ${SLURM_RESTART_COUNT:-0}"

# torchrun with SIGUSR1 and SIGTERM ignored (the ignore survives exec; the trainer installs its
# own handlers). PET_SIGNALS_TO_HANDLE (torchrun's --signals-to-handle, in torch 2.8 and later)
# keeps torchrun from replacing the ignored SIGTERM with its handler, which sends SIGTERM to
# the workers, kills them 30 s later and exits 1; older torchruns still do that.
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the agent's store shared with the workers (torch's
# default since 2.5), a node that joins after a restart waits forever for the round's master
# address: rank 0 publishes it only in its first round (seen with torch 2.13 in
# tests/slurm/test_slurm_launch.py; pytorch/pytorch#135712 reports the same incompatibility
# with restarts). Each round then gets its own store for the workers.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
(
    trap '' USR1 TERM
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="$nnodes" --nproc-per-node="$nproc" \
        --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$rdzv_port" --rdzv-id="$rdzv_id" \
        --rdzv-conf="$rdzv_conf" --max-restarts="${MAX_RESTARTS:-0}" \
        "$ROOT/launch/pretrain.py" "$@"
) &
agent=$!

resender=""
# shellcheck disable=SC2329  # called from the traps below
forward() {  # to the training processes: torchrun's children
    echo "[node.sh] $(hostname): got SIG$1, passing it to the training processes" >&2
    pkill "-$1" -P "$agent" || true
    # A process still starting up ignores the signal (the trainer's handler is not installed
    # yet, e.g. when --time is shorter than the --signal lead): repeat it until torchrun exits.
    if [ -z "$resender" ]; then
        (
            n=0
            while kill -0 "$agent" 2> /dev/null; do
                sleep 1
                n=$(( n + 1 ))
                if [ $(( n % ${SIGNAL_REPEAT_S:-10} )) = 0 ]; then pkill "-$1" -P "$agent" || true; fi
            done
        ) &
        resender=$!
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives; wait again until torchrun has exited.
status=0
while true; do
    wait "$agent" && status=0 || status=$?
    kill -0 "$agent" 2> /dev/null || break
done
if [ -n "$resender" ]; then kill "$resender" 2> /dev/null || true; fi
exit "$status"
