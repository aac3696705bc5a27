"""The state pass's reverse pass on factored operands with the key dimension in blocks.

The same recurrence as state_pass._state_bwd_kernel with KFAC (and no FUSE_OUT), whose spec is
chunk_torch.state_pass_bwd_torch: per chunk, from the end cotangents (dS, dM) [K, BV],

    dWt = dW − c_g ⊙ (k̂ dS) + c_m ⊙ (k̂ dM)
    X   = Tᵀ dWt
    dS ← a dS + k̂ᵀ (e^{le} ⊙ X) + dS0,   dM ← u dM − g dS − k̂ᵀ (γ⁻ ⊙ X) + dM0

with the three gate sums ⟨dS, S0⟩, −⟨dS, M0⟩, ⟨dM, M0⟩ per chunk.

Why blocks: the one-tile kernel holds the pair's cotangent as two [K, BV] fp32 tiles and, at
K = 256, every [C, K] and [K, BV] temporary of the step beside them (k̂, its transpose, the
loaded S0, M0, dS0, dM0, the two products k̂ᵀ(·)): ptxas gives it 255 registers and spills
(benchmarks/results/state_bwd_kfac_sm90_k256.json), two programs per SM at most. Here the
cotangent is up to four [BKB, BV] tiles per state (ds1..ds4, dm1..dm4, as FLA's GDN kernels
hold K ≤ 256 in 64-row blocks), and each step's temporaries exist for one block at a time:
k̂ dS is accumulated block by block into one [C, BV] product (tl.dot's acc: the k-steps in
the one-tile kernel's order), and the update of each block reads its own k̂ columns, S0, dS0
rows. Every output is the same sum as the one-tile kernel's; only the gate sums add their
blocks' partial sums in another order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCKS = 4   # ds1..ds4: K ≤ 4 · BKB


# Every tile goes through a block pointer: no per-element offset tensors, which the compiler
# would keep in registers across the chunk loop (four key blocks of them at K = 256).
@triton.jit
def _kv_ptr(P, off, b: tl.constexpr, i_v, K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr,
            BV: tl.constexpr):
    """Block b's [BKB, BV] tile of the [K, V] matrix at P + off, value block i_v."""
    return tl.make_block_ptr(P + off, (K, V), (V, 1), (b * BKB, i_v * BV), (BKB, BV), (1, 0))


@triton.jit
def _load_kv(P, off, b: tl.constexpr, i_v, K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr,
             BV: tl.constexpr):
    """That tile in fp32 (zeros outside the matrix)."""
    return tl.load(_kv_ptr(P, off, b, i_v, K, V, BKB, BV), boundary_check=(0, 1),
                   padding_option="zero").to(tl.float32)


@triton.jit
def _store_kv(P, off, x, b: tl.constexpr, i_v, K: tl.constexpr, V: tl.constexpr,
              BKB: tl.constexpr, BV: tl.constexpr):
    tl.store(_kv_ptr(P, off, b, i_v, K, V, BKB, BV), x.to(P.dtype.element_ty),
             boundary_check=(0, 1))


@triton.jit
def _gate_sums(ds, dm, S0S, M0S, off, b: tl.constexpr, i_v, K: tl.constexpr, V: tl.constexpr,
               BKB: tl.constexpr, BV: tl.constexpr):
    """This block's shares of ⟨dS, S0⟩, ⟨dS, M0⟩, ⟨dM, M0⟩."""
    s0 = _load_kv(S0S, off, b, i_v, K, V, BKB, BV)
    m0 = _load_kv(M0S, off, b, i_v, K, V, BKB, BV)
    return tl.sum(tl.sum(ds * s0, 1), 0), tl.sum(tl.sum(ds * m0, 1), 0), tl.sum(tl.sum(dm * m0, 1), 0)


@triton.jit
def _kh_block(KH, off, b: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BKB: tl.constexpr):
    """k̂'s [C, BKB] columns of block b (operand dtype; zeros past K)."""
    ptr = tl.make_block_ptr(KH + off, (C, K), (K, 1), (0, b * BKB), (C, BKB), (1, 0))
    return tl.load(ptr, boundary_check=(1,), padding_option="zero")


