"""AdamW with decoupled no-decay groups, and the learning-rate schedule (Megatron's scheduler).

Parameters take no weight decay when they are 1-D (norm weights, biases) or flagged
``_no_weight_decay`` by the model (MDN's gate parameters, DESIGN.md §6). The schedule is
Megatron-core's ``OptimizerParamScheduler`` (linear warmup, then cosine or WSD to
``lr * min_lr_ratio``); it scales each group's weight decay by the group's ``wd_mult``, which is
how the no-decay group stays at zero.
"""

from __future__ import annotations

import os

import torch

from .config import TrainConfig


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return getattr(param, "_no_weight_decay", False) or param.dim() <= 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "wd_mult": 1.0, "name": "decay"},
            {"params": no_decay, "wd_mult": 0.0, "name": "no_decay"}]


def use_fused(model: torch.nn.Module) -> bool:
    """AdamW's fused path (``fused=True``: one multi-tensor kernel per device and dtype) on CUDA
    parameters, the per-parameter loop elsewhere.

    The per-parameter loop launches ~10 kernels per parameter (about 3.5K per step for the 400M
    model's ~340 tensors), which leaves the GPU idle behind the host; the foreach path groups
    them into ~10 multi-tensor launches but still makes one pass over memory per operation. The
    fused kernel reads each parameter, gradient and moment once and applies the whole AdamW
    update in fp32 registers. It is not bit-identical to the loop (its operation order and
    fused multiply-adds differ), so tests/gpu/test_optimizer_gpu.py bounds the difference to
    float32 rounding of the update. On CPU the loop stays (what the CPU layout-equivalence
    tests were written against, bit for bit)."""
    p = next((p for p in model.parameters() if p.requires_grad), None)
    return p is not None and p.is_cuda


def step_tensor(group: dict, p: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """AdamW's ``state["step"]`` as torch itself creates it for this group: fused (and
    capturable) groups keep it as an fp32 tensor on the parameter's device (the fused kernel
    reads it there), the others as a CPU tensor."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(value), dtype=torch.float32, device=p.device)
    return torch.tensor(float(value))


def build_optimizer(model: torch.nn.Module, t: TrainConfig, *, distributed: bool = False,
                    group=None, foreach: bool | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; with ``distributed`` the optimizer state is sharded over ``group`` (the dp×cp
    ranks, ZeRO stage 1): each rank keeps and updates the moments of its share of the
    parameters and broadcasts the updated values (torch's ZeroRedundancyOptimizer, which passes
    these keyword arguments, ``fused`` included, to its inner AdamW). The update is the same
    arithmetic, so losses match the plain optimizer exactly.

    Implementation (torch's AdamW flags): by default ``fused`` on CUDA parameters
    (use_fused) and the per-parameter loop on CPU. ``foreach=True`` asks for the multi-tensor
    foreach path instead (fused then defaults off); ``fused=False`` alone gives the loop. The
    CPU default, the loop, gives the bit-identical updates whatever the parameter grouping that
    the layout-equivalence tests compare. ``MDN_ADAMW=fused|foreach|loop`` overrides the default
    where the caller passes neither flag (benchmarks compare the implementations in one run)."""
    env = os.environ.get("MDN_ADAMW", "")  # benchmarks' A/B switch: the implementation only
    if env not in ("", "fused", "foreach", "loop"):
        raise ValueError(f"MDN_ADAMW must be fused, foreach or loop, got {env!r}")
    if env and foreach is None and fused is None:
        foreach, fused = env == "foreach", env == "fused"
    if fused is None:
        fused = not foreach and use_fused(model)
    if fused and foreach:
        raise ValueError("build_optimizer: fused and foreach are exclusive (torch's AdamW)")
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                  weight_decay=t.weight_decay, foreach=bool(foreach), fused=bool(fused))
    if not distributed:
        return torch.optim.AdamW(param_groups(model), **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(param_groups(model), optimizer_class=torch.optim.AdamW,
                                   process_group=group, **kwargs)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: the inner one of a ZeRO optimizer."""
    return getattr(optimizer, "optim", optimizer)


def build_scheduler(optimizer, t: TrainConfig):
    """Step s (1-based) trains with the lr the scheduler gives after s increments: warmup
    reaches the full lr at step ``warmup_steps``, decay ends at ``steps``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = max(t.steps, t.warmup_steps + 1)
    kwargs = {}
    if t.decay == "wsd":
        kwargs = dict(wsd_decay_steps=max(1, round(t.wsd_decay_fraction * (decay_steps - t.warmup_steps))),
                      lr_wsd_decay_style="linear")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.lr * t.min_lr_ratio,
        lr_warmup_steps=t.warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style="WSD" if t.decay == "wsd" else "cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant", **kwargs)
