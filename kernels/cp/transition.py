"""A rank's affine map X_out = 𝒯 X_in + ℬ over its chunks, built with chunk-level parallelism.

Per chunk c (per head) the state pass maps the pair X = [S; M] (2K×V) affinely:

    W = U + Y S − Z M,  S' = a S − g M − Kgᵀ W,  M' = u M + Kmᵀ W
    ⇒ X' = T_c X + b_c,  T_c = [[aI − KgᵀY, −gI + KgᵀZ], [KmᵀY, uI − KmᵀZ]],  b_c = [−KgᵀU; KmᵀU]

𝒯 is the ordered product of the T_c and ℬ the composed offset. Running the ordinary state-pass
recurrence on a 2K+V wide "value" [E | U-columns] started from [I_2K | X0-columns], with the
first 2K value columns' U set to 0, gives [𝒯 | 𝒯 X0 + ℬ] at the end: the recurrence only ever
multiplies the pair from the left, so every column evolves independently.

Parallel plan. The chunks of a sequence are cut into groups of `group_chunks` consecutive
chunks; each (group, head, value block) is one independent serial recurrence (a Triton program,
or one batched torch step per chunk position), then the groups' maps are composed by a
log-depth tree of batched products (a, b) ↦ (T_b T_a, T_b B_a + B_b). Nothing here walks all the
chunks one after another with only per-head parallelism (DESIGN §9: FLA's CP pays 3.2× for that).

FLOPs per head, for n tokens (n/C chunks) in G groups, value width V:
    group recurrences: 8·n·K·(2K + V)      (per chunk: Y S, Z M, Kgᵀ W, Kmᵀ W, each 2·C·K·(2K+V))
    tree:              2·(G − 1)·(2K)²·(2K + V)
The forward state pass of the op itself costs 8·n·K·V, so at K = 128, V = 256 the group
recurrences are 2× the op's forward state pass, and the tree is (G·K)/(n) of the recurrences:
with the default group length of ⌈16·K / C⌉ chunks (~16·K tokens) it is ≤ 1/16 of them.
"""
from __future__ import annotations

import math

import torch

try:  # Triton is optional for the torch path (CPU)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def default_group_chunks(K: int, chunk_size: int) -> int:
    """Chunks per serial group: ~16·K tokens, so the tree costs ≤ 1/16 of the recurrences."""
    return max(1, math.ceil(16 * K / chunk_size))


def split_groups(starts: list[int], lengths: list[int], group_chunks: int):
    """Cut each slot's chunk range [start, start+length) into groups of ≤ group_chunks.

    Returns (group_start, group_len, group_slot, first_of_slot) as python lists."""
    g_start, g_len, g_slot, g_first = [], [], [], []
    for p, (s, n) in enumerate(zip(starts, lengths)):
        for j, o in enumerate(range(0, n, group_chunks)):
            g_start.append(s + o)
            g_len.append(min(group_chunks, n - o))
            g_slot.append(p)
            g_first.append(j == 0)
    return g_start, g_len, g_slot, g_first


# ---------------------------------------------------------------------------------------------
# Group recurrences: torch (spec, CPU) and Triton (GPU, or the interpreter)
# ---------------------------------------------------------------------------------------------

