"""Core attention for the softmax layers (hybrid stacks, Transformer baseline) on torch SDPA.

Megatron's local DotProductAttention and RoPE need CUDA (DESIGN §9); this runs on CPU and GPU,
and is exact under context parallelism: every CP rank all-gathers K and V (after RoPE) and masks
with global positions (causal across rank boundaries, no attention across packed documents).
RoPE is applied here (the model uses position_embedding_type="none"), with positions that restart
at each packed document and continue across CP ranks. Causality with offsets uses SDPA's
lower-right causal bias (no dense mask); packed documents are attended one at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.nn.attention.bias import causal_lower_right
from megatron.core.transformer.module import MegatronModule


class _AllGatherSeq(torch.autograd.Function):
    """Concatenate every rank's x along dim 0 (rank order); backward: sum the gradient over ranks
    and keep this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.n = x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((ctx.n,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherSeq.apply(x, group)


def document_positions(T: int, offset: int, cu_seqlens: Optional[torch.Tensor], device):
    """Global positions offset..offset+T-1 → (position within its document, document id)."""
    pos = torch.arange(T, device=device) + offset
    if cu_seqlens is None:
        return pos, torch.zeros_like(pos)
    cs = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cs, pos, right=True) - 1
    return pos - cs[doc], doc


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, halves layout (HF Llama's rotate_half). x: [S, B, h, D]; pos: [S]."""
    D = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=dt) / D))
    ang = pos.to(dt)[:, None] * inv[None, :]  # [S, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, None, :]
    xf = x.to(dt)
    x1, x2 = xf.chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return (xf * cos + rot * sin).to(x.dtype)


class SDPACoreAttention(MegatronModule):
    """Megatron core-attention interface: forward(query, key, value, attention_mask, *,
    attn_mask_type, attention_bias, packed_seq_params) with query/key/value [S, B, h, D]
    (or [T, h, D] when packed, qkv_format "thd") → [S, B, h·D] (or [T, h, D])."""

    def __init__(self, config, layer_number: int = None, attn_mask_type=None, attention_type=None,
                 cp_comm_type=None, softmax_scale: Optional[float] = None, pg_collection=None,
                 rope_theta: float = 10000.0, **_unused):
        super().__init__(config)
        self.rope_theta = rope_theta
        self.softmax_scale = softmax_scale
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()

    def _attend(self, q, k, v):
        """Causal attention with the last query aligned to the last key (q: [B, h, Sq, D],
        k, v: [B, h, Sk, D], Sq <= Sk): flash / memory-efficient kernels, no dense mask."""
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        mask = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
        thd = query.dim() == 3
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        S, B, h, D = query.shape
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if cu is not None and B != 1:
            raise ValueError(f"packed_seq_params needs micro-batch size 1, got B={B}")
        R = self.cp_group.size()
        offset = self.cp_group.rank() * S if R > 1 else 0
        qpos, _ = document_positions(S, offset, cu, query.device)
        query = apply_rope(query, qpos, self.rope_theta)
        key = apply_rope(key, qpos, self.rope_theta)
        if R > 1:
            key = all_gather_sequence(key, self.cp_group)
            value = all_gather_sequence(value, self.cp_group)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, h, S, D]
        if cu is None:
            # Keys of this rank and the ranks before it; later ones are all masked.
            out = self._attend(q, k[:, :, :offset + S], v[:, :, :offset + S])
        else:
            # One document at a time: its local queries against its keys so far. No mask is
            # materialised; a document crossing the rank boundary is handled by the offsets.
            outs, bounds = [], cu.tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                qa, qb = max(a, offset), min(b, offset + S)
                if qa >= qb:
                    continue
                outs.append(self._attend(q[:, :, qa - offset:qb - offset], k[:, :, a:qb], v[:, :, a:qb]))
            out = torch.cat(outs, 2)
        out = out.permute(2, 0, 1, 3)  # [S, B, h, D]
        if thd:
            return out.squeeze(1)
        return out.reshape(S, B, h * D)
