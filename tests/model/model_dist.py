"""Run a function on N real gloo processes (torch.multiprocessing spawn) and collect results."""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, outdir, args, backend="gloo"):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(outdir, f"{rank}.pt"))
    finally:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _jobs(rank, world, jobs):
    """Several worker functions in the same processes (saves process start-up, ~5 s each)."""
    from megatron.core import parallel_state
    out = []
    for fn, args in jobs:
        out.append(fn(rank, world, *args))
        parallel_state.destroy_model_parallel()
    return out


def run_jobs(world: int, jobs: list, backend: str = "gloo") -> list:
    """jobs: [(fn, args), ...]; returns, per job, the list of per-rank results."""
    per_rank = run_ranks(_jobs, world, jobs, backend=backend)
    return [[per_rank[r][j] for r in range(world)] for j in range(len(jobs))]


def run_ranks(fn, world: int, *args, backend: str = "gloo"):
    """fn(rank, world, *args) on `world` processes; returns the list of their return values."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(fn, world, free_port(), d, args, backend), nprocs=world,
                           start_method="spawn", join=True)
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world)]
