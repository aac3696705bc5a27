"""`srun python launch/pretrain.py` (one process per rank, no torchrun; launch/slurm/ uses torchrun): the ranks
come from SLURM's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)."""

import os
import subprocess
import sys

from train_dist_util import free_port

PROBE = """
from mdn_scale.train.distributed import init_distributed, shutdown, world_size_from_env
import torch.distributed as dist
n = world_size_from_env()
layout = init_distributed(tensor=2, pipeline=1, context=1)
t = __import__("torch").tensor([float(layout.rank)])
dist.all_reduce(t)
print("RESULT", n, layout.rank, layout.world, layout.tp_rank, layout.dp, int(t.item()))
shutdown()
"""


def test_slurm_style_ranks():
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        result = [line for line in out.splitlines() if line.startswith("RESULT")]
        # world size seen before init, rank, world, TP rank, DP size, sum of ranks over the world
        assert result == [f"RESULT 2 {rank} 2 {rank} 1 1"], out[-2000:]
