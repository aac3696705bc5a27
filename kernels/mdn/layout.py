"""Chunk layout: packed or batched sequences → a flat list of zero-padded chunks.

Every path works on chunks [NC, H, C, ·]: sequence n owns chunks seq_chunk_offsets[n] ..
seq_chunk_offsets[n+1]-1, in order. Batched input [B, T] is the packed case with B sequences of
length T. Padding tokens get identity gates (log α = log μ = 0, β = η = 0) and zero q, k, v, so
they leave the state pair untouched: a sequence need not be a multiple of the chunk size.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

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
    # seq_chunk_offsets on the host (a tuple), where the builder knew them without a sync; a
    # layout made from another (dataclasses.replace) must set it anew or to None
    host_chunk_offsets: tuple | None = None

    def sliced(self, n0: int, n1: int, c0: int, c1: int) -> "ChunkLayout":
        """The layout of the sequences [n0, n1) over the chunks [c0, c1) alone, for chunk
        tensors sliced [c0:c1]: a run of the chunk list whose first and last sequences may be
        cut (their offsets clipped to the run). Only the offsets and counts change (dest and
        total_tokens stay the whole layout's): for the kernels that walk seq_chunk_offsets, the
        state pass's. One host copy of the offsets where the layout has no host_chunk_offsets."""
        host = self.host_chunk_offsets
        if host is None:
            host = tuple(self.seq_chunk_offsets.tolist())
        clipped = tuple(min(max(x, c0), c1) - c0 for x in host[n0:n1 + 1])
        return replace(self, num_seqs=n1 - n0, num_chunks=c1 - c0,
                       seq_chunk_offsets=(self.seq_chunk_offsets[n0:n1 + 1].clamp(c0, c1)
                                          - c0).contiguous(),
                       max_chunks=max(b - a for a, b in zip(clipped, clipped[1:])),
                       host_chunk_offsets=clipped)

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


class PerTensorCache:
    """Values derived from a tensor, made once per tensor object while it is unmodified: keyed
    by the object (id, checked against a weak reference) and its version counter, plus any extra
    key; an entry goes when its tensor is freed, and the cache is emptied past `max_entries`.
    Every layer of a model receives the same cu_seqlens tensor (Megatron's PackedSeqParams), so
    what depends only on it — its host copy, the chunk layout, the chunks' bounds, the attention
    masks — is made once per micro-batch instead of once per layer. Values are shared: read-only."""

    def __init__(self, max_entries: int = 64):
        self.entries: dict = {}
        self.max_entries = max_entries

    def get(self, owner: torch.Tensor, extra: tuple, build):
        key = (id(owner), owner._version) + tuple(extra)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is owner:
            return hit[1]
        value = build()
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        entries = self.entries
        self.entries[key] = (weakref.ref(owner, lambda _r, k=key: entries.pop(k, None)), value)
        return value

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


_HOST_CU = PerTensorCache()


def device_copy_of_host(host: torch.Tensor, device) -> torch.Tensor:
    """`host` (a CPU tensor of offsets) on `device`, without a host sync, and known to
    host_cu_seqlens. On CUDA a copy from pageable memory waits for the stream to drain first;
    from pinned memory with non_blocking it is queued like a kernel (the caching host allocator
    keeps the pinned block until the copy has run). The host values are then recorded as the
    new tensor's host copy, so validating or laying out the device tensor later needs no
    device→host copy either. The CP op's local offsets and the halo conv's padded offsets are
    made this way: they were three host syncs per micro-batch at CP > 1 (tools/bench_model.py
    --sync-report, session 18), each of which lets the GPU run dry. On any other device:
    host.to(device) (on the CPU, `host` itself)."""
    device = torch.device(device)
    if device.type != "cuda" or host.device.type != "cpu":   # nothing to pin: a plain copy
        return host.to(device)
    dev = host.pin_memory().to(device, non_blocking=True)
    _HOST_CU.get(dev, (), lambda: host.detach().to(torch.int64))
    return dev


def host_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """An int64 CPU copy of `cu_seqlens`, made once per tensor (PerTensorCache): without it each
    layer's validation and layout paid device-to-host copies (host syncs) of it. A CPU tensor
    is just converted."""
    if not cu_seqlens.is_cuda:
        return cu_seqlens.detach().to(torch.int64)
    return _HOST_CU.get(cu_seqlens, (), lambda: cu_seqlens.detach().to("cpu", torch.int64))


_LAYOUTS = PerTensorCache()
_BATCHED_LAYOUTS: dict = {}


def build_layout(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None, chunk_size: int,
                 device: torch.device) -> ChunkLayout:
    """No host sync: the sizes (total tokens, chunks, longest sequence's chunks) come from the
    shapes, or from the host copy of cu_seqlens (host_cu_seqlens: one copy per cu tensor).

    Built once and shared (its index tensors are read-only): per (batch, seqlen, chunk_size,
    device) without cu_seqlens, and per cu_seqlens tensor with them (PerTensorCache), so the
    layout's ~25 small device ops run once per micro-batch, not once per layer."""
    dev = str(torch.device(device))
    if cu_seqlens is not None:
        return _LAYOUTS.get(cu_seqlens, (batch, seqlen, chunk_size, dev),
                            lambda: _build_layout(batch, seqlen, cu_seqlens, chunk_size, device))
    key = (batch, seqlen, chunk_size, dev)
    layout = _BATCHED_LAYOUTS.get(key)
    if layout is None:
        if len(_BATCHED_LAYOUTS) >= 64:
            _BATCHED_LAYOUTS.clear()
        layout = _BATCHED_LAYOUTS[key] = _build_layout(batch, seqlen, None, chunk_size, device)
    return layout


def _build_layout(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None, chunk_size: int,
                  device: torch.device) -> ChunkLayout:
    if cu_seqlens is None:
        cu_host = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int64)
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, device=device, dtype=torch.int64)
    else:
        cu_host = host_cu_seqlens(cu_seqlens)
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens_host = cu_host[1:] - cu_host[:-1]
    nch_host = (lens_host + chunk_size - 1) // chunk_size
    total = int(cu_host[-1])
    num_chunks = int(nch_host.sum())
    max_chunks = int(nch_host.max()) if len(lens_host) else 0
    lens = cu[1:] - cu[:-1]
    nch = (lens + chunk_size - 1) // chunk_size
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(nch, 0)
    seq_id = torch.repeat_interleave(torch.arange(len(lens), device=device), lens, output_size=total)
    pos = torch.arange(total, device=device) - cu[:-1][seq_id]
    dest = (offsets[:-1][seq_id] + pos // chunk_size) * chunk_size + pos % chunk_size
    return ChunkLayout(
        num_seqs=len(lens),
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        total_tokens=total,
        dest=dest,
        seq_chunk_offsets=offsets,
        max_chunks=max_chunks,
        host_chunk_offsets=(0,) + tuple(int(x) for x in torch.cumsum(nch_host, 0)),
    )
