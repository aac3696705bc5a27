"""Chunk layout: packed or batched sequences → a flat list of zero-padded chunks.

Every path works on chunks [NC, H, C, ·]: sequence n owns chunks seq_chunk_offsets[n] ..
seq_chunk_offsets[n+1]-1, in order. Batched input [B, T] is the packed case with B sequences of
length T. Padding tokens get identity gates (log α = log μ = 0, β = η = 0) and zero q, k, v, so
they leave the state pair untouched: a sequence need not be a multiple of the chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkLayout:
    num_seqs: int               # N
    num_chunks: int             # NC
    chunk_size: int             # C
    total_tokens: int           # B*T (the flat token stream)
    dest: torch.Tensor          # [total_tokens] int64: flat slot (chunk*C + pos) of every token
    seq_chunk_offsets: torch.Tensor  # [N + 1] int64
    max_chunks: int             # the longest sequence's chunk count

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        return to_chunks(x, self.dest, self.num_chunks, self.chunk_size)

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        return from_chunks(y, self.dest)


def to_chunks(x: torch.Tensor, dest: torch.Tensor, num_chunks: int, chunk_size: int) -> torch.Tensor:
    """[total_tokens, H, D] (or [total_tokens, H]) → [NC, H, C, D] (or [NC, H, C]), zero padded;
    differentiable."""
    out = x.new_zeros((num_chunks * chunk_size,) + tuple(x.shape[1:]))
    out = out.index_put((dest,), x)
    out = out.view(num_chunks, chunk_size, *x.shape[1:])
    return out.transpose(1, 2)


def from_chunks(y: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """[NC, H, C, D] → [total_tokens, H, D] (inverse of to_chunks on the real tokens)."""
    nc, h, c = y.shape[:3]
    y = y.transpose(1, 2).reshape(nc * c, h, *y.shape[3:])
    return y[dest]


def build_layout(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None, chunk_size: int,
                 device: torch.device) -> ChunkLayout:
    if cu_seqlens is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, device=device, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    nch = (lens + chunk_size - 1) // chunk_size
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(nch, 0)
    total = int(cu[-1].item())
    seq_id = torch.repeat_interleave(torch.arange(len(lens), device=device), lens, output_size=total)
    pos = torch.arange(total, device=device) - cu[:-1][seq_id]
    dest = (offsets[:-1][seq_id] + pos // chunk_size) * chunk_size + pos % chunk_size
    return ChunkLayout(
        num_seqs=len(lens),
        num_chunks=int(offsets[-1].item()),
        chunk_size=chunk_size,
        total_tokens=total,
        dest=dest,
        seq_chunk_offsets=offsets,
        max_chunks=int(nch.max().item()) if len(lens) else 0,
    )
