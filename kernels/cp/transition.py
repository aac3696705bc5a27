"""A rank's affine map X_out = 𝒯 X_in + ℬ over its chunks, built with chunk-level parallelism.

Per chunk c (per head) the state pass maps the pair X = [S; M] (2K×V) affinely:

    W = U + Y S − Z M,  S' = a S − g M − Kgᵀ W,  M' = u M + Kmᵀ W
    ⇒ X' = T_c X + b_c,  T_c = [[aI − KgᵀY, −gI + KgᵀZ], [KmᵀY, uI − KmᵀZ]],  b_c = [−KgᵀU; KmᵀU]

𝒯 is the ordered product of the T_c and ℬ the composed offset. Running the ordinary state-pass
recurrence on a 2K+V wide "value" started from [I_2K | 0], with the first 2K columns' U set to
0, gives [𝒯 | ℬ] at the end: the recurrence only multiplies the pair from the left, so every
column evolves independently.

Parallel plan. The chunks of every local sequence are cut into groups of `group_chunks`
consecutive chunks (GroupPlan); each (column block, group, head) is one independent serial
recurrence (a Triton program, or one batched torch step per chunk position) giving the group's
[𝒯_g | ℬ_g]; a log-depth tree of batched products (a, b) ↦ (T_b T_a, T_b B_a + B_b) composes
them into the rank's map. Nothing walks all the chunks one after another with only per-head
parallelism (DESIGN §9: FLA's CP pays 3.2× for that). The group maps are reused afterwards:
once the rank's carried-in pair is known, the same tree walked top down (tree_down) gives the
pair entering every group, so the ordinary state-pass kernels run all groups at once
(state_pass_cp), and backward walks it with 𝒯ᵀ (tree_up_grads, tree_down_grads).

FLOPs per head, for n local tokens (n/C chunks) in G groups:
    group recurrences: 8·n·K·(2K + V)      (per chunk: Y X, Z X, Kgᵀ W, Kmᵀ W, each 2·C·K·(2K+V))
    tree up:           2·(G − 1)·(2K)²·(2K + V)
    tree down, and the three backward tree walks: 2·(G − 1)·(2K)²·V each (2K·2K·2K for 𝒯 only)
The op's own forward state pass costs 8·n·K·V, so at K = 128, V = 256 the group recurrences
are 2× that pass (𝒯 columns 1×, ℬ columns 1×); the tree is ≈ G·K/n of the recurrences, ≤ 1/16
with the default group length ⌈16·K / C⌉ chunks (≈ 16·K tokens), and the walks are smaller.
But the recurrences run on tensor cores in bf16 for 16-bit models and the tree in fp32 on CUDA
cores (~15× fewer FLOP/s on an H100), so in time the tree is not negligible: see the table in
state_pass_cp. The tree walks replace serial scans (group_initial_pairs, group_end_grads, kept
as their spec) that took G steps of small ops each: same FLOPs, ⌈log2 G⌉ batched levels.
"""
from __future__ import annotations

import os
import math
from dataclasses import dataclass, replace

import torch

from mdn_kernels.mdn.layout import ChunkLayout
from mdn_kernels.mdn import wgmma

try:  # Triton is optional for the torch path (CPU)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def default_group_chunks(K: int, chunk_size: int) -> int:
    """Chunks per serial group: ~16·K tokens, so the tree costs ≤ 1/16 of the recurrences."""
    return max(1, math.ceil(16 * K / chunk_size))


@dataclass
class GroupPlan:
    """The local chunks cut into groups of ≤ group_chunks consecutive chunks of one sequence.

    `layout` is the local ChunkLayout with the groups as its "sequences" (chunk indices are
    unchanged), so the ordinary state-pass kernels run all groups in parallel. The index tensors
    are built once (plans are cached per shape by state_pass_cp), so a call does no host→device
    copies for them."""
    layout: ChunkLayout
    groups_of_seq: list[list[int]]   # per local sequence, its group ids in order
    g_start: torch.Tensor            # [NG] int64 first chunk of each group
    g_len: torch.Tensor              # [NG] int64 chunks in each group
    first_idx: torch.Tensor          # [num_local] each sequence's first group
    last_idx: torch.Tensor           # [num_local] each sequence's last group
    fwd_steps: list                  # per group position j: (group ids, sequence ids)
    bwd_steps: list                  # per position j from the end: (group ids, sequence ids)
    # The tree over each sequence's groups (see "Tree over the groups" below): nodes 0..NG-1 are
    # the groups, node NG + i the i-th composed pair. Per level, bottom up: (left node ids,
    # right node ids, first new id, end): nodes [first, end) are the compositions of left[i]
    # then right[i] (consecutive ranges of one sequence, left before right).
    levels: list
    level_nodes: list                # per level: torch.arange(first, end) (the new node ids)
    num_nodes: int
    root_idx: torch.Tensor           # [num_local] the node covering all of each sequence's groups
    roots: list[int]                 # the same, on the host

    @property
    def num_groups(self) -> int:
        return self.g_start.numel()


