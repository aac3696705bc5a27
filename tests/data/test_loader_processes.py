"""The DP split across real processes (gloo): ranks' batches together are the one-process batches."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_helpers import corpus, write_jsonl

from mdn_scale.data import DataConfig, build_train_loader, make_shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg_dict, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = build_train_loader(DataConfig(**cfg_dict), dp_rank=rank, dp_size=world)
        mine = torch.stack([next(loader)["tokens"] for _ in range(3)])  # [3, B, T]
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        states = [None] * world
        dist.all_gather_object(states, loader.state_dict())
        if rank == 0:
            torch.save({"tokens": torch.stack(gathered), "same_state": all(s == states[0] for s in states)}, out)
    finally:
        dist.destroy_process_group()


def test_dp_ranks_in_processes_match_one_process(tmp_path):
    make_shards([write_jsonl(tmp_path / "in.jsonl", corpus(60, seed=2))], str(tmp_path / "d"), shard_size_mb=0.004, progress=False)
    world, B, T = 2, 2, 24
    cfg = dict(datasets=[str(tmp_path / "d")], seq_len=T, micro_batch=B, seed=4, prefetch=2)
    out = str(tmp_path / "out.pt")
    mp.spawn(_worker, args=(world, _free_port(), cfg, out), nprocs=world, join=True)
    res = torch.load(out, weights_only=True)
    assert res["same_state"]
    tokens = res["tokens"]  # [rank, step, B, T]
    # one process, dp=1: global sequence j is row j; rank r's row i of step s is j = (s·B + i)·world + r
    one = build_train_loader(DataConfig(**{**cfg, "micro_batch": 1}))
    seqs = [next(one)["tokens"][0] for _ in range(3 * B * world)]
    for r in range(world):
        for s in range(3):
            for i in range(B):
                assert torch.equal(tokens[r, s, i], seqs[(s * B + i) * world + r])
