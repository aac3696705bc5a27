"""Process groups: torch.distributed (NCCL on GPUs, gloo on CPU) and Megatron's parallel_state."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """This rank's place in the tp-cp-ep-dp-pp grid (Megatron's order, DESIGN.md §7)."""

    world: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_logger(self) -> bool:
        return self.rank == 0

    def as_dict(self) -> dict:
        return {"world": self.world, "tp": self.tp, "pp": self.pp, "cp": self.cp, "dp": self.dp}


def world_size_from_env() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def init_distributed(*, tensor: int, pipeline: int, context: int, timeout_min: int = 30,
                     virtual_pipeline: int | None = None) -> Layout:
    """Start torch.distributed from torchrun's environment (or a single process without one)
    and build Megatron's groups. NCCL when CUDA GPUs are present, gloo otherwise.
    virtual_pipeline: model chunks per pipeline rank (Megatron's interleaved schedule; None = 1)."""
    from megatron.core import parallel_state as ps

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
            # one task per GPU started by srun without torchrun (`srun python launch/pretrain.py`
            # with MASTER_ADDR/PORT set; launch/slurm/ uses torchrun instead): SLURM numbers the ranks
            os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                              LOCAL_RANK=os.environ["SLURM_LOCALID"])
        if "RANK" not in os.environ:  # plain `python launch/pretrain.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"))
            if "MASTER_PORT" not in os.environ:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
            context_parallel_size=context, order="tp-cp-ep-dp-pp",
            virtual_pipeline_model_parallel_size=virtual_pipeline,
            create_gloo_process_groups=False)
    return Layout(
        world=dist.get_world_size(), rank=dist.get_rank(), tp=tensor, pp=pipeline, cp=context,
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), device=device)


def seed_everything(seed: int, layout: Layout) -> None:
    """Same seed on every rank for weights (Megatron's CPU init draws the full tensor and splits
    it, so weights do not depend on the layout); Megatron's CUDA RNG tracker on GPUs."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if layout.device.type == "cuda":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
