"""One optimizer step's forward/backward over this rank's microbatches.

A microbatch from the data loader holds ``micro_batch`` packed sequences; they are flattened to
one stream of B·T tokens (B = 1 for the model, document boundaries in ``cu_seqlens``), and under
context parallelism each CP rank keeps its contiguous slice (``cp_slice``). The loss of a
microbatch is its masked per-token loss *sum* divided by the token count of the whole global
batch (all microbatches of all dp×cp ranks), so the gradients summed over dp×cp are those of the
token-weighted mean loss, whatever the layout or microbatch split (DESIGN.md §7, §8).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist


def to_model_inputs(mb: dict, device: torch.device) -> dict:
    """[B, T] tensors (or a CP slice) → model inputs with B = 1 and packed-sequence params."""
    from megatron.core.packed_seq_params import PackedSeqParams

    tokens = mb["tokens"].reshape(1, -1).to(device, non_blocking=True)
    labels = mb["labels"].reshape(1, -1).to(device, non_blocking=True)
    mask = mb["loss_mask"].reshape(1, -1).to(device, dtype=torch.float32, non_blocking=True)
    cu = mb["cu_seqlens"].to(device=device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "packed_seq_params": psp}


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss_sum(model, inputs: dict, precision: str, device: torch.device) -> torch.Tensor:
    with autocast(precision, device):
        per_token = model(inputs["tokens"], None, None, labels=inputs["labels"],
                          packed_seq_params=inputs["packed_seq_params"])
    return (per_token.float() * inputs["loss_mask"]).sum()


def count_tokens(microbatches: list[dict], group) -> float:
    """Loss tokens of the global batch: this rank's mask sum, summed over dp×cp."""
    n = torch.tensor([sum(float(mb["loss_mask"].sum()) for mb in microbatches)], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(n, group=group)
    return float(n.item())


def forward_backward(model, microbatches: list[dict], *, global_tokens: float, precision: str,
                     device: torch.device, loss_group) -> float:
    """Accumulate gradients of sum(loss)/global_tokens over ``microbatches`` (already CP-sliced);
    return the token-weighted mean loss over the whole dp×cp group."""
    total = torch.zeros((), dtype=torch.float64)
    denom = max(global_tokens, 1.0)
    for mb in microbatches:
        inputs = to_model_inputs(mb, device)
        loss_sum = forward_loss_sum(model, inputs, precision, device)
        (loss_sum / denom).backward()
        total += loss_sum.detach().double().cpu()
    if loss_group is not None and dist.get_world_size(loss_group) > 1:
        dist.all_reduce(total, group=loss_group)
    return float(total.item()) / denom


@torch.no_grad()
def evaluate(model, batches: list[dict], *, precision: str, device: torch.device, loss_group) -> float:
    """Token-weighted mean loss of ``batches`` (CP-sliced) over the dp×cp group."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for mb in batches:
        inputs = to_model_inputs(mb, device)
        sums[0] += forward_loss_sum(model, inputs, precision, device).double().cpu()
        sums[1] += float(inputs["loss_mask"].sum())
    if loss_group is not None and dist.get_world_size(loss_group) > 1:
        dist.all_reduce(sums, group=loss_group)
    model.train(was_training)
    return float(sums[0] / sums[1].clamp(min=1))
