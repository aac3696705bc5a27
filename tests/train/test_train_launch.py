"""launch/pretrain.py started the way launch/slurm_pretrain.sh starts it: one process per rank
with SLURM's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and no torchrun."""

import json
import os
import subprocess
import sys

import pytest

from train_dist_util import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_slurm_style_ranks(tmp_path):
    import json as json_pkg

    from mdn_scale.data import make_shards

    shards = str(tmp_path / "shards")
    make_shards([os.path.dirname(json_pkg.__file__)], shards, progress=False)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config",
             os.path.join(ROOT, "configs", "tiny.yaml"), f"data.datasets=[{shards}]",
             "data.validation_fraction=0", "train.steps=2", "train.seq_len=64", "model.seq_len=64",
             "train.global_batch=4", "train.micro_batch=2", "parallel.tensor=2", "eval.interval=0",
             "logging.interval=1", f"logging.dir={tmp_path}/log", "checkpoint.interval=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert "done at step 2" in outs[0] and "done at step 2" not in outs[1]  # rank 0 reports
