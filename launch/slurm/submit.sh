#!/bin/bash
# Submit launch/slurm/pretrain.sbatch, optionally as a chain of jobs for a run longer than the
# partition's time limit:
#
#   launch/slurm/submit.sh [--chain N] [sbatch options ...] -- [pretrain.py arguments ...]
#   launch/slurm/submit.sh --chain 6 --nodes=2 --time=4:00:00 -- --config configs/mdn_400m.yaml
#
# Job k+1 depends on job k with afterany (it starts once k has ended however it ended) and
# resumes from the newest checkpoint; a job that finds train.steps reached exits at once, so
# extra links cost a few seconds each. With self-requeue (the default, MDN_REQUEUE=1) one job
# is usually enough; a chain is for clusters that forbid requeue (JobRequeue=0, or jobs that
# must not keep their place), or as a safety net behind it. Prints the job ids, one a line.
set -euo pipefail

chain=1
sbatch_opts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --chain) chain=$2; shift 2 ;;
        --chain=*) chain=${1#--chain=}; shift ;;
        --) shift; break ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done
if ! [[ "$chain" =~ ^[1-9][0-9]*$ ]]; then
    echo "submit.sh: --chain needs a positive job count, got '$chain'" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "${MDN_LOG_ROOT:-logs/slurm}"
previous=""
for _ in $(seq "$chain"); do
    dep=()
    if [ -n "$previous" ]; then dep=(--dependency="afterany:$previous" --kill-on-invalid-dep=yes); fi
    previous=$(sbatch --parsable "${dep[@]}" "${sbatch_opts[@]}" "$here/pretrain.sbatch" "$@")
    previous=${previous%%;*}
    echo "$previous"
done
