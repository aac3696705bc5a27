"""Core attention for the softmax layers (hybrid stacks, Transformer baseline) on torch SDPA.

Megatron's local DotProductAttention and RoPE need CUDA (DESIGN §9); this runs on CPU and GPU,
and is exact under context parallelism: every CP rank all-gathers K and V (after RoPE) and masks
with global positions (causal across rank boundaries, no attention across packed documents).
RoPE is applied here (the model uses position_embedding_type="none"), with positions that restart
at each packed document and continue across CP ranks.

Packed documents (varlen): consecutive documents are grouped, and each group is one SDPA call
with an additive mask (0 where query i may see key j: same document and j <= offset + i, −inf
elsewhere). That is what SDPA makes of a boolean mask, but it is built once per cu_seqlens
tensor in the attention dtype and shared by every layer, so no layer converts or copies it (the
memory-efficient kernel keeps a view of it for backward). A group grows while its mask has at
most MAX_MASK_ELEMENTS entries, so a 2K–8K-token sequence of many short documents is one call
per layer, with no Python loop over documents and no host sync per layer (the host copy of
cu_seqlens is host_cu_seqlens's, made once per tensor). A group of a single document (a long
one, or one the bound leaves alone) takes the unmasked causal path — SDPA's lower-right causal
bias when the document began on an earlier CP rank — which can use the flash kernel.
MAX_MASK_ELEMENTS = 0 gives one call per document, as attend_per_document: the loop this
replaced, kept as the reference the tests compare against.

Masked groups compute their fully masked blocks too (SDPA's masked kernels skip none); torch's
flex_attention with a document BlockMask would skip them, but its backward does not run on CPU
(torch 2.13: NotImplementedError), so it is not offered here untested.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.nn.attention.bias import causal_lower_right
from megatron.core.transformer.module import MegatronModule
from mdn_kernels.mdn.layout import PerTensorCache, host_cu_seqlens

# Largest mask (query × key entries) of one grouped call. 2^26 = 8K × 8K: the mask is cached
# in the attention dtype (128 MiB in bf16, 256 MiB in fp32) for the micro-batch, shared by every
# layer and referenced, not copied, by the memory-efficient kernel's saved tensors. Up to 8K
# tokens per rank of short documents is one call per layer; beyond it groups of ~8K tokens,
# whose keys stop at their last query, so compute on fully masked blocks stays bounded as well.
MAX_MASK_ELEMENTS = 1 << 26


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


def causal_attention(q, k, v, scale=None):
    """Causal attention with the last query aligned to the last key (q: [B, h, Sq, D],
    k, v: [B, h, Sk, D], Sq <= Sk): flash / memory-efficient kernels, no dense mask."""
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attend_per_document(q, k, v, bounds, offset: int, scale=None):
    """The reference: one causal call per packed document. q: this rank's queries [B, h, S, D]
    at global positions offset..offset+S-1; k, v: all ranks' keys [B, h, ≥offset+S, D];
    bounds: cu_seqlens as a list. Each document's local queries attend its keys so far (a
    document crossing the rank boundary is handled by the offsets)."""
    S = q.shape[2]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qa, qb = max(a, offset), min(b, offset + S)
        if qa >= qb:
            continue
        outs.append(causal_attention(q[:, :, qa - offset:qb - offset], k[:, :, a:qb], v[:, :, a:qb],
                                     scale))
    return torch.cat(outs, 2)


def _group_documents(bounds, offset: int, S: int, max_elements: int):
    """[(q0, q1, k0, ndocs)] in global positions: queries q0..q1-1 attend keys k0..q1-1. Greedy
    over consecutive documents: a group takes the next document while its mask
    (q1 - q0) × (q1 - k0) stays within max_elements."""
    groups = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qa, qb = max(a, offset), min(b, offset + S)
        if qa >= qb:
            continue
        if groups:
            q0, _, k0, n = groups[-1]
            if (qb - q0) * (qb - k0) <= max_elements:
                groups[-1] = (q0, qb, k0, n + 1)
                continue
        groups.append((qa, qb, a, 1))
    if not groups or groups[0][0] != offset or groups[-1][1] != offset + S:
        raise ValueError(f"cu_seqlens {bounds[0]}..{bounds[-1]} do not cover this rank's tokens "
                         f"{offset}..{offset + S - 1}")
    return groups


def _group_mask(cu, q0: int, q1: int, k0: int, dtype, device) -> torch.Tensor:
    """Additive mask [q1-q0, q1-k0]: 0 where the key is in the query's document and not after
    it, −inf elsewhere. Its rows are padded to a multiple of 16 elements (a view of the first
    q1-k0 columns), the alignment the memory-efficient kernel asks of a bias, so SDPA uses it as
    is instead of padding a copy per call."""
    cs = cu.to(device=device, dtype=torch.long)
    qpos = torch.arange(q0, q1, device=device)
    kpos = torch.arange(k0, q1, device=device)
    qdoc = torch.searchsorted(cs, qpos, right=True)
    kdoc = torch.searchsorted(cs, kpos, right=True)
    allowed = (kpos[None, :] <= qpos[:, None]) & (kdoc[None, :] == qdoc[:, None])
    nk = q1 - k0
    store = torch.full((q1 - q0, -(-nk // 16) * 16), float("-inf"), dtype=dtype, device=device)
    return store[:, :nk].masked_fill_(allowed, 0.0)


_PLANS = PerTensorCache()


def varlen_plan(cu: torch.Tensor, offset: int, S: int, dtype, device, max_elements: int):
    """[(q0, q1, k0, mask or None)] (global positions) for this rank's S queries at offset, built
    once per cu_seqlens tensor (PerTensorCache, as the op's layouts): every attention layer
    receives the same cu_seqlens, so the masks are built once per micro-batch and shared."""
    def build():
        bounds = host_cu_seqlens(cu).tolist()
        return [(q0, q1, k0, _group_mask(cu, q0, q1, k0, dtype, device) if n > 1 else None)
                for q0, q1, k0, n in _group_documents(bounds, offset, S, max_elements)]
    return _PLANS.get(cu, (offset, S, dtype, str(torch.device(device)), max_elements,
                           torch.is_inference_mode_enabled()), build)


def attend_varlen(q, k, v, cu, offset: int, scale=None, max_elements: Optional[int] = None):
    """attend_per_document's result with consecutive documents grouped (module docstring):
    one SDPA call per group."""
    if max_elements is None:
        max_elements = MAX_MASK_ELEMENTS
    plan = varlen_plan(cu, offset, q.shape[2], q.dtype, q.device, max_elements)
    outs = []
    for q0, q1, k0, mask in plan:
        qs, ks, vs = q[:, :, q0 - offset:q1 - offset], k[:, :, k0:q1], v[:, :, k0:q1]
        if mask is None:
            outs.append(causal_attention(qs, ks, vs, scale))
        else:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


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
            out = causal_attention(q, k[:, :, :offset + S], v[:, :, :offset + S],
                                   self.softmax_scale)
        else:
            out = attend_varlen(q, k, v, cu, offset, self.softmax_scale)
        out = out.permute(2, 0, 1, 3)  # [S, B, h, D]
        if thd:
            return out.squeeze(1)
        return out.reshape(S, B, h * D)