def group_maps_torch(U, Y, Z, Kg, Km, a_end, g_end, u_end, g_start, g_len, init_S, init_M):
    """[𝒯_g | 𝒯_g X0_g + ℬ_g] for every group g: [NG, H, 2K, 2K + V].

    U [NC, H, C, V]; Y, Z, Kg, Km [NC, H, C, K]; a_end, g_end, u_end [NC, H]; g_start, g_len [NG]
    int64; init_S, init_M [NG, H, K, V]: the pair the ℬ columns start from (zeros except for a
    slot's first group, which may start a sequence from its initial state)."""
    NG = g_start.numel()
    H, K = Y.shape[1], Y.shape[-1]
    V = U.shape[-1]
    dt, dev = U.dtype, U.device
    eye = torch.eye(K, dtype=dt, device=dev)
    zk = torch.zeros(K, K, dtype=dt, device=dev)
    # Columns [0, K): the S-part of 𝒯; [K, 2K): the M-part; [2K, 2K+V): ℬ.
    S = torch.cat([eye.expand(NG, H, K, K), zk.expand(NG, H, K, K), init_S], dim=-1)
    M = torch.cat([zk.expand(NG, H, K, K), eye.expand(NG, H, K, K), init_M], dim=-1)
    max_len = int(g_len.max().item()) if NG else 0
    for s in range(max_len):  # all groups advance together: one batched step per chunk position
        act = (g_len > s).nonzero()[:, 0]
        ci = g_start[act] + s
        Sa, Ma = S[act], M[act]
        W = Y[ci] @ Sa - Z[ci] @ Ma
        W[..., 2 * K:] += U[ci]
        S_new = a_end[ci][..., None, None] * Sa - g_end[ci][..., None, None] * Ma - Kg[ci].transpose(-1, -2) @ W
        M_new = u_end[ci][..., None, None] * Ma + Km[ci].transpose(-1, -2) @ W
        S = S.index_put((act,), S_new)
        M = M.index_put((act,), M_new)
    return torch.cat([S, M], dim=-2)