def plan_groups(layout: ChunkLayout, group_chunks: int,
                seq_chunk_offsets: list[int] | None = None) -> GroupPlan:
    """Cut every sequence of `layout` into groups; `seq_chunk_offsets` (host copy of
    layout.seq_chunk_offsets), or the layout's own host_chunk_offsets, avoids reading them back
    from the device."""
    off = seq_chunk_offsets
    if off is None:
        off = (list(layout.host_chunk_offsets) if layout.host_chunk_offsets is not None
               else layout.seq_chunk_offsets.tolist())
    starts, lens, groups_of_seq = [], [], []
    for s in range(len(off) - 1):
        ids = []
        for c in range(off[s], off[s + 1], group_chunks):
            ids.append(len(starts))
            starts.append(c)
            lens.append(min(group_chunks, off[s + 1] - c))
        groups_of_seq.append(ids)
    dev = layout.seq_chunk_offsets.device
    idx = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)  # noqa: E731
    g_off = idx(starts + [off[-1]])
    glayout = replace(layout, num_seqs=len(starts), seq_chunk_offsets=g_off,
                      max_chunks=max(lens) if lens else 0,
                      host_chunk_offsets=tuple(int(x) for x in starts + [off[-1]]))
    depth = max(len(g) for g in groups_of_seq)
    fwd, bwd = [], []
    for j in range(depth):
        seqs = [s for s, g in enumerate(groups_of_seq) if len(g) > j]
        fwd.append((idx([groups_of_seq[s][j] for s in seqs]), idx(seqs)))
        bwd.append((idx([groups_of_seq[s][-1 - j] for s in seqs]), idx(seqs)))
    # The tree: pair consecutive nodes of each sequence level by level; an odd last node goes up
    # unchanged (no identity padding, no copy), so every sequence of n groups takes n − 1
    # compositions and ⌈log2 n⌉ levels.
    cur = [list(g) for g in groups_of_seq]
    nid, levels = len(starts), []
    while any(len(c) > 1 for c in cur):
        left, right, first, nxt = [], [], nid, []
        for c in cur:
            up = []
            for i in range(0, len(c) - 1, 2):
                left.append(c[i])
                right.append(c[i + 1])
                up.append(nid)
                nid += 1
            if len(c) % 2:
                up.append(c[-1])
            nxt.append(up)
        levels.append((idx(left), idx(right), first, nid))
        cur = nxt
    roots = [c[0] for c in cur]
    return GroupPlan(layout=glayout, groups_of_seq=groups_of_seq, g_start=g_off[:-1],
                     g_len=g_off[1:] - g_off[:-1], first_idx=idx([g[0] for g in groups_of_seq]),
                     last_idx=idx([g[-1] for g in groups_of_seq]), fwd_steps=fwd, bwd_steps=bwd,
                     levels=levels, level_nodes=[torch.arange(a, b, device=dev) for _, _, a, b in levels],
                     num_nodes=nid, root_idx=idx(roots), roots=roots)


# ---------------------------------------------------------------------------------------------
# Group recurrences: torch (spec, CPU) and Triton (GPU, or the interpreter)
# ---------------------------------------------------------------------------------------------

