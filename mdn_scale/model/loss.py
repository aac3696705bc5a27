"""Chunked LM-head loss: the output layer and the cross entropy over sequence chunks, without
ever holding the [T, vocab] logits of the whole sequence.

At long context the logits dominate memory: 256K tokens × 50304 vocabulary in bf16 plus the fp32
copy and softmax Megatron's vocab-parallel cross entropy keeps is 77 GiB. `ChunkedLMLoss` walks
the tokens `chunk` at a time: forward computes each chunk's logits, reduces them to the per-token
loss and the log-sum-exp (fp32, [T]) and drops them; backward recomputes each chunk's logits
(one matmul), forms softmax − onehot from the saved log-sum-exp (no collective) and accumulates
dh and dW. Kept for the backward: the hidden states, the labels and the log-sum-exp only.

Tensor parallelism: the output layer is Megatron's vocab-parallel ColumnParallelLinear (rank r
holds rows [r·V/TP, (r+1)·V/TP) of the weight); each chunk's max, sum of exponentials and target
logit are all-reduced over the TP group, as in Megatron's vocab_parallel_cross_entropy. The
input is first made whole on every TP rank: gathered over the sequence under sequence parallelism
(its gradient reduce-scattered back), or copied (gradient all-reduced) without, exactly what
ColumnParallelLinear does to its input.

Math per token (logits z over the whole vocabulary, target y):
    loss = lse(z) − z_y,   d loss / d z = softmax(z) − onehot(y) = exp(z − lse) − onehot(y).
Products run in the autocast dtype when autocast is on (as the unchunked bf16 path), the softmax
in fp32; dW is accumulated over chunks in fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _softmax_dtype(cdt: torch.dtype) -> torch.dtype:
    """fp32 (as Megatron's cross entropy) unless the products run in fp64 (exactness tests)."""
    return torch.promote_types(cdt, torch.float32)


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


class ChunkedLMLoss(torch.autograd.Function):
    """loss [T] (fp32; fp64 for fp64 products) = CE(h [T, d] @ weight [V_l, d]ᵀ, labels [T]) computed `chunk` tokens at a
    time; `vocab_start` is this rank's first vocabulary row, `group` the TP group (None: TP = 1)."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, vocab_start: int, group):
        T, Vl = h.shape[0], weight.shape[0]
        cdt = _compute_dtype(h, weight)
        sdt = _softmax_dtype(cdt)
        w = weight.to(cdt)
        loss = torch.empty(T, dtype=sdt, device=h.device)
        lse = torch.empty(T, dtype=sdt, device=h.device)
        tp = group is not None and dist.get_world_size(group) > 1
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            z = (h[s:e].to(cdt) @ w.t()).to(sdt)  # [n, V_l]
            zmax = z.max(dim=-1).values
            if tp:
                dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            z.sub_(zmax[:, None])
            t = labels[s:e] - vocab_start
            outside = (t < 0) | (t >= Vl)
            picked = z.gather(1, t.masked_fill(outside, 0)[:, None]).squeeze(1).masked_fill(outside, 0.0)
            sums = torch.stack([picked, z.exp_().sum(dim=-1)])
            del z
            if tp:
                dist.all_reduce(sums, group=group)
            log_sum = sums[1].log()
            loss[s:e] = log_sum - sums[0]
            lse[s:e] = zmax + log_sum
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk, ctx.vocab_start, ctx.cdt = chunk, vocab_start, cdt
        return loss

    @staticmethod
    def backward(ctx, dloss):
        h, weight, labels, lse = ctx.saved_tensors
        chunk, vocab_start, cdt = ctx.chunk, ctx.vocab_start, ctx.cdt
        T, Vl = h.shape[0], weight.shape[0]
        w = weight.to(cdt)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        sdt = lse.dtype
        dw = torch.zeros(weight.shape, dtype=sdt, device=weight.device) if need_w else None
        dloss = dloss.to(sdt)
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            hc = h[s:e].to(cdt)
            p = (hc @ w.t()).to(sdt).sub_(lse[s:e, None]).exp_()  # softmax over the whole vocabulary
            t = labels[s:e] - vocab_start
            outside = (t < 0) | (t >= Vl)
            # − onehot(target) where the target is in this rank's shard (no host sync)
            p.scatter_add_(1, t.masked_fill(outside, 0)[:, None], (outside.to(sdt) - 1.0)[:, None])
            g = p.mul_(dloss[s:e, None]).to(cdt)
            del p
            if need_h:
                dh[s:e] = (g @ w).to(h.dtype)
            if need_w:
                dw.add_(g.t() @ hc)  # fp32 accumulation of the chunk's bf16 product, no fp32 copy
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, output_layer, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token loss [B, S] of Megatron's output layer + vocab-parallel cross entropy (what
    GPTModel's forward returns with labels), `chunk` tokens of B·S at a time.

    hidden: [S_local, B, d], the final norm's output (S_local = S / TP under sequence
    parallelism); output_layer: the model's ColumnParallelLinear (no bias); labels: [B, S]."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if chunk < 1:
        raise ValueError(f"model.loss_chunk_tokens must be >= 1 here, got {chunk}")
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError("the chunked LM-head loss supports an output layer without bias only")
    group = getattr(output_layer, "tp_group", None)
    tp = dist.get_world_size(group) if (group is not None and dist.is_initialized()) else 1
    if tp > 1:
        if getattr(output_layer, "sequence_parallel", False):
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    S, B, d = hidden.shape
    if labels.shape != (B, S):
        raise ValueError(f"labels must be [B, S] = {(B, S)}, got {tuple(labels.shape)}")
    weight = output_layer.weight
    vocab_start = dist.get_rank(group) * weight.shape[0] if tp > 1 else 0
    flat_labels = labels.transpose(0, 1).reshape(S * B)  # [s b] order, as the hidden states
    loss = ChunkedLMLoss.apply(hidden.reshape(S * B, d), weight, flat_labels, int(chunk), vocab_start,
                               group if tp > 1 else None)
    return loss.view(S, B).transpose(0, 1).contiguous()