@triton.jit
def _contract_first(ds, dm, KH, off, K: tl.constexpr, C: tl.constexpr, BKB: tl.constexpr,
                    PREC: tl.constexpr):
    """The first block's k̂ dS, k̂ dM [C, BV] (fp32; fp64 with fp64 operands)."""
    kh = _kh_block(KH, off, 0, K, C, BKB)
    p = tl.dot(kh, ds.to(kh.dtype), input_precision=PREC)
    q = tl.dot(kh, dm.to(kh.dtype), input_precision=PREC)
    return p, q


@triton.jit
def _contract(p, q, ds, dm, KH, off, b: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
              BKB: tl.constexpr, PREC: tl.constexpr):
    """(p, q) + block b's k̂ dS, k̂ dM (accumulated in the products)."""
    kh = _kh_block(KH, off, b, K, C, BKB)
    p = tl.dot(kh, ds.to(kh.dtype), acc=p, input_precision=PREC, out_dtype=p.dtype)
    q = tl.dot(kh, dm.to(kh.dtype), acc=q, input_precision=PREC, out_dtype=q.dtype)
    return p, q


@triton.jit
def _step(ds, dm, KH, off_kh, xe, xg, DS0S, DM0S, DS_END, DM_END, off_kv, a, g, uu,
          b: tl.constexpr, i_v, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
          BKB: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, END_LATE: tl.constexpr):
    """Block b's cotangent entering the chunk from the one leaving it; with END_LATE the
    leaving one is stored over the block's dS0 rows once every thread has read them."""
    kh_t = tl.trans(_kh_block(KH, off_kh, b, K, C, BKB))
    y = tl.dot(kh_t, xe, input_precision=PREC)
    z = tl.dot(kh_t, xg, input_precision=PREC)
    ds0 = _load_kv(DS0S, off_kv, b, i_v, K, V, BKB, BV)
    dm0 = _load_kv(DM0S, off_kv, b, i_v, K, V, BKB, BV)
    ds_prev = a * ds + y + ds0
    dm_prev = uu * dm - g * ds - z + dm0
    if END_LATE:
        tl.debug_barrier()
        _store_kv(DS_END, off_kv, ds, b, i_v, K, V, BKB, BV)
        _store_kv(DM_END, off_kv, dm, b, i_v, K, V, BKB, BV)
    return ds_prev, dm_prev


