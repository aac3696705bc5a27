"""Halo exchange for the short causal conv under context parallelism.

A causal conv of width W at local token t reads tokens t−W+1..t, so rank r needs the last W−1
(pre-conv) timesteps of rank r−1. `conv_halo` prefixes them (zeros on rank 0); the conv then runs
"valid" over T + W − 1 rows and gives exactly the CP = 1 output slice. Backward sends the halo's
gradient back to rank r−1, which adds it to the gradient of its last W−1 timesteps.

Packed documents: the halo is the previous rank's tokens whatever the documents; where local
token 0 starts a document (mdn_kernels.cp.local_cu_seqlens(...)[1] is False) the caller's
conv reset must mask it, exactly as it masks across document boundaries inside a rank.
`padded_doc_offsets` gives a conv that takes document offsets (FLA's causal_conv1d) the
documents of the padded stream instead, so it can run over halo + slice as one packed sequence.
A conv that takes an initial state (FLA's) can run over the slice alone:
`previous_rank_tail` / `tail_grad_from_next` move the halo and its gradient, and
`halo_state_offsets` gives the local documents and how much of the halo the first one may read.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mdn_kernels.mdn.layout import PerTensorCache, device_copy_of_host, host_cu_seqlens


def _exchange(send: torch.Tensor | None, recv: torch.Tensor | None, send_to: int | None,
              recv_from: int | None, group) -> None:
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, group=group, group_peer=send_to))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, group=group, group_peer=recv_from))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _ConvHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, width, group, rank, world):
        h = width - 1
        halo = x.new_zeros(x.shape[0], h, *x.shape[2:])
        if h > 0 and world > 1:
            send = x[:, -h:].contiguous() if rank < world - 1 else None
            recv = halo if rank > 0 else None
            _exchange(send, recv, rank + 1, rank - 1, group)
        ctx.h, ctx.group, ctx.rank, ctx.world = h, group, rank, world
        return torch.cat([halo, x], dim=1)

    @staticmethod
    def backward(ctx, dy):
        h, group, rank, world = ctx.h, ctx.group, ctx.rank, ctx.world
        dx = dy[:, h:].clone()
        if h > 0 and world > 1:
            send = dy[:, :h].contiguous() if rank > 0 else None
            recv = dx.new_empty(dx.shape[0], h, *dx.shape[2:]) if rank < world - 1 else None
            _exchange(send, recv, rank - 1, rank + 1, group)
            if recv is not None:
                dx[:, -h:] += recv
        return dx, None, None, None, None


def conv_halo(x: torch.Tensor, width: int, cp_group) -> torch.Tensor:
    """x [B, T, D] (this rank's slice) → [B, T + width − 1, D]: the previous rank's last
    width − 1 timesteps (zeros on rank 0), then x. Differentiable across ranks. With
    cp_group None it only pads with zeros (CP = 1)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [B, T, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if cp_group is None:
        return torch.cat([x.new_zeros(x.shape[0], width - 1, x.shape[2]), x], dim=1)
    from .api import check_cp_group
    rank, world = check_cp_group(cp_group)
    if world > 1 and x.shape[1] < width - 1:   # a rank's halo comes from its predecessor alone
        raise ValueError(f"conv_halo needs at least width − 1 = {width - 1} tokens per rank, "
                         f"got T = {x.shape[1]}")
    return _ConvHalo.apply(x, width, cp_group, rank, world)


def previous_rank_tail(x: torch.Tensor, h: int, group, rank: int, world: int) -> torch.Tensor:
    """[B, h, D]: the previous rank's last h timesteps of x [B, T, D] (zeros on rank 0). Every
    rank of the group must call it (each sends its own tail on). Not differentiable: the
    caller's backward returns the tail's gradient with tail_grad_from_next."""
    heads = x.new_zeros(x.shape[0], h, *x.shape[2:])
    if h > 0 and world > 1:
        _exchange(x[:, -h:].contiguous() if rank < world - 1 else None,
                  heads if rank > 0 else None, rank + 1, rank - 1, group)
    return heads


def tail_grad_from_next(d_heads: torch.Tensor | None, like: torch.Tensor, h: int, group,
                        rank: int, world: int) -> torch.Tensor | None:
    """The backward of previous_rank_tail: sends d_heads [B, h, D] (the gradient of what this
    rank received; ignored on rank 0) to the previous rank and returns what the next rank sent
    for this rank's tail ([B, h, D] like `like`'s rows; None on the last rank). Every rank of
    the group must call it."""
    if h == 0 or world == 1:
        return None
    recv = like.new_empty(like.shape[0], h, *like.shape[2:]) if rank < world - 1 else None
    _exchange(d_heads.contiguous() if rank > 0 else None, recv, rank - 1, rank + 1, group)
    return recv


_STATE_OFFSETS = PerTensorCache()


def halo_state_offsets(cu_seqlens: torch.Tensor, T: int, width: int,
                       token_offset: int) -> tuple[torch.Tensor, int]:
    """For a conv that takes the previous rank's tail as its first document's initial state
    (FLA's causal_conv1d initial_state) instead of a padded stream: the local document offsets
    of the slice [token_offset, token_offset + T) — the GLOBAL documents `cu_seqlens` ([N+1],
    B == 1) cut to it, int32 on cu_seqlens' device — and `history`, how many of the width − 1
    timesteps before the slice belong to its first local document (0 where the slice starts a
    document, as rank 0's does; the state's other columns stay zero, so taps never cross a
    document start). Made once per cu_seqlens tensor and (T, width, token_offset), from its host
    copy; read-only, shared."""
    if width < 1 or T < 1:
        raise ValueError(f"halo_state_offsets needs width >= 1 and T >= 1, got width={width}, T={T}")

    def build():
        cs = host_cu_seqlens(cu_seqlens)
        start, end = token_offset, token_offset + T
        inner = cs[(cs > start) & (cs < end)] - start
        local = torch.cat([torch.zeros(1, dtype=torch.int64), inner,
                           torch.tensor([T], dtype=torch.int64)])
        before = cs[cs <= start]
        history = 0 if before.numel() == 0 else min(width - 1, start - int(before.max()))
        return device_copy_of_host(local.to(torch.int32), cu_seqlens.device), history

    return _STATE_OFFSETS.get(cu_seqlens, (T, width, token_offset), build)


_PADDED_OFFSETS = PerTensorCache()


def padded_doc_offsets(cu_seqlens: torch.Tensor, T: int, width: int, token_offset: int) -> torch.Tensor:
    """Document offsets of conv_halo's output [halo (width − 1 rows) | local slice (T rows)] as one
    packed stream of T + width − 1 tokens, from the GLOBAL offsets `cu_seqlens` ([N+1], B == 1)
    and the global position `token_offset` of the slice's first token (rank · T).

    The padded stream's row i is global token token_offset − (width − 1) + i. Its documents are
    the global documents cut to the window: every global boundary strictly inside it moves by
    the window's start, and the window's two ends are boundaries. The rows before global token 0
    (rank 0's zero halo) form a document of their own. A causal conv run over the padded stream
    with these offsets gives each local token exactly the taps causal_conv's document mask
    keeps: taps that read the halo are those of the token's own document, nothing earlier.

    int32 on cu_seqlens' device, made once per cu_seqlens tensor and (T, width, token_offset)
    (PerTensorCache: every layer passes the same tensor; one host copy of it per micro-batch).
    Read-only, shared.
    """
    if width < 1 or T < 1:
        raise ValueError(f"padded_doc_offsets needs width >= 1 and T >= 1, got width={width}, T={T}")

    def build():
        cs = host_cu_seqlens(cu_seqlens)
        start, end = token_offset - (width - 1), token_offset + T
        inner = cs[(cs > start) & (cs < end)] - start
        out = torch.cat([torch.zeros(1, dtype=torch.int64), inner,
                         torch.tensor([T + width - 1], dtype=torch.int64)])
        return device_copy_of_host(out.to(torch.int32), cu_seqlens.device)

    return _PADDED_OFFSETS.get(cu_seqlens, (T, width, token_offset), build)
