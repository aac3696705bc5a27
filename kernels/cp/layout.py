"""Each rank's view of the global sequence(s) under context parallelism.

Rank r of R holds tokens [r·T, (r+1)·T) of every sequence (T = tokens per rank).

* Batched rows (no cu_seqlens): each of the B rows is one sequence split over the ranks. Rank r
  has B local sequences; for r > 0 each continues the previous rank's state ("carried in"), and
  for r < R − 1 each hands its final pair on ("carried out").
* Packed documents (cu_seqlens GLOBAL: offsets over all R·T tokens, the same on every rank,
  B == 1): rank r cuts the documents that overlap its slice into local sequences. Only the first
  can be carried in (a document that started on an earlier rank); one that starts inside the
  slice, or exactly at its first token, starts afresh from its own initial state. Only the last
  local sequence is carried out.

A "slot" is one carried pair between neighbouring ranks: B slots for batched rows, 1 for packed
documents. For each slot the rank's map from the pair carried in to the pair carried out is
affine, X_out = 𝒯 X_in + ℬ, with 𝒯 = 0 when the carried-out sequence does not continue the
carried-in one (a document starts inside the slice, or r = 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CPLocalView:
    rank: int
    world: int
    tokens_per_rank: int            # T (the local sequence length)
    num_global: int                 # N: global sequences (B rows, or packed documents)
    num_local: int                  # local sequences on this rank
    cu_local: torch.Tensor | None   # [num_local + 1] int64 local offsets (packed), else None
    in_seq: tuple[int, ...]         # per slot: local sequence fed by the previous rank, or -1
    out_seq: tuple[int, ...]        # per slot: local sequence whose final pair goes to the next rank
    init_rows: tuple[int, ...]      # per local sequence: global initial-state row if it starts here, else -1
    final_rows: tuple[int, ...]     # per local sequence: global final-state row if it ends here, else -1

    @property
    def num_slots(self) -> int:
        return len(self.out_seq)

    def continues(self, slot: int) -> bool:
        """Whether the carried-out pair of `slot` depends on the carried-in pair (𝒯 ≠ 0)."""
        return self.in_seq[slot] >= 0 and self.in_seq[slot] == self.out_seq[slot]


def batched_view(batch: int, tokens_per_rank: int, rank: int, world: int) -> CPLocalView:
    rows = tuple(range(batch))
    none = (-1,) * batch
    return CPLocalView(
        rank=rank, world=world, tokens_per_rank=tokens_per_rank, num_global=batch,
        num_local=batch, cu_local=None,
        in_seq=rows if rank > 0 else none, out_seq=rows,
        init_rows=rows if rank == 0 else none,
        final_rows=rows if rank == world - 1 else none,
    )


def packed_view(cu_seqlens: torch.Tensor | list[int], tokens_per_rank: int, rank: int,
                world: int) -> CPLocalView:
    """The local view of GLOBAL document offsets (validated: 0 = cu[0] < ... < cu[-1] = R·T)."""
    cu = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    T = tokens_per_rank
    lo, hi = rank * T, (rank + 1) * T
    # documents overlapping [lo, hi): first with cu[d] <= lo < cu[d+1], last with cu[d] < hi <= cu[d+1]
    docs = [d for d in range(len(cu) - 1) if cu[d] < hi and cu[d + 1] > lo]
    bounds = [max(cu[d], lo) - lo for d in docs] + [T]
    first_continues = cu[docs[0]] < lo
    init_rows = tuple(-1 if (i == 0 and first_continues) else d for i, d in enumerate(docs))
    final_rows = tuple(d if cu[d + 1] <= hi else -1 for d in docs)
    return CPLocalView(
        rank=rank, world=world, tokens_per_rank=T, num_global=len(cu) - 1,
        num_local=len(docs), cu_local=torch.tensor(bounds, dtype=torch.int64),
        in_seq=(0 if first_continues else -1,), out_seq=(len(docs) - 1,),
        init_rows=init_rows, final_rows=final_rows,
    )


def local_cu_seqlens(cu_seqlens: torch.Tensor, rank: int, tokens_per_rank: int,
                     world: int | None = None) -> tuple[torch.Tensor, bool]:
    """Rank `rank`'s local offsets of GLOBAL packed-document offsets.

    Args:
        cu_seqlens: [N + 1] global offsets (0 … R·T), the same on every rank.
        rank: this rank in the CP group; tokens_per_rank: T.
    Returns:
        (cu_local [n + 1] int64 on cu_seqlens' device, from 0 to T; continues): `continues` is
        True when local token 0 belongs to a document that started on an earlier rank (the
        model's short conv may then read the previous rank's halo; otherwise it must not).
    """
    total = int(cu_seqlens[-1])
    if tokens_per_rank < 1 or total % tokens_per_rank:
        raise ValueError(f"cu_seqlens[-1] = {total} is not a multiple of tokens_per_rank = {tokens_per_rank}")
    if world is None:
        world = total // tokens_per_rank
    if world * tokens_per_rank != total:
        raise ValueError(f"cu_seqlens[-1] = {total} must equal world * tokens_per_rank = "
                         f"{world} * {tokens_per_rank}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the CP group of size {world}")
    view = packed_view(cu_seqlens, tokens_per_rank, rank, world)
    return view.cu_local.to(cu_seqlens.device), view.in_seq[0] >= 0


def host_chunk_offsets(view: CPLocalView, chunk_size: int) -> list[int]:
    """The local ChunkLayout's seq_chunk_offsets computed on the host (each local sequence
    takes ⌈length / chunk_size⌉ chunks, as mdn.layout.build_layout)."""
    if view.cu_local is None:
        lens = [view.tokens_per_rank] * view.num_local
    else:
        cu = view.cu_local.tolist()
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    out = [0]
    for n in lens:
        out.append(out[-1] + -(-n // chunk_size))
    return out