@triton.jit
def _state_bwd_kfac_blocked_kernel(
    KH, TM, ELE, G0R, CG, CM, A_END, G_END, U_END, DW, DS0S, DM0S, DS_FIN, DM_FIN, S0S, M0S,
    DWT, DS_END, DM_END, DS_INIT, DM_INIT, DGATES, OFFSETS, NCH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BKB: tl.constexpr,
    NKB: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, HAS_DFIN: tl.constexpr,
    STORE_DINIT: tl.constexpr, INIT_ONLY: tl.constexpr, END_LATE: tl.constexpr,
):
    # One program per (value block, sequence·head), as _state_bwd_kernel; its arguments and
    # flags mean what they mean there (DGATES [3, NV, NC, H]: this value block's shares).
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    c_start = tl.load(OFFSETS + i_n)
    c_end = tl.load(OFFSETS + i_n + 1)
    o_c = tl.arange(0, C)
    fin = i_nh * K * V
    if HAS_DFIN:
        ds1 = _load_kv(DS_FIN, fin, 0, i_v, K, V, BKB, BV)
        dm1 = _load_kv(DM_FIN, fin, 0, i_v, K, V, BKB, BV)
    else:   # the final pair's cotangent is zero (unused final state)
        ds1 = tl.zeros([BKB, BV], dtype=tl.float32)
        dm1 = tl.zeros([BKB, BV], dtype=tl.float32)
    if NKB > 1:
        if HAS_DFIN:
            ds2 = _load_kv(DS_FIN, fin, 1, i_v, K, V, BKB, BV)
            dm2 = _load_kv(DM_FIN, fin, 1, i_v, K, V, BKB, BV)
        else:
            ds2 = tl.zeros([BKB, BV], dtype=tl.float32)
            dm2 = tl.zeros([BKB, BV], dtype=tl.float32)
    if NKB > 2:
        if HAS_DFIN:
            ds3 = _load_kv(DS_FIN, fin, 2, i_v, K, V, BKB, BV)
            dm3 = _load_kv(DM_FIN, fin, 2, i_v, K, V, BKB, BV)
        else:
            ds3 = tl.zeros([BKB, BV], dtype=tl.float32)
            dm3 = tl.zeros([BKB, BV], dtype=tl.float32)
    if NKB > 3:
        if HAS_DFIN:
            ds4 = _load_kv(DS_FIN, fin, 3, i_v, K, V, BKB, BV)
            dm4 = _load_kv(DM_FIN, fin, 3, i_v, K, V, BKB, BV)
        else:
            ds4 = tl.zeros([BKB, BV], dtype=tl.float32)
            dm4 = tl.zeros([BKB, BV], dtype=tl.float32)
    for i in range(0, c_end - c_start):
        c = c_end - 1 - i
        ch = c * H + i_h
        kv = ch * K * V
        ck = ch * C * K
        if not INIT_ONLY:
            if not END_LATE:
                _store_kv(DS_END, kv, ds1, 0, i_v, K, V, BKB, BV)
                _store_kv(DM_END, kv, dm1, 0, i_v, K, V, BKB, BV)
                if NKB > 1:
                    _store_kv(DS_END, kv, ds2, 1, i_v, K, V, BKB, BV)
                    _store_kv(DM_END, kv, dm2, 1, i_v, K, V, BKB, BV)
                if NKB > 2:
                    _store_kv(DS_END, kv, ds3, 2, i_v, K, V, BKB, BV)
                    _store_kv(DM_END, kv, dm3, 2, i_v, K, V, BKB, BV)
                if NKB > 3:
                    _store_kv(DS_END, kv, ds4, 3, i_v, K, V, BKB, BV)
                    _store_kv(DM_END, kv, dm4, 3, i_v, K, V, BKB, BV)
            g1, g2, g3 = _gate_sums(ds1, dm1, S0S, M0S, kv, 0, i_v, K, V, BKB, BV)
            if NKB > 1:
                h1, h2, h3 = _gate_sums(ds2, dm2, S0S, M0S, kv, 1, i_v, K, V, BKB, BV)
                g1, g2, g3 = g1 + h1, g2 + h2, g3 + h3
            if NKB > 2:
                h1, h2, h3 = _gate_sums(ds3, dm3, S0S, M0S, kv, 2, i_v, K, V, BKB, BV)
                g1, g2, g3 = g1 + h1, g2 + h2, g3 + h3
            if NKB > 3:
                h1, h2, h3 = _gate_sums(ds4, dm4, S0S, M0S, kv, 3, i_v, K, V, BKB, BV)
                g1, g2, g3 = g1 + h1, g2 + h2, g3 + h3
            gofs = i_v * NCH * H + ch
            tl.store(DGATES + gofs, g1)
            tl.store(DGATES + NCH * H * tl.num_programs(0) + gofs, -g2)
            tl.store(DGATES + 2 * NCH * H * tl.num_programs(0) + gofs, g3)
        # k̂ dS, k̂ dM over the blocks, then the chunk's dWt
        p, q = _contract_first(ds1, dm1, KH, ck, K, C, BKB, PREC)
        if NKB > 1:
            p, q = _contract(p, q, ds2, dm2, KH, ck, 1, K, C, BKB, PREC)
        if NKB > 2:
            p, q = _contract(p, q, ds3, dm3, KH, ck, 2, K, C, BKB, PREC)
        if NKB > 3:
            p, q = _contract(p, q, ds4, dm4, KH, ck, 3, K, C, BKB, PREC)
        cg = tl.load(CG + ch * C + o_c)
        cm = tl.load(CM + ch * C + o_c)
        p_dw = tl.make_block_ptr(DW + ch * C * V, (C, V), (V, 1), (0, i_v * BV), (C, BV), (1, 0))
        dw = tl.load(p_dw, boundary_check=(1,), padding_option="zero").to(tl.float32)
        dw = dw - cg[:, None] * p + cm[:, None] * q
        if not INIT_ONLY:
            p_dwt = tl.make_block_ptr(DWT + ch * C * V, (C, V), (V, 1), (0, i_v * BV), (C, BV),
                                      (1, 0))
            tl.store(p_dwt, dw.to(DWT.dtype.element_ty), boundary_check=(1,))
        # Tᵀ dWt (T read transposed through its block pointer), its rows scaled by e^{le}, γ⁻
        p_tt = tl.make_block_ptr(TM + ch * C * C, (C, C), (1, C), (0, 0), (C, C), (0, 1))
        t_t = tl.load(p_tt)
        x = tl.dot(t_t, dw.to(t_t.dtype), input_precision=PREC)
        xe = (tl.load(ELE + ch * C + o_c)[:, None] * x).to(t_t.dtype)
        xg = (tl.load(G0R + ch * C + o_c)[:, None] * x).to(t_t.dtype)
        a = tl.load(A_END + ch)
        g = tl.load(G_END + ch)
        uu = tl.load(U_END + ch)
        ds1, dm1 = _step(ds1, dm1, KH, ck, xe, xg, DS0S, DM0S, DS_END, DM_END, kv, a, g, uu,
                         0, i_v, K, V, C, BKB, BV, PREC, END_LATE)
        if NKB > 1:
            ds2, dm2 = _step(ds2, dm2, KH, ck, xe, xg, DS0S, DM0S, DS_END, DM_END, kv, a, g, uu,
                             1, i_v, K, V, C, BKB, BV, PREC, END_LATE)
        if NKB > 2:
            ds3, dm3 = _step(ds3, dm3, KH, ck, xe, xg, DS0S, DM0S, DS_END, DM_END, kv, a, g, uu,
                             2, i_v, K, V, C, BKB, BV, PREC, END_LATE)
        if NKB > 3:
            ds4, dm4 = _step(ds4, dm4, KH, ck, xe, xg, DS0S, DM0S, DS_END, DM_END, kv, a, g, uu,
                             3, i_v, K, V, C, BKB, BV, PREC, END_LATE)
    if STORE_DINIT:
        _store_kv(DS_INIT, fin, ds1, 0, i_v, K, V, BKB, BV)
        _store_kv(DM_INIT, fin, dm1, 0, i_v, K, V, BKB, BV)
        if NKB > 1:
            _store_kv(DS_INIT, fin, ds2, 1, i_v, K, V, BKB, BV)
            _store_kv(DM_INIT, fin, dm2, 1, i_v, K, V, BKB, BV)
        if NKB > 2:
            _store_kv(DS_INIT, fin, ds3, 2, i_v, K, V, BKB, BV)
            _store_kv(DM_INIT, fin, dm3, 2, i_v, K, V, BKB, BV)
        if NKB > 3:
            _store_kv(DS_INIT, fin, ds4, 3, i_v, K, V, BKB, BV)
            _store_kv(DM_INIT, fin, dm4, 3, i_v, K, V, BKB, BV)


def key_blocks(K: int, block: int) -> tuple[int, int]:
    """(BKB, NKB): the key block (a power of two, at most `block` and the power of two at or
    above K) and how many of them cover K; NKB ≤ MAX_BLOCKS or ValueError."""
    bkb = min(triton.next_power_of_2(K), block)
    nkb = triton.cdiv(K, bkb)
    if nkb > MAX_BLOCKS:
        raise ValueError(f"the blocked reverse pass holds at most {MAX_BLOCKS} key blocks: "
                         f"K = {K} needs {nkb} of {bkb}")
    return bkb, nkb


def fits(K: int, block: int = 64) -> bool:
    """Whether K fits the blocked kernel's ≤ MAX_BLOCKS key blocks of `block` rows."""
    return triton.cdiv(K, min(triton.next_power_of_2(K), block)) <= MAX_BLOCKS