def group_maps_torch(U, Y, Z, Kg, Km, a_end, g_end, u_end, g_start, g_len, compute_dtype=None):
    """[𝒯_g | ℬ_g] for every group g (ℬ_g: its final pair from a zero pair): [NG, H, 2K, 2K + V].

    U [NC, H, C, V]; Y, Z, Kg, Km [NC, H, C, K]; a_end, g_end, u_end [NC, H]; g_start, g_len
    [NG] int64: each group's first chunk and chunk count. compute_dtype (default: the operands'):
    the dtype of the maps and of every product; each step's operands are cast as they are
    gathered (16-bit operands, fp32 maps: the Triton kernel's arithmetic, without fp32 copies
    of the whole operands)."""
    NG = g_start.numel()
    H, K = Y.shape[1], Y.shape[-1]
    V = U.shape[-1]
    dt, dev = compute_dtype or U.dtype, U.device
    if compute_dtype is not None:
        U, Y, Z, Kg, Km, a_end, g_end, u_end = (_Cast(t, dt) for t in (U, Y, Z, Kg, Km, a_end, g_end, u_end))
    eye = torch.eye(K, dtype=dt, device=dev)
    zk = torch.zeros(K, K, dtype=dt, device=dev)
    # Columns [0, K): the S-part of 𝒯; [K, 2K): the M-part; [2K, 2K+V): ℬ.
    zv = torch.zeros(NG, H, K, V, dtype=dt, device=dev)
    S = torch.cat([eye.expand(NG, H, K, K), zk.expand(NG, H, K, K), zv], dim=-1)
    M = torch.cat([zk.expand(NG, H, K, K), eye.expand(NG, H, K, K), zv], dim=-1)
    max_len = int(g_len.max().item()) if NG else 0   # the one host sync
    last = (g_len - 1).clamp_min(0)
    for s in range(max_len):  # all groups advance together: one batched step per chunk position
        # every group computes (a finished one on its last chunk again) and keeps the result
        # only while active: no per-step host sync to find the active groups
        ci = g_start + torch.clamp(last, max=s)
        active = (g_len > s)[:, None, None, None]
        W = Y[ci] @ S - Z[ci] @ M
        W[..., 2 * K:] += U[ci]
        S_new = a_end[ci][..., None, None] * S - g_end[ci][..., None, None] * M - Kg[ci].transpose(-1, -2) @ W
        M_new = u_end[ci][..., None, None] * M + Km[ci].transpose(-1, -2) @ W
        S = torch.where(active, S_new, S)
        M = torch.where(active, M_new, M)
    return torch.cat([S, M], dim=-2)


class _Cast:
    """t[idx] in another dtype: casts only the gathered rows (group_maps_torch's operands)."""

    def __init__(self, t: torch.Tensor, dtype: torch.dtype):
        self.t, self.dtype = t, dtype

    def __getitem__(self, idx):
        return self.t[idx].to(self.dtype)


