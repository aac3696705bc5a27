"""Gradient reduction over dp×cp, sequence-parallel norm gradients over TP, global grad norm.

Megatron's DistributedDataParallel and its optimizers allocate their buffers and flags on
"cuda" (megatron-core 0.16.1), so they cannot run the CPU demo or CI. This module does what
they do for our loop, on any device: every rank's gradient is the gradient of
(its tokens' loss sum) / (tokens of the whole global batch), so summing over the dp×cp group
gives the gradient of the token-weighted mean loss exactly (DESIGN.md §7).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_ELEMENTS = 2**24


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    if group is None or dist.get_world_size(group) == 1:
        return
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for t, r in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(r)


def finalize_grads(model: torch.nn.Module) -> None:
    """Sum gradients over dp×cp; sequence-parallel params (norm weights computed on a sequence
    shard per TP rank) also sum over TP."""
    from megatron.core import parallel_state as ps

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params], ps.get_data_parallel_group(with_context_parallel=True))
    sp = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
    if sp:
        all_reduce_sum(sp, ps.get_tensor_model_parallel_group())


def global_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the full (unsharded) gradient: each TP-sharded gradient counted on every TP
    rank, replicated ones once, summed over TP and PP.

    CPU: each gradient squared and summed in float64, one parameter at a time (what the CPU
    layout-equivalence tests compare bit for bit). CUDA: one multi-tensor launch
    (torch._foreach_norm) gives each gradient's L2 norm in fp32, and their squares are summed in
    float64 — instead of ~4 kernels and a float64 copy of every gradient per parameter. The
    per-tensor fp32 norms are accurate to float32 rounding (the norm is only logged and compared
    with the clip threshold); a single gradient whose norm overflows fp32 (> 3.4e38) reads as
    inf, i.e. a non-finite step."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    device = next(model.parameters()).device
    grads = [p.grad.detach() for p in model.parameters()
             if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if device.type == "cuda":
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            sq = torch.stack(norms).double().pow(2).sum()
    else:
        for g in grads:
            sq += g.double().pow(2).sum()
    for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
    return math.sqrt(sq.item())


def clip_(model: torch.nn.Module, max_norm: float, norm: float) -> None:
    """Scale every gradient by max_norm / norm when the norm is above max_norm (one
    multi-tensor launch on CUDA, the same product per element as the CPU loop)."""
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and grads[0].is_cuda:
            torch._foreach_mul_(grads, coef)
            return
        for g in grads:
            g.mul_(coef)
