#!/bin/bash
# Install what tests/slurm needs: Debian's slurm-wlm (slurmctld, slurmd, the client commands)
# and munge. Idempotent: does nothing when the programs are already there. Starts nothing (the
# test runs its own cluster from a temporary folder and stops it by process id) and leaves the
# distribution's /etc/slurm and /etc/munge alone.
#
#   tools/ci_setup_slurm.sh          (as root, or with sudo available; Debian or Ubuntu)
set -euo pipefail

need=(slurmctld slurmd munged sbatch srun scontrol squeue scancel sinfo)
missing=()
for p in "${need[@]}"; do
    command -v "$p" > /dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "ci_setup_slurm: slurm and munge already installed"
    exit 0
fi
echo "ci_setup_slurm: missing ${missing[*]}: installing slurm-wlm and munge"

if ! command -v apt-get > /dev/null 2>&1; then
    echo "ci_setup_slurm: no apt-get here; install SLURM (slurmctld, slurmd, client) and munge" \
         "with this system's package manager" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo > /dev/null 2>&1; then sudo=(sudo -n); else
        echo "ci_setup_slurm: needs root (or sudo) to install packages" >&2
        exit 1
    fi
fi
# The packages' scripts would start the daemons with the default config; there is no init
# system in a CI container and nothing should start, so tell invoke-rc.d not to.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" > /dev/null
    "${sudo[@]}" chmod +x "$policy"
    made_policy=1
fi
trap '[ "$made_policy" = 1 ] && "${sudo[@]}" rm -f "$policy"' EXIT
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
    slurm-wlm munge
echo "ci_setup_slurm: installed $(slurmd -V 2> /dev/null || /usr/sbin/slurmd -V)"