if triton is not None:
    from mdn_kernels.mdn.state_pass import next_pair_tiles

    @triton.jit
    def _group_map_kernel(
        U, Y, Z, KG, KM, A_END, G_END, U_END, OUT, G_START, G_LEN,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):
        # One program per (column block, group, head): the serial recurrence of one group on
        # BV of the 2K + V columns. Operands needed transposed are loaded transposed (no
        # tl.trans of a dot result, DESIGN §9).
        i_v = tl.program_id(0)
        i_gh = tl.program_id(1).to(tl.int64)
        i_g = i_gh // H
        i_h = i_gh % H
        c_start = tl.load(G_START + i_g)
        c_end = c_start + tl.load(G_LEN + i_g)
        NCOL: tl.constexpr = 2 * K + V
        o_k = tl.arange(0, BK)
        o_col = i_v * BV + tl.arange(0, BV)
        o_c = tl.arange(0, C)
        m_k = o_k < K
        is_b = (o_col >= 2 * K) & (o_col < NCOL)          # ℬ columns (carry U)
        o_u = tl.where(is_b, o_col - 2 * K, 0)
        # start from [I_2K | 0]: S = [I_K, 0 | 0], M = [0, I_K | 0]
        s = tl.where(o_k[:, None] == o_col[None, :], 1.0, 0.0)
        m = tl.where(o_k[:, None] + K == o_col[None, :], 1.0, 0.0)
        ck = o_c[:, None] * K + o_k[None, :]
        kc = o_c[None, :] * K + o_k[:, None]
        cu = o_c[:, None] * V + o_u[None, :]
        for c in range(c_start, c_end):
            ch = c * H + i_h
            y = tl.load(Y + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            z = tl.load(Z + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            u = tl.load(U + ch * C * V + cu, mask=is_b[None, :], other=0.0)
            # operands in the storage dtype (bf16 for 16-bit models, as the state pass), the
            # map itself accumulates in fp32
            w = (u + tl.dot(y, s.to(y.dtype), input_precision=PREC)
                 - tl.dot(z, m.to(z.dtype), input_precision=PREC))
            s, m = next_pair_tiles(s, m, w, KG, KM, A_END, G_END, U_END, ch, kc, m_k, C, K, PREC)
        m_out = m_k[:, None] & (o_col[None, :] < NCOL)
        out = OUT + i_gh * 2 * K * NCOL + o_k[:, None] * NCOL + o_col[None, :]
        tl.store(out, s, mask=m_out)
        tl.store(out + K * NCOL, m, mask=m_out)


def group_maps_triton(U, Y, Z, Kg, Km, a_end, g_end, u_end, g_start, g_len,
                      allow_tf32: bool = False, out: torch.Tensor | None = None):
    """Triton version of group_maps_torch (same arguments; fp32 result and accumulation; the
    products take the operands' dtype, bf16 for 16-bit models as in the state pass). `out`: a
    contiguous fp32 [NG, H, 2K, 2K + V] to write into (the first rows of the tree's store)."""
    from mdn_kernels.mdn.state_pass import _block_v, _precision
    NC, H, C, V = U.shape
    K = Y.shape[-1]
    NG = g_start.numel()
    ncol = 2 * K + V
    if out is None:
        out = U.new_empty(NG, H, 2 * K, ncol, dtype=torch.float32)  # fp32 maps, whatever the operands
    assert out.is_contiguous() and out.shape == (NG, H, 2 * K, ncol) and out.dtype == torch.float32
    BK, BV = triton.next_power_of_2(K), _block_v(K, ncol)
    grid = (triton.cdiv(ncol, BV), NG * H)
    wgmma.kernel(_group_map_kernel, "group_map")[grid](
        U, Y, Z, Kg, Km, a_end, g_end, u_end, out,
        g_start, g_len, H=H, K=K, V=V, C=C, BK=BK, BV=BV,
        PREC=_precision(Y.dtype, allow_tf32), num_warps=4, num_stages=1,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Tree composition
# ---------------------------------------------------------------------------------------------

def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Maps [T | B] (… × 2K × (2K + V)): `first` applied, then `second` → [T₂T₁ | T₂B₁ + B₂]."""
    twoK = second.shape[-2]
    out = second[..., :twoK] @ first
    out[..., twoK:] += second[..., twoK:]
    return out


def tree_compose(maps: torch.Tensor) -> torch.Tensor:
    """Compose maps [P, G, H, 2K, 2K+V] in order along G (log2 G levels of batched products)."""
    while maps.shape[1] > 1:
        if maps.shape[1] % 2:  # pad with the identity map
            twoK = maps.shape[-2]
            ident = torch.zeros_like(maps[:, :1])
            ident[..., :twoK].copy_(torch.eye(twoK, dtype=maps.dtype, device=maps.device))
            maps = torch.cat([maps, ident], dim=1)
        maps = compose(maps[:, 0::2], maps[:, 1::2])
    return maps[:, 0]


# _group_map_kernel hit an illegal memory access on the H100 (Triton 3.6) at K = 256 (the 1.3B
# model; CP = 4 at 32K and 512K tokens, session 4, CUDA_LAUNCH_BLOCKING=1 named it), so K = 256
# took the torch path below: a serial loop over a group's chunks, ~15 ops each, which made the
# 1.3B CP = 2 step 2.1x slower than with the kernel (session 9, 3287 vs 1545 ms). Session 7 found
# the kernel mis-compiled with Hopper's wgmma and compiles it without since; so compiled, it ran
# at K = 256 in session 9 (plan gm9) with the CP op's errors against float64 equal to CP = 1's at
# CP = 2, and the whole model's CP startup check as close to CP = 1 as with the torch maps. Above
# this K (none of our configs) the maps take the torch path; MDN_CP_GROUP_MAP_MAX_K (an integer)
# moves the limit (128 brings the torch path back at K = 256).
GROUP_MAP_KERNEL_MAX_K = 256


def group_map_kernel_max_k() -> int:
    env = os.environ.get("MDN_CP_GROUP_MAP_MAX_K")
    if env is None:
        return GROUP_MAP_KERNEL_MAX_K
    if not env.isdigit():
        raise ValueError(f"MDN_CP_GROUP_MAP_MAX_K must be a non-negative integer (a head size), "
                         f"got {env!r}")
    return int(env)


def maps_dtype(U: torch.Tensor, backend: str) -> torch.dtype:
    """The dtype group_maps returns: fp32 from Triton, the operands' dtype from torch."""
    return torch.float32 if (backend == "triton" and U.dtype != torch.float64) else U.dtype


def group_maps(prep_args, plan: GroupPlan, *, backend: str, allow_tf32: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """[𝒯_g | ℬ_g] of every group (from a zero pair): [NG, H, 2K, 2K + V] (into `out` if given,
    dtype maps_dtype)."""
    U = prep_args[0]
    if backend == "triton" and U.dtype != torch.float64:
        if prep_args[1].shape[-1] <= group_map_kernel_max_k():
            return group_maps_triton(*prep_args, plan.g_start, plan.g_len, allow_tf32, out=out)
        # Larger K: the same recurrence in batched torch products, fp32 like the kernel
        maps = group_maps_torch(*prep_args, plan.g_start, plan.g_len, compute_dtype=torch.float32)
        return maps if out is None else out.copy_(maps)
    maps = group_maps_torch(*prep_args, plan.g_start, plan.g_len)
    if out is None:
        return maps
    return out.copy_(maps)


def _index(seq_ids, device):
    return torch.tensor(seq_ids, dtype=torch.int64, device=device)


def rank_map_index(plan: GroupPlan, view, device) -> tuple:
    """Device index tensors rank_map_from_tree needs: (root node of every slot's carried-out
    sequence, slots whose carried-out sequence starts on this rank, those sequences). Build once
    per view (a host→device copy waits for the stream)."""
    idx = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    fresh = [p for p in range(view.num_slots) if not view.continues(p)]
    return (idx([plan.roots[s] for s in view.out_seq]), idx(fresh),
            idx([view.out_seq[p] for p in fresh]))


def rank_map_from_tree(store, plan: GroupPlan, view, S_init, M_init, index=None) -> torch.Tensor:
    """This rank's [𝒯 | ℬ] per slot, [P, H, 2K, 2K + V], from the tree's store (after tree_up).

    ℬ is the carried-out pair when the carried-in pair is zero; where the carried-out sequence
    starts on this rank, it includes that sequence's initial state and 𝒯 = 0. `index`: from
    rank_map_index (built here if not given)."""
    twoK = store.shape[-2]
    roots, fi, si = index if index is not None else rank_map_index(plan, view, store.device)
    out = store[roots]
    if fi.numel():  # starts here: fold its own initial state in, 𝒯 = 0
        X0 = torch.cat([S_init[si], M_init[si]], dim=-2).to(out.dtype)
        sub = out[fi]
        sub[..., twoK:] += sub[..., :twoK] @ X0
        sub[..., :twoK] = 0
        out[fi] = sub
    return out


def rank_map(prep_args, S_init, M_init, layout, view, *, backend: str, allow_tf32: bool,
             group_chunks: int | None = None) -> torch.Tensor:
    """(𝒯, ℬ) of this rank for every slot: [P, H, 2K, 2K + V] = [𝒯 | ℬ].

    prep_args: (U, Y, Z, Kg, Km, a_end, g_end, u_end) in chunk layout; S_init, M_init
    [num_local, H, K, V]: the initial pairs of the local sequences (rows of carried-in sequences
    are ignored)."""
    Y = prep_args[1]
    if group_chunks is None:
        group_chunks = default_group_chunks(Y.shape[-1], Y.shape[2])
    plan = plan_groups(layout, group_chunks)
    store = tree_store(prep_args, plan, backend=backend, allow_tf32=allow_tf32)
    return rank_map_from_tree(tree_up(store, plan), plan, view, S_init, M_init)


# ---------------------------------------------------------------------------------------------
# Scans over the groups of each sequence, serially: the spec of the tree below (tests)
# ---------------------------------------------------------------------------------------------

def group_initial_pairs(maps, plan: GroupPlan, X_seq) -> torch.Tensor:
    """The pair entering every group, [NG, H, 2K, V], given the pair entering every local
    sequence X_seq [num_local, H, 2K, V]: X_{g+1} = 𝒯_g X_g + ℬ_g along each sequence."""
    twoK = maps.shape[-2]
    Xg = X_seq.new_zeros((plan.num_groups,) + tuple(X_seq.shape[1:]))
    X = X_seq
    for gi, si in plan.fwd_steps:
        Xa = X[si]
        Xg[gi] = Xa
        X = X.index_put((si,), maps[gi][..., :twoK] @ Xa + maps[gi][..., twoK:])
    return Xg


def group_end_grads(Tg, plan: GroupPlan, d0g, G_seq_end):
    """Reverse scan. d0g [NG, H, 2K, V]: what each group's own cotangents send to its initial
    pair when nothing arrives at its end; G_seq_end [num_local, H, 2K, V]: the gradient arriving
    at each sequence's end from outside. Returns (gradient arriving at every group's end
    [NG, ...], gradient into every sequence's initial pair [num_local, ...])."""
    Gend = d0g.new_zeros(d0g.shape)
    G = G_seq_end
    for gi, si in plan.bwd_steps:  # j-th group from the end of every sequence
        Ga = G[si]
        Gend[gi] = Ga
        G = G.index_put((si,), d0g[gi] + Tg[gi].transpose(-1, -2) @ Ga)
    return Gend, G


# ---------------------------------------------------------------------------------------------
# Tree over the groups (what state_pass_cp runs): O(log G) batched steps, none per group
# ---------------------------------------------------------------------------------------------
#
# Forward. tree_up composes each sequence's group maps pairwise, level by level (the rank map is
# the root of the carried-out sequence); once the pair entering every sequence is known,
# tree_down walks the same tree top down: a node's left child is entered with the node's input,
# its right child with left(input) = T_l X + B_l. That gives the pair entering every group, as
# the serial scan group_initial_pairs does, with NG − N_seq products of 2K×2K by 2K×V (the same
# count as the scan) in ⌈log2 G⌉ levels of ~5 batched ops instead of G steps of ~7 ops.
#
# Backward (the adjoint scan G_in(g) = d0_g + T_gᵀ G_end(g), group_end_grads): a node covering
# groups [a..b] sends D + (T_b⋯T_a)ᵀ G_end(b) to its initial pair, where bottom up
# D(l, r) = D_l + T_lᵀ D_r (tree_up_grads); the composed 𝒯 parts are the forward tree's, rebuilt
# from the saved group 𝒯_g (tree_up_T, (NG − N_seq) 2K×2K products: no extra memory kept from the
# forward). Top down from the gradient arriving at each sequence's end: G_end(r) = G_end(node),
# G_end(l) = D_r + T_rᵀ G_end(node) (tree_down_grads).

# One Triton launch per tree level (the torch path above each level is ~5 ops: two gathers,
# the product, the add, a copy). Every walk is, per level, for i over the level's pairs:
#     OUT[o_i] = op(A[a_i]) X[x_i] + ADD[d_i]     (op: the 2K×2K 𝒯 block, or its transpose;
#                                                 ADD only on columns ≥ add_from)
#     OUT[c_i] = X[x_i]                           (tree_down / tree_down_grads: the child that
#                                                 takes its parent's value unchanged)
# The products accumulate in fp32 with IEEE fp32 inputs (input_precision "ieee"), as the torch
# path's fp32 matmul: the maps stay fp32 (DESIGN §5). Outputs are children or parents of the
# nodes read, never the same rows, so one launch per level reads and writes without a race.

def _use_triton(t: torch.Tensor, backend: str) -> bool:
    return backend == "triton" and triton is not None and t.dtype == torch.float32


if triton is not None:
    @triton.jit
    def _level_affine_kernel(
        A, X, ADD, OUT, A_IDX, X_IDX, D_IDX, O_IDX, C_IDX,
        sA, sX, sD, sO, N, ADD_FROM,
        H: tl.constexpr, TWO_K: tl.constexpr, TRANS_A: tl.constexpr, HAS_COPY: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        # program (column block, pair·H + head, row block); sA, sX, sD, sO: row strides (the
        # matrices are [2K, ncols] per (node, head), rows contiguous, heads 2K rows apart)
        i_n = tl.program_id(0)
        i_ih = tl.program_id(1)
        i_m = tl.program_id(2)
        i = i_ih // H
        h = i_ih % H
        a_node = tl.load(A_IDX + i).to(tl.int64)
        x_node = tl.load(X_IDX + i).to(tl.int64)
        d_node = tl.load(D_IDX + i).to(tl.int64)
        o_node = tl.load(O_IDX + i).to(tl.int64)
        o_m = i_m * BM + tl.arange(0, BM)
        o_n = i_n * BN + tl.arange(0, BN)
        m_m = o_m < TWO_K
        m_n = o_n < N
        a_base = A + (a_node * H + h) * TWO_K * sA
        x_base = X + (x_node * H + h) * TWO_K * sX
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, TWO_K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < TWO_K
            if TRANS_A:   # op(A)[m, k] = A[k, m], loaded transposed (no tl.trans, DESIGN §9)
                a = tl.load(a_base + o_k[None, :] * sA + o_m[:, None],
                            mask=m_m[:, None] & m_k[None, :], other=0.0)
            else:
                a = tl.load(a_base + o_m[:, None] * sA + o_k[None, :],
                            mask=m_m[:, None] & m_k[None, :], other=0.0)
            x = tl.load(x_base + o_k[:, None] * sX + o_n[None, :],
                        mask=m_k[:, None] & m_n[None, :], other=0.0)
            acc += tl.dot(a, x, input_precision="ieee")
        m_add = m_m[:, None] & (m_n & (o_n >= ADD_FROM))[None, :]
        d = tl.load(ADD + (d_node * H + h) * TWO_K * sD + o_m[:, None] * sD + o_n[None, :],
                    mask=m_add, other=0.0)
        m_out = m_m[:, None] & m_n[None, :]
        tl.store(OUT + (o_node * H + h) * TWO_K * sO + o_m[:, None] * sO + o_n[None, :],
                 acc + d, mask=m_out)
        if HAS_COPY:
            c_node = tl.load(C_IDX + i).to(tl.int64)
            xm = tl.load(x_base + o_m[:, None] * sX + o_n[None, :], mask=m_out, other=0.0)
            tl.store(OUT + (c_node * H + h) * TWO_K * sO + o_m[:, None] * sO + o_n[None, :],
                     xm, mask=m_out)


def _level_affine(A, a_idx, X, x_idx, o_idx, *, add, add_idx, add_from: int = 0,
                  trans_a: bool = False, copy_to=None):
    """One level of a tree walk in one launch (see above). A: [nodes, H, 2K, ≥ 2K] (its first 2K
    columns are 𝒯); X, the output (X itself: OUT = X) and `add`: [nodes, H, 2K, N]-shaped views
    whose rows may be strided (slices of the store); index tensors on the device."""
    nodes, H, twoK, N = X.shape
    for t in (A, X, add):
        assert t.stride(-1) == 1 and t.stride(1) == twoK * t.stride(-2) and \
            t.stride(0) == H * t.stride(1), "rows must be the only stride"
    n = o_idx.numel()
    if n == 0:
        return
    BM = min(64, max(16, triton.next_power_of_2(twoK)))
    BN = min(64, max(16, triton.next_power_of_2(N)))
    BK = min(32, max(16, triton.next_power_of_2(twoK)))
    grid = (triton.cdiv(N, BN), n * H, triton.cdiv(twoK, BM))
    wgmma.kernel(_level_affine_kernel, "level_affine")[grid](
        A, X, add, X, a_idx, x_idx, add_idx, o_idx, copy_to if copy_to is not None else o_idx,
        A.stride(-2), X.stride(-2), add.stride(-2), X.stride(-2), N, add_from,
        H=H, TWO_K=twoK, TRANS_A=trans_a, HAS_COPY=copy_to is not None,
        BM=BM, BN=BN, BK=BK, num_warps=4, num_stages=2,
    )


def tree_store(prep_args, plan: GroupPlan, *, backend: str, allow_tf32: bool) -> torch.Tensor:
    """A [num_nodes, H, 2K, 2K + V] store holding the group maps in its first NG rows (the rest
    is filled by tree_up)."""
    U, Y = prep_args[0], prep_args[1]
    H, K, V = Y.shape[1], Y.shape[-1], U.shape[-1]
    store = U.new_empty((plan.num_nodes, H, 2 * K, 2 * K + V), dtype=maps_dtype(U, backend))
    group_maps(prep_args, plan, backend=backend, allow_tf32=allow_tf32,
               out=store[:plan.num_groups])
    return store


def _affine(T: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """T X + B over leading batch dims, as one batched product with the add fused (baddbmm)."""
    flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731 - views for the store's slices
    out = torch.baddbmm(flat(B), flat(T), flat(X))
    return out.view(*X.shape[:-2], *out.shape[-2:])


def tree_up(store: torch.Tensor, plan: GroupPlan, backend: str = "torch") -> torch.Tensor:
    """Fill the composed nodes of `store` in place: node (l, r) = [T_r T_l | T_r B_l + B_r]."""
    twoK = store.shape[-2]
    if _use_triton(store, backend):
        for (left, right, a, b), nodes in zip(plan.levels, plan.level_nodes):
            _level_affine(store, right, store, left, nodes, add=store, add_idx=right,
                          add_from=twoK)
        return store
    for left, right, a, b in plan.levels:
        ml, mr = store[left], store[right]
        torch.matmul(mr[..., :twoK], ml, out=store[a:b])
        store[a:b, ..., twoK:] += mr[..., twoK:]
    return store


def tree_down(store: torch.Tensor, plan: GroupPlan, X_seq: torch.Tensor,
              backend: str = "torch") -> torch.Tensor:
    """The pair entering every group, [NG, H, 2K, V], from the pair entering every local sequence
    X_seq [num_local, H, 2K, V] (what group_initial_pairs computes serially)."""
    twoK = store.shape[-2]
    Xs = X_seq.new_empty((plan.num_nodes,) + tuple(X_seq.shape[1:]))
    Xs[plan.root_idx] = X_seq
    if _use_triton(store, backend):   # right child: T_l X + B_l; left child: X (copied)
        for (left, right, a, b), nodes in reversed(list(zip(plan.levels, plan.level_nodes))):
            _level_affine(store, left, Xs, nodes, right, add=store[..., twoK:], add_idx=left,
                          copy_to=left)
        return Xs[:plan.num_groups]
    for left, right, a, b in reversed(plan.levels):
        Xp = Xs[a:b].clone()  # index_put refuses a source inside its destination
        ml = store[left]
        Xs[right] = _affine(ml[..., :twoK], Xp, ml[..., twoK:])
        Xs[left] = Xp
    return Xs[:plan.num_groups]


def tree_up_T(Tg: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """The 𝒯 part of every node, [num_nodes, H, 2K, 2K], from the groups' 𝒯_g [NG, H, 2K, 2K]."""
    Ts = Tg.new_empty((plan.num_nodes,) + tuple(Tg.shape[1:]))
    Ts[:plan.num_groups] = Tg
    for left, right, a, b in plan.levels:
        torch.matmul(Ts[right], Ts[left], out=Ts[a:b])
    return Ts


def tree_up_grads(Ts: torch.Tensor, plan: GroupPlan, d0g: torch.Tensor,
                  backend: str = "torch") -> torch.Tensor:
    """D of every node [num_nodes, H, 2K, V] from the groups' d0_g [NG, H, 2K, V] (what each
    group's own cotangents send to its initial pair when nothing arrives at its end).
    D[plan.root_idx] is then what every sequence's tokens send to its initial pair."""
    Ds = d0g.new_empty((plan.num_nodes,) + tuple(d0g.shape[1:]))
    Ds[:plan.num_groups] = d0g
    if _use_triton(Ds, backend):
        for (left, right, a, b), nodes in zip(plan.levels, plan.level_nodes):
            _level_affine(Ts, left, Ds, right, nodes, add=Ds, add_idx=left, trans_a=True)
        return Ds
    for left, right, a, b in plan.levels:
        Ds[a:b] = _affine(Ts[left].transpose(-1, -2), Ds[right], Ds[left])
    return Ds


def tree_down_grads(Ts: torch.Tensor, Ds: torch.Tensor, plan: GroupPlan,
                    G_seq_end: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """The gradient arriving at every group's end, [NG, H, 2K, V], given the gradient arriving
    at every local sequence's end from outside, G_seq_end [num_local, H, 2K, V] (the first
    result of group_end_grads)."""
    Gs = G_seq_end.new_empty((plan.num_nodes,) + tuple(G_seq_end.shape[1:]))
    Gs[plan.root_idx] = G_seq_end
    if _use_triton(Gs, backend):   # left child: T_rᵀ G + D_r; right child: G (copied)
        for (left, right, a, b), nodes in reversed(list(zip(plan.levels, plan.level_nodes))):
            _level_affine(Ts, right, Gs, nodes, left, add=Ds, add_idx=right, trans_a=True,
                          copy_to=right)
        return Gs[:plan.num_groups]
    for left, right, a, b in reversed(plan.levels):
        Gp = Gs[a:b].clone()
        Gs[left] = _affine(Ts[right].transpose(-1, -2), Gp, Ds[right])
        Gs[right] = Gp
    return Gs[:plan.num_groups]