if triton is not None:
    @triton.jit
    def _group_map_kernel(
        U, Y, Z, KG, KM, A_END, G_END, U_END, INIT_S, INIT_M, OUT, G_START, G_LEN,
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
        is_b = (o_col >= 2 * K) & (o_col < NCOL)          # ℬ columns (carry U and X0)
        o_u = tl.where(is_b, o_col - 2 * K, 0)
        m_kb = m_k[:, None] & is_b[None, :]
        kv = i_gh * K * V + o_k[:, None] * V + o_u[None, :]
        s = tl.where(o_k[:, None] == o_col[None, :], 1.0, 0.0)
        m = tl.where(o_k[:, None] + K == o_col[None, :], 1.0, 0.0)
        s += tl.load(INIT_S + kv, mask=m_kb, other=0.0).to(tl.float32)
        m += tl.load(INIT_M + kv, mask=m_kb, other=0.0).to(tl.float32)
        ck = o_c[:, None] * K + o_k[None, :]
        kc = o_c[None, :] * K + o_k[:, None]
        cu = o_c[:, None] * V + o_u[None, :]
        for c in range(c_start, c_end):
            ch = c * H + i_h
            y = tl.load(Y + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            z = tl.load(Z + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            u = tl.load(U + ch * C * V + cu, mask=is_b[None, :], other=0.0)
            w = u + tl.dot(y, s, input_precision=PREC) - tl.dot(z, m, input_precision=PREC)
            kg_t = tl.load(KG + ch * C * K + kc, mask=m_k[:, None], other=0.0)
            km_t = tl.load(KM + ch * C * K + kc, mask=m_k[:, None], other=0.0)
            a = tl.load(A_END + ch)
            g = tl.load(G_END + ch)
            uu = tl.load(U_END + ch)
            s_new = a * s - g * m - tl.dot(kg_t, w, input_precision=PREC)
            m = uu * m + tl.dot(km_t, w, input_precision=PREC)
            s = s_new
        m_out = m_k[:, None] & (o_col[None, :] < NCOL)
        out = OUT + i_gh * 2 * K * NCOL + o_k[:, None] * NCOL + o_col[None, :]
        tl.store(out, s, mask=m_out)
        tl.store(out + K * NCOL, m, mask=m_out)


def group_maps_triton(U, Y, Z, Kg, Km, a_end, g_end, u_end, g_start, g_len, init_S, init_M,
                      allow_tf32: bool = False):
    """Triton version of group_maps_torch (fp32 compute; same arguments and result)."""
    from mdn_kernels.mdn.state_pass import _block_v, _precision
    NC, H, C, V = U.shape
    K = Y.shape[-1]
    NG = g_start.numel()
    ncol = 2 * K + V
    out = U.new_empty(NG, H, 2 * K, ncol)
    BK, BV = triton.next_power_of_2(K), _block_v(K, ncol)
    grid = (triton.cdiv(ncol, BV), NG * H)
    _group_map_kernel[grid](
        U, Y, Z, Kg, Km, a_end, g_end, u_end, init_S.contiguous(), init_M.contiguous(), out,
        g_start, g_len, H=H, K=K, V=V, C=C, BK=BK, BV=BV,
        PREC=_precision(U.dtype, allow_tf32), num_warps=4,
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


def rank_map(prep_args, S_init, M_init, layout, view, *, backend: str, allow_tf32: bool,
             group_chunks: int | None = None) -> torch.Tensor:
    """(𝒯, ℬ) of this rank for every slot: [P, H, 2K, 2K + V] = [𝒯 | ℬ].

    prep_args: (U, Y, Z, Kg, Km, a_end, g_end, u_end) in chunk layout; S_init, M_init
    [num_local, H, K, V]: the initial pairs of the local sequences (rows of carried-in sequences
    are ignored). ℬ is the carried-out pair when the carried-in pair is zero (it includes the
    initial state of a sequence that starts on this rank); 𝒯 = 0 where the carried-out pair does
    not depend on the carried-in one."""
    U, Y = prep_args[0], prep_args[1]
    H, C, K = Y.shape[1], Y.shape[2], Y.shape[-1]
    V = U.shape[-1]
    if group_chunks is None:
        group_chunks = default_group_chunks(K, C)
    off = layout.seq_chunk_offsets.tolist()
    starts = [off[s] for s in view.out_seq]
    lengths = [off[s + 1] - off[s] for s in view.out_seq]
    g_start, g_len, g_slot, g_first = split_groups(starts, lengths, group_chunks)
    NG = len(g_start)
    dev = U.device
    # The ℬ columns of a slot's first group start from the carried-out sequence's own initial
    # state when it starts on this rank (it then does not continue the carried-in pair).
    fresh = torch.tensor([view.in_seq[p] != view.out_seq[p] for p in range(view.num_slots)],
                         device=dev)
    first = torch.tensor(g_first, device=dev)
    slot_seq = torch.tensor(view.out_seq, dtype=torch.int64, device=dev)
    gs = torch.tensor(g_slot, dtype=torch.int64, device=dev)
    use_init = (first & fresh[gs]).to(U.dtype)[:, None, None, None]
    init_S = S_init.to(U.dtype)[slot_seq[gs]] * use_init
    init_M = M_init.to(U.dtype)[slot_seq[gs]] * use_init
    gst = torch.tensor(g_start, dtype=torch.int64, device=dev)
    gln = torch.tensor(g_len, dtype=torch.int64, device=dev)
    if backend == "triton" and U.dtype != torch.float64:
        maps = group_maps_triton(*prep_args, gst, gln, init_S, init_M, allow_tf32)
    else:
        maps = group_maps_torch(*prep_args, gst, gln, init_S, init_M)
    # [NG, ...] → [P, Gmax, ...], padded with identity maps, then the tree.
    counts = [g_slot.count(p) for p in range(view.num_slots)]
    gmax = max(counts)
    twoK = 2 * K
    padded = torch.zeros((view.num_slots, gmax) + tuple(maps.shape[1:]), dtype=maps.dtype, device=dev)
    padded[..., :twoK].copy_(torch.eye(twoK, dtype=maps.dtype, device=dev))
    pos = torch.tensor([j for p in range(view.num_slots) for j in range(counts[p])], device=dev)
    padded[gs, pos] = maps
    out = tree_compose(padded)
    cont = torch.tensor([view.continues(p) for p in range(view.num_slots)], device=dev)
    out[..., :twoK] *= cont.to(out.dtype)[:, None, None, None]
    del V
    return out
