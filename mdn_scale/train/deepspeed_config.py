"""The ``deepspeed:`` config section and its checks (imports nothing from DeepSpeed).

Used when ``train.backend: deepspeed``. The DeepSpeed engine wraps the same Megatron-built model
with TP = PP = 1; ZeRO partitions over the dp×cp group (the CP ranks of one replica hold the same
parameters, DESIGN.md §7). Everything else (data, schedule, logging, the loss) is the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer states (and the fp32 master copy) in CPU memory
    offload_param: bool = False  # ZeRO 3 only: parameters live in CPU memory between uses
    # With offload_optimizer: DeepSpeed's CPUAdam (a compiled op, built on first use; needs a C++
    # compiler) instead of torch's AdamW. Same AdamW math, not bit-identical to the Megatron backend.
    cpu_adam: bool = False
    overlap_comm: bool = False  # overlap gradient reduction with backward (GPU; needs extra buffers)
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduction bucket
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO 3: elements gathered ahead of use
    stage3_param_persistence_threshold: int = 100_000  # ZeRO 3: smaller params stay whole


def check_deepspeed_config(cfg, *, error=ValueError) -> None:
    """Combinations DeepSpeed (as wired here) cannot run, named; called from config.validate."""
    p, ds = cfg.parallel, cfg.deepspeed
    if cfg.train.backend != "deepspeed":
        return
    if p.tensor > 1:
        raise error(f"parallel.tensor = {p.tensor} with train.backend=deepspeed: the DeepSpeed "
                    "backend runs the model unsplit (TP = 1); use train.backend=megatron for "
                    "tensor parallelism")
    if p.pipeline > 1:
        raise error(f"parallel.pipeline = {p.pipeline} with train.backend=deepspeed: the DeepSpeed "
                    "backend has no pipeline stages (PP = 1); use train.backend=megatron for "
                    "pipeline parallelism")
    if p.sequence_parallel:
        raise error("parallel.sequence_parallel with train.backend=deepspeed: sequence "
                    "parallelism needs tensor parallelism, which this backend does not do")
    if p.distributed_optimizer:
        raise error("parallel.distributed_optimizer with train.backend=deepspeed: ZeRO shards "
                    "the optimizer already (deepspeed.zero_stage); leave it false")
    if ds.offload_param and ds.zero_stage != 3:
        raise error(f"deepspeed.offload_param needs deepspeed.zero_stage = 3 (got "
                    f"{ds.zero_stage}): only ZeRO 3 partitions the parameters")
    if ds.cpu_adam and not ds.offload_optimizer:
        raise error("deepspeed.cpu_adam needs deepspeed.offload_optimizer=true (it updates the "
                    "optimizer state in CPU memory)")
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if getattr(ds, key) < 1:
            raise error(f"deepspeed.{key} must be >= 1, got {getattr(ds, key)}")
    if ds.stage3_param_persistence_threshold < 0:
        raise error("deepspeed.stage3_param_persistence_threshold must be >= 0, got "
                    f"{ds.stage3_param_persistence_threshold}")
    try:
        import importlib.util

        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise error("train.backend=deepspeed needs the deepspeed package: "
                    "DS_BUILD_OPS=0 pip install 'mdn_scale[deepspeed]'")
