"""Triton kernels for the sequential pass over chunks (spec: chunk_torch.state_pass_*_torch).

One program per (value block, sequence, head) carries its K×BV slices of S and M through the
sequence's chunks; the value columns of the recurrence never mix, so V splits freely (and K too
where W is given: _state_pairs_kernel). Operands that a product needs transposed are loaded
transposed (no tl.trans of a dot result: Triton 3.4–3.7.0 mis-compiles that pattern on Hopper,
DESIGN §9). Fixed launch configs (no autotune): they run under TRITON_INTERPRET=1 and start
fast. With 16-bit model inputs the per-chunk operands
(U, Y, Z, Kg, Km) are stored in bf16 and the state is rounded to bf16 for the products (fp32
accumulation, fp32 state), as FLA's GDN kernels do; fp32 inputs keep fp32 operands (exact dots).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch, wgmma


@triton.jit
def _initial_pair(S_INIT, M_INIT, base, kv, m_kv, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_INIT: tl.constexpr):
    """A program's [BK, BV] tiles of the initial pair in fp32 (zeros without one)."""
    if HAS_INIT:
        s = tl.load(S_INIT + base + kv, mask=m_kv, other=0.0).to(tl.float32)
        m = tl.load(M_INIT + base + kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
        m = tl.zeros([BK, BV], dtype=tl.float32)
    return s, m


@triton.jit
def next_pair_tiles(s, m, w, KG, KM, A_END, G_END, U_END, ch, kc, m_k, C: tl.constexpr,
                    K: tl.constexpr, PREC: tl.constexpr):
    """The pair after chunk ch from the one entering it and the chunk's W (fp32 tile) — the
    state pass's step, also CP's group maps' (cp.transition._group_map_kernel):
    S' = a S − g M − Kgᵀ W, M' = u M + Kmᵀ W, over the program's rows (kc: their [BK, C]
    transposed view of a C×K tile)."""
    kg_t = tl.load(KG + ch * C * K + kc, mask=m_k[:, None], other=0.0)
    km_t = tl.load(KM + ch * C * K + kc, mask=m_k[:, None], other=0.0)
    a = tl.load(A_END + ch)
    g = tl.load(G_END + ch)
    uu = tl.load(U_END + ch)
    s_new = a * s - g * m - tl.dot(kg_t, w.to(kg_t.dtype), input_precision=PREC)
    m_new = uu * m + tl.dot(km_t, w.to(km_t.dtype), input_precision=PREC)
    return s_new, m_new


@triton.jit
def next_pair_tiles_kfac(s, m, w, kh_t, CG, CM, A_END, G_END, U_END, ch, o_c, C: tl.constexpr,
                         PREC: tl.constexpr):
    """next_pair_tiles on the factors (KFAC, see _state_bwd_kernel): Kgᵀ W = k̂ᵀ (c_g ⊙ W),
    Kmᵀ W = k̂ᵀ (c_m ⊙ W), with kh_t the program's rows of k̂ transposed [BK, C] and w the
    chunk's W as stored (the operand dtype: the pass that made W and the pass that reads it
    back scale the same values)."""
    cg = tl.load(CG + ch * C + o_c)
    cm = tl.load(CM + ch * C + o_c)
    wf = w.to(cg.dtype)   # fp32 (fp64 with fp64 operands)
    a = tl.load(A_END + ch)
    g = tl.load(G_END + ch)
    uu = tl.load(U_END + ch)
    s_new = a * s - g * m - tl.dot(kh_t, (cg[:, None] * wf).to(kh_t.dtype), input_precision=PREC)
    m_new = uu * m + tl.dot(kh_t, (cm[:, None] * wf).to(kh_t.dtype), input_precision=PREC)
    return s_new, m_new


@triton.jit
def _state_fwd_kernel(
    U, Y, Z, KG, KM, A_END, G_END, U_END, S_INIT, M_INIT,
    W, S0S, M0S, S_FIN, M_FIN, OFFSETS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    KH=None, TM=None, ELE=None, G0R=None, CG=None, CM=None, KFAC: tl.constexpr = False,
):
    # W = U + Y S − Z M contracts over all K rows of the pair, so one program holds them all
    # (BK ≥ K) and only the value columns split.
    # KFAC: Y, Z, Kg, Km are not read; W = U + T (e^{le} ⊙ k̂ S − γ⁻ ⊙ k̂ M) and the pair's
    # step next_pair_tiles_kfac, from k̂ [C, BK] (one tile), T [C, C] and four row vectors.
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    c_start = tl.load(OFFSETS + i_n)
    c_end = tl.load(OFFSETS + i_n + 1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    ck = o_c[:, None] * K + o_k[None, :]       # [C, BK] row-major view of a C×K tile
    kc = o_c[None, :] * K + o_k[:, None]       # [BK, C]: the same tile, transposed
    cv = o_c[:, None] * V + o_v[None, :]
    s, m = _initial_pair(S_INIT, M_INIT, i_nh * K * V, kv, m_kv, BK, BV, HAS_INIT)
    for c in range(c_start, c_end):
        ch = c * H + i_h
        tl.store(S0S + ch * K * V + kv, s.to(S0S.dtype.element_ty), mask=m_kv)
        tl.store(M0S + ch * K * V + kv, m.to(M0S.dtype.element_ty), mask=m_kv)
        u = tl.load(U + ch * C * V + cv, mask=m_v[None, :], other=0.0)
        if KFAC:
            kh = tl.load(KH + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            ks = tl.dot(kh, s.to(kh.dtype), input_precision=PREC)
            km = tl.dot(kh, m.to(kh.dtype), input_precision=PREC)
            x = (tl.load(ELE + ch * C + o_c)[:, None] * ks
                 - tl.load(G0R + ch * C + o_c)[:, None] * km)
            tm = tl.load(TM + ch * C * C + o_c[:, None] * C + o_c[None, :])
            w = (u + tl.dot(tm, x.to(tm.dtype), input_precision=PREC)).to(W.dtype.element_ty)
            tl.store(W + ch * C * V + cv, w, mask=m_v[None, :])
            s, m = next_pair_tiles_kfac(s, m, w, tl.trans(kh), CG, CM, A_END, G_END, U_END, ch,
                                        o_c, C, PREC)
        else:
            y = tl.load(Y + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            z = tl.load(Z + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            w = u + tl.dot(y, s.to(y.dtype), input_precision=PREC) - tl.dot(z, m.to(z.dtype), input_precision=PREC)
            tl.store(W + ch * C * V + cv, w.to(W.dtype.element_ty), mask=m_v[None, :])
            s, m = next_pair_tiles(s, m, w, KG, KM, A_END, G_END, U_END, ch, kc, m_k, C, K, PREC)
    tl.store(S_FIN + i_nh * K * V + kv, s, mask=m_kv)
    tl.store(M_FIN + i_nh * K * V + kv, m, mask=m_kv)


@triton.jit
def _state_pairs_kernel(
    W, KG, KM, A_END, G_END, U_END, S_INIT, M_INIT, S0S, M0S, S_FIN, M_FIN, OFFSETS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    KH=None, CG=None, CM=None, KFAC: tl.constexpr = False,
):
    # The pairs alone from a given W (a forward's output, saved): S' = a S − g M − Kgᵀ W and
    # M' = u M + Kmᵀ W. Given W, a row of the pair depends only on the same row before (the
    # product contracts over the chunk's positions, not over K), so K splits across programs
    # as V does: BK-row blocks, several programs per (sequence, head) where _state_fwd_kernel
    # has one. Each element is the same sum as in the pass that made W, over the same C terms
    # of the same operands (W is stored in the operand dtype the products take).
    i_v = tl.program_id(0)
    i_k = tl.program_id(1)
    i_nh = tl.program_id(2).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    c_start = tl.load(OFFSETS + i_n)
    c_end = tl.load(OFFSETS + i_n + 1)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    kc = o_c[None, :] * K + o_k[:, None]       # [BK, C]: a C×K tile's rows o_k, transposed
    cv = o_c[:, None] * V + o_v[None, :]
    s, m = _initial_pair(S_INIT, M_INIT, i_nh * K * V, kv, m_kv, BK, BV, HAS_INIT)
    for c in range(c_start, c_end):
        ch = c * H + i_h
        tl.store(S0S + ch * K * V + kv, s.to(S0S.dtype.element_ty), mask=m_kv)
        tl.store(M0S + ch * K * V + kv, m.to(M0S.dtype.element_ty), mask=m_kv)
        w = tl.load(W + ch * C * V + cv, mask=m_v[None, :], other=0.0)
        if KFAC:   # the rows o_k of k̂, transposed, in place of Kg's and Km's
            kh_t = tl.load(KH + ch * C * K + kc, mask=m_k[:, None], other=0.0)
            s, m = next_pair_tiles_kfac(s, m, w, kh_t, CG, CM, A_END, G_END, U_END, ch, o_c, C,
                                        PREC)
        else:
            s, m = next_pair_tiles(s, m, w, KG, KM, A_END, G_END, U_END, ch, kc, m_k, C, K, PREC)
    tl.store(S_FIN + i_nh * K * V + kv, s, mask=m_kv)
    tl.store(M_FIN + i_nh * K * V + kv, m, mask=m_kv)


@triton.jit
def _state_bwd_kernel(
    Y, Z, KG, KM, A_END, G_END, U_END, DW, DS0S, DM0S, DS_FIN, DM_FIN, S0S, M0S,
    DWT, DS_END, DM_END, DS_INIT, DM_INIT, DGATES, OFFSETS, NCH,
    QC, LAC, G0C, DO, CS, CL, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    FUSE_OUT: tl.constexpr, OMMDT: tl.constexpr, OPREC: tl.constexpr,
    HAS_DFIN: tl.constexpr, STORE_DINIT: tl.constexpr, INIT_ONLY: tl.constexpr,
    FV: tl.constexpr = "strided", END_LATE: tl.constexpr = False,
    KH=None, TM=None, ELE=None, G0R=None, CG=None, CM=None, KFAC: tl.constexpr = False,
):
    # DGATES [3, NV, NC, H]: this value block's share of dL/da_end, dL/dg_end, dL/du_end.
    # INIT_ONLY: only the initial pair's gradient (DS_INIT, DM_INIT); nothing per chunk is
    # stored and S0S, M0S are not read (the other pointers may be dummies).
    # FUSE_OUT: the output's share of the pair cotangents, dS0s = scale·(e^{la} Q̂)ᵀ dO and
    # dM0s = −scale·(γ Q̂)ᵀ dO, is made here per chunk (operands and rounding as
    # chunk_local_fused._output_bwd_kernel's, then rounded to the pair dtype as its stores are)
    # instead of being read from DS0S / DM0S.
    # FV: how FUSE_OUT forms those two products (FUSE_VARIANTS; the same values, other codegen):
    # "strided" loads Q̂ᵀ [BK, C] through transposed pointers and runs two dots (the pattern
    # that faulted on the H100); "trans" loads Q̂ [C, BK] row by row and tl.trans'es the loaded
    # tile (not a dot result, DESIGN §9); "stack" runs one dot on [e^{la} Q̂ᵀ; −γ Q̂ᵀ] [2BK, C].
    # KFAC (state_pass_bwd_triton's kfac; chunk.state_kfac): the four C×K operands are not read.
    # Each is k̂ scaled by rows or through T = (I + A)⁻¹: Kg = diag(c_g) k̂, Km = diag(c_m) k̂,
    # Y = T diag(e^{le}) k̂, Z = T diag(γ⁻) k̂. The pass loads k̂ (KH, [C, K] in the operand
    # dtype), T (TM, [C, C]) and the four row vectors (fp32, [C]) per chunk and forms
    # Kg dS = c_g ⊙ (k̂ dS), Yᵀ dW = k̂ᵀ (e^{le} ⊙ Tᵀ dW), ...: 1 operand tile in place of 4 (the
    # pass is bound by those loads at K = 256; BENCHMARKS.md, v20). Other roundings: the
    # products round k̂ dS and Tᵀ dW instead of the stored Kg, Y.
    # END_LATE: DS_END / DM_END may be DS0S / DM0S themselves (the end cotangents written over
    # the output's pair cotangents): each chunk's tile of dS_end is stored after that chunk's
    # tile of dS0s has been read and used, behind a CTA barrier (the threads that load an
    # element are not the ones that store it: without the barrier a store could overtake
    # another thread's load). The same sums as the other path, bit for bit. (Storing at the
    # chunk's start instead, with dS0s folded in first, spilled less in ptxas, 32 B against 412
    # at K = 128, but ran slower on the H200: +3.0% / +3.2% op time against +0.9% / +1.7% for
    # this order, plans s12k3 and s12k.)
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    c_start = tl.load(OFFSETS + i_n)
    c_end = tl.load(OFFSETS + i_n + 1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    ck = o_c[:, None] * K + o_k[None, :]
    kc = o_c[None, :] * K + o_k[:, None]
    cv = o_c[:, None] * V + o_v[None, :]
    if HAS_DFIN:
        ds = tl.load(DS_FIN + i_nh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
        dm = tl.load(DM_FIN + i_nh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    else:  # the final pair's cotangent is zero (unused final state)
        ds = tl.zeros([BK, BV], dtype=tl.float32)
        dm = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, c_end - c_start):
        c = c_end - 1 - i
        ch = c * H + i_h
        if not INIT_ONLY:
            if not END_LATE:
                tl.store(DS_END + ch * K * V + kv, ds.to(DS_END.dtype.element_ty), mask=m_kv)
                tl.store(DM_END + ch * K * V + kv, dm.to(DM_END.dtype.element_ty), mask=m_kv)
            s0 = tl.load(S0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
            m0 = tl.load(M0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
            gofs = i_v * NCH * H + ch
            tl.store(DGATES + gofs, tl.sum(tl.sum(ds * s0, 1), 0))
            tl.store(DGATES + NCH * H * tl.num_programs(0) + gofs, -tl.sum(tl.sum(ds * m0, 1), 0))
            tl.store(DGATES + 2 * NCH * H * tl.num_programs(0) + gofs, tl.sum(tl.sum(dm * m0, 1), 0))
        if KFAC:
            kh = tl.load(KH + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            cg = tl.load(CG + ch * C + o_c)
            cm = tl.load(CM + ch * C + o_c)
            dw = tl.load(DW + ch * C * V + cv, mask=m_v[None, :], other=0.0).to(tl.float32)
            dw = (dw - cg[:, None] * tl.dot(kh, ds.to(kh.dtype), input_precision=PREC)
                  + cm[:, None] * tl.dot(kh, dm.to(kh.dtype), input_precision=PREC))
        else:
            kg = tl.load(KG + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            km = tl.load(KM + ch * C * K + ck, mask=m_k[None, :], other=0.0)
            dw = tl.load(DW + ch * C * V + cv, mask=m_v[None, :], other=0.0).to(tl.float32)
            dw = (dw - tl.dot(kg, ds.to(kg.dtype), input_precision=PREC)
                  + tl.dot(km, dm.to(km.dtype), input_precision=PREC))
        if not INIT_ONLY:
            tl.store(DWT + ch * C * V + cv, dw.to(DWT.dtype.element_ty), mask=m_v[None, :])
        if KFAC:
            # Tᵀ dW [C, BV] (T's transpose loaded through its pointers), then k̂ᵀ times its rows
            # scaled by e^{le} and by γ⁻
            t_t = tl.load(TM + ch * C * C + o_c[None, :] * C + o_c[:, None])
            x = tl.dot(t_t, dw.to(t_t.dtype), input_precision=PREC)
            kh_t = tl.trans(kh)
            y_dw = tl.dot(kh_t, (tl.load(ELE + ch * C + o_c)[:, None] * x).to(kh.dtype),
                          input_precision=PREC)
            z_dw = tl.dot(kh_t, (tl.load(G0R + ch * C + o_c)[:, None] * x).to(kh.dtype),
                          input_precision=PREC)
        else:
            y_t = tl.load(Y + ch * C * K + kc, mask=m_k[:, None], other=0.0)
            z_t = tl.load(Z + ch * C * K + kc, mask=m_k[:, None], other=0.0)
        a = tl.load(A_END + ch)
        g = tl.load(G_END + ch)
        uu = tl.load(U_END + ch)
        if FUSE_OUT:
            start = tl.load(CS + c).to(tl.int64)
            length = tl.load(CL + c)
            m_t = o_c < length
            if FV == "trans":
                q_t = tl.trans(tl.load(QC + ch * C * K + ck, mask=m_k[None, :], other=0.0))
            else:
                q_t = tl.load(QC + ch * C * K + kc, mask=m_k[:, None], other=0.0)
            e_la = tl.exp(tl.load(LAC + ch * C + o_c))
            g0 = tl.load(G0C + ch * C + o_c)
            dob = scale * tl.load(DO + ((start + o_c) * H + i_h)[:, None] * V + o_v[None, :],
                                  mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
            dob = dob.to(OMMDT)
            if FV == "stack":
                # rows [0, BK): e^{la} Q̂ᵀ, rows [BK, 2BK): −γ Q̂ᵀ (negating before the rounding
                # is exact: the same bf16 values as −round(γ Q̂ᵀ)); one product, then split
                a2 = tl.join((q_t * e_la[None, :]).to(OMMDT), (q_t * -g0[None, :]).to(OMMDT))
                a2 = tl.reshape(tl.permute(a2, (2, 0, 1)), (2 * BK, C))
                p2 = tl.dot(a2, dob, input_precision=OPREC)
                ds0, dm0 = tl.split(tl.permute(tl.reshape(p2, (2, BK, BV)), (1, 2, 0)))
            else:
                ds0 = tl.dot((q_t * e_la[None, :]).to(OMMDT), dob, input_precision=OPREC)
                dm0 = -tl.dot((q_t * g0[None, :]).to(OMMDT), dob, input_precision=OPREC)
            ds0 = ds0.to(DS_END.dtype.element_ty).to(tl.float32)
            dm0 = dm0.to(DS_END.dtype.element_ty).to(tl.float32)
        else:
            ds0 = tl.load(DS0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
            dm0 = tl.load(DM0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
        if KFAC:
            ds_prev = a * ds + y_dw + ds0
            dm_prev = uu * dm - g * ds - z_dw + dm0
        else:
            ds_prev = a * ds + tl.dot(y_t, dw.to(y_t.dtype), input_precision=PREC) + ds0
            dm_prev = uu * dm - g * ds - tl.dot(z_t, dw.to(z_t.dtype), input_precision=PREC) + dm0
        if END_LATE:
            tl.debug_barrier()
            tl.store(DS_END + ch * K * V + kv, ds.to(DS_END.dtype.element_ty), mask=m_kv)
            tl.store(DM_END + ch * K * V + kv, dm.to(DM_END.dtype.element_ty), mask=m_kv)
        ds = ds_prev
        dm = dm_prev
    if STORE_DINIT:
        tl.store(DS_INIT + i_nh * K * V + kv, ds, mask=m_kv)
        tl.store(DM_INIT + i_nh * K * V + kv, dm, mask=m_kv)


# How the state pass's backward makes the output's pair cotangents with fuse_out
# (MDN_RECOMPUTE_PAIRS=2): name → (the kernel's FV, num_warps, BV divisor). The first one faulted
# on the H100 (illegal shared-memory access at the FUSE_OUT products, Triton 3.6.0); the others
# are candidates for a GPU triage (tools/check_recompute_pairs_gpu.py --fuse-variant). ptxas
# (tools/compile_fused_sm90.py --fuse-variants, sm_90, bf16, K=128, V=256) reports spills and
# shared memory for each. "halfbv": half the value block (more programs, each with half the
# registers for its state tiles).
FUSE_VARIANTS = {
    "strided-w8": ("strided", 8, 1),
    "strided-w4": ("strided", 4, 1),
    "strided-w8-halfbv": ("strided", 8, 2),
    "trans-w8": ("trans", 8, 1),
    "trans-w4": ("trans", 4, 1),
    "trans-w8-halfbv": ("trans", 8, 2),
    "trans-w4-halfbv": ("trans", 4, 2),
    "stack-w8": ("stack", 8, 1),
    "stack-w8-halfbv": ("stack", 8, 2),
}
# The default: the one variant of the H100 triage (2026-11-27, Triton 3.6.0,
# benchmarks/results/logs/suite_f_mode2_triage/) that ran and matched mode 0: trans-w4-halfbv
# (0.0 at B=1 T=200 H=2; 1.1e-3 bf16 rounding at B=8 T=4096 H=6). trans-w8-halfbv (no spills,
# 42 KiB shared) and strided-w4 still fault with an illegal memory access; the others were not run.
DEFAULT_FUSE_VARIANT = "trans-w4-halfbv"


def fuse_variant(name: str | None = None) -> str:
    """The FUSE_VARIANTS name to use: `name`, else MDN_FUSE_VARIANT, else the default."""
    name = name or os.environ.get("MDN_FUSE_VARIANT") or DEFAULT_FUSE_VARIANT
    if name not in FUSE_VARIANTS:
        raise ValueError(f"fuse variant must be one of {sorted(FUSE_VARIANTS)}, got {name!r}")
    return name


def _block_v(K: int, V: int) -> int:
    # Keeps the two K×BV fp32 state tiles within registers: 8K floats per program at K ≤ 256.
    bk = triton.next_power_of_2(K)
    return max(16, min(triton.next_power_of_2(V), 4096 // bk))


def launch_defaults(K: int, V: int) -> dict:
    """The state-pass kernels' own launch parameters (before launch.TUNED and MDN_LAUNCH)."""
    return dict(BV=_block_v(K, V), num_warps=4, num_stages=1)


def pairs_launch_defaults(K: int, V: int) -> dict:
    """_state_pairs_kernel's own launch parameters: 64×64 blocks of the pair on 4 warps, two
    pipeline stages. tools/bench_state_pairs.py on an H200 (plans s20k, s20m; K = 128 and 256 at
    B = 8 × 4K, 2 × 4K and 1 × 16K): the fastest of 14 block choices at three of the four
    shapes, within 5% of the fastest at the fourth (1 × 16K), though ptxas spills 1.4 KB at 4
    warps (sm_90, bf16)."""
    return dict(BK=min(64, max(16, triton.next_power_of_2(K))),
                BV=min(64, max(16, triton.next_power_of_2(V))), num_warps=4, num_stages=2)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (allow_tf32 or dtype != torch.float32) else "ieee"


def fits_shared_memory(K: int, storage_dtype: torch.dtype, chunk: int = 64) -> bool:
    """The four C×K operand tiles (Y, Z, Kg, Km) are staged in shared memory (227 KiB on H100);
    fp32 tiles at K = 256 do not fit, bf16 ones do."""
    tiles = 4 * chunk * triton.next_power_of_2(K) * torch.tensor([], dtype=storage_dtype).element_size()
    return tiles <= 160 * 1024


def _operand_kind(Y, kfac):
    """(K, the operand dtype) from Y, or from kfac's k̂ where the operands are not given."""
    ref = Y if Y is not None else (kfac[0] if kfac else None)
    if ref is None:
        raise ValueError("the state pass needs its operands (Y, Z, Kg, Km) or kfac")
    return ref.shape[-1], ref.dtype


def state_pass_fwd_triton(U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout,
                          allow_tf32: bool = False, W=None, w_out=None, kfac=None):
    """W and the per-chunk pairs come back in the operand dtype (bf16 for 16-bit models, where
    they only feed bf16 products); the final pair in fp32 (fp64 for fp64).

    W given (what an earlier pass over the same operands returned): only the pairs are made
    (_state_pairs_kernel: K splits across programs too), the same sums as that pass's, and U,
    Y, Z may be None (they are not read; W is returned as is).
    w_out (W not given): the buffer W is written into (a contiguous slice of a larger one).
    kfac = (kh, tm, ele, g0r, cg, cm) (state_pass_bwd_triton's; chunk.state_kfac): the
    passes read these factors and Y, Z, Kg, Km may be None. Other roundings than the operands'
    (k̂ S and the scaled W are rounded where the stored Y, Kg were); a W made with kfac gives,
    read back with kfac, the same pairs bit for bit."""
    if W is not None:
        return _pairs_from_w(W, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, allow_tf32,
                             kfac=kfac)
    NC, H, C, V = U.shape
    K, odt = _operand_kind(Y, kfac)
    if kfac is not None:
        kfac = _check_kfac(kfac, NC, H, C, K, odt)
        Y = Z = Kg = Km = U   # not read
    N = layout.num_seqs
    sdt = torch.float64 if U.dtype == torch.float64 else torch.float32
    if w_out is not None:
        if w_out.shape != U.shape or w_out.dtype != odt or not w_out.is_contiguous():
            raise ValueError(f"w_out: needs a contiguous {odt} tensor of shape "
                             f"{tuple(U.shape)}, got {w_out.dtype} {tuple(w_out.shape)}")
        W = w_out
    else:
        W = torch.empty(U.shape, dtype=odt, device=U.device)
    S0s = U.new_empty(NC, H, K, V, dtype=odt)
    M0s = U.new_empty(NC, H, K, V, dtype=odt)
    S_fin = U.new_empty(N, H, K, V, dtype=sdt)
    M_fin = U.new_empty(N, H, K, V, dtype=sdt)
    BK = triton.next_power_of_2(K)
    shape = (K, V) if odt.itemsize == 2 else None
    name = "state_fwd" if kfac is None else "state_fwd_kfac"
    lp = launch.params(name, shape=shape, **launch_defaults(K, V))
    few = launch.fewer_programs_than_sms(triton.cdiv(V, lp["BV"]) * N * H, U.device)
    # FEW_PROGRAMS' values where the grid leaves SMs idle, then the value block chosen by waves
    # of programs (launch.WAVE_BV)
    bv = launch.wave_bv(name, K, V, N * H, launch.sm_count(U.device)) if shape else None
    if few or bv is not None:
        lp = launch.params(name, shape=shape, few_programs=few,
                           chosen=None if bv is None else dict(BV=bv), **launch_defaults(K, V))
    if kfac is not None and BK >= 256 and lp["num_warps"] > 4:
        # Triton 3.6.0 on an H200 (plan s22n): NaN in W and the pairs where 4 warps were right
        raise ValueError(f"state_fwd_kfac: num_warps {lp['num_warps']} at K = {K} gave NaN on "
                         "an H200; 4 warps only (MDN_LAUNCH)")
    has_init = S_init is not None
    grid = (triton.cdiv(V, lp["BV"]), N * H)
    wgmma.kernel(_state_fwd_kernel, "state_fwd")[grid](
        U, Y, Z, Kg, Km, a_end, g_end, u_end,
        S_init if has_init else U, M_init if has_init else U,
        W, S0s, M0s, S_fin, M_fin, layout.seq_chunk_offsets,
        H=H, K=K, V=V, C=C, BK=BK, HAS_INIT=has_init,
        PREC=_precision(odt, allow_tf32), **_kfac_args(kfac), **lp,
    )
    return W, S0s, M0s, S_fin, M_fin


def _kfac_args(kfac, names=("KH", "TM", "ELE", "G0R", "CG", "CM")) -> dict:
    """The kernels' KFAC arguments for kfac's tensors (none without)."""
    return dict(zip(names, kfac), KFAC=True) if kfac else {}


def _pairs_from_w(W, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, allow_tf32,
                  kfac=None):
    """state_pass_fwd_triton with W given: _state_pairs_kernel over (value block, key block,
    sequence·head). Returns W itself, S0s, M0s, S_fin, M_fin."""
    NC, H, C, V = W.shape
    K, odt = _operand_kind(Kg, kfac)
    if W.dtype != odt or not W.is_contiguous():
        raise ValueError(f"W given: needs a contiguous {odt} tensor (the operand dtype), "
                         f"got {W.dtype}")
    if kfac is not None:
        kh, _, _, _, cg, cm = _check_kfac(kfac, NC, H, C, K, odt)
        Kg = Km = W   # not read
    N = layout.num_seqs
    sdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    S0s = W.new_empty(NC, H, K, V)
    M0s = W.new_empty(NC, H, K, V)
    S_fin = W.new_empty(N, H, K, V, dtype=sdt)
    M_fin = W.new_empty(N, H, K, V, dtype=sdt)
    lp = launch.params("state_pairs", shape=(K, V) if W.dtype.itemsize == 2 else None,
                       **pairs_launch_defaults(K, V))
    has_init = S_init is not None
    grid = (triton.cdiv(V, lp["BV"]), triton.cdiv(K, lp["BK"]), N * H)
    wgmma.kernel(_state_pairs_kernel, "state_fwd")[grid](
        W, Kg, Km, a_end, g_end, u_end,
        S_init if has_init else W, M_init if has_init else W,
        S0s, M0s, S_fin, M_fin, layout.seq_chunk_offsets,
        H=H, K=K, V=V, C=C, HAS_INIT=has_init, PREC=_precision(W.dtype, allow_tf32),
        **_kfac_args(kfac and (kh, cg, cm), ("KH", "CG", "CM")), **lp,
    )
    return W, S0s, M0s, S_fin, M_fin


def _check_kfac(kfac, NC: int, H: int, C: int, K: int, op_dtype):
    """kfac's six tensors, contiguous, checked against the pass's shapes (ValueError naming
    the one that is wrong)."""
    if len(kfac) != 6:
        raise ValueError(f"kfac must be (kh, tm, ele, g0r, cg, cm), got {len(kfac)} tensors")
    vdt = torch.float64 if op_dtype == torch.float64 else torch.float32
    want = dict(kh=((NC, H, C, K), op_dtype), tm=((NC, H, C, C), op_dtype),
                ele=((NC, H, C), vdt), g0r=((NC, H, C), vdt), cg=((NC, H, C), vdt),
                cm=((NC, H, C), vdt))
    out = []
    for (name, (shape, dtype)), t in zip(want.items(), kfac):
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"kfac: {name} must be {shape} in {dtype}, got "
                             f"{tuple(t.shape)} in {t.dtype}")
        out.append(t.contiguous())
    return out


def operands_from_factors(kh, tm, ele, g0r, cg, cm):
    """(Y, Z, Kg, Km) [NC, H, C, K] from the factors of kfac (see _state_bwd_kernel): Y = T
    diag(e^{le}) k̂, Z = T diag(γ⁻) k̂, Kg = diag(c_g) k̂, Km = diag(c_m) k̂, as
    chunk_local_fused's preparation makes them; fp32 (fp64 for fp64 factors)."""
    dt = torch.float64 if kh.dtype == torch.float64 else torch.float32
    k = kh.to(dt)
    t = tm.to(dt)
    return (t @ (ele[..., None] * k), t @ (g0r[..., None] * k), cg[..., None] * k,
            cm[..., None] * k)


def state_pass_bwd_triton(Y, Z, Kg, Km, a_end, g_end, u_end, dW, dS0s, dM0s, dS_fin, dM_fin,
                          S0s, M0s, layout, allow_tf32: bool = False, dWt_out=None,
                          fuse_out=None, init_grad: bool = True, init_only: bool = False,
                          fuse_variant_name: str | None = None, end_over_pair_grads: bool = False,
                          kfac=None):
    """Returns dWt, dS_end, dM_end (in the operand dtype), the initial pair's gradient (fp32 or
    fp64) and (da_end, dg_end, du_end) [NC, H], reduced in the kernel. `dWt_out` (optional, may
    be dW itself: every program reads its tile of dW once, before writing the same tile of dWt)
    receives dWt.

    end_over_pair_grads: dS_end, dM_end are written over dS0s, dM0s (returned as those very
    tensors; the caller must own them and not read them again): two [NC, H, K, V] tensors fewer
    at the backward's peak. The kernel stores each chunk's tile after reading the same tile
    (END_LATE in _state_bwd_kernel); the values are those of the separate buffers.

    fuse_out = (qc, la, g0, do, cs, cl, scale, mm_dtype): the output's pair cotangents are made in
    the kernel (dS0s, dM0s are not read and may be None; see _state_bwd_kernel), the way
    `fuse_variant_name` says (FUSE_VARIANTS; default: MDN_FUSE_VARIANT, else
    DEFAULT_FUSE_VARIANT).
    dS_fin = dM_fin = None: the final pair's cotangent is zero. init_grad False: the initial
    pair's gradient is neither made nor returned (None, None).

    init_only: return only the initial pair's gradient (dS_init, dM_init). The same reverse
    chain, but nothing per chunk is written and S0s, M0s are not read (they may be None): the
    traffic drops from ~7 to ~3 [NC, H, K, V]-sized tensors (context parallelism runs this pass
    first to learn what every group sends back, state_pass_cp).

    kfac = (kh, tm, ele, g0r, cg, cm) (see _state_bwd_kernel's KFAC): the factors the
    four operands are made of, k̂ [NC, H, C, K] in the operand dtype, T [NC, H, C, C] in the
    operand dtype, e^{le}, γ⁻, c_g, c_m [NC, H, C] fp32 (fp64 with fp64 operands;
    operands_from_factors gives Y, Z, Kg, Km from them); Y, Z, Kg, Km are then not read (Y
    may be None). StateOutput passes them where chunk.state_kfac says (by default K > 128)."""
    NC, H, C, V = dW.shape
    K, odt = _operand_kind(Y, kfac)
    if kfac is not None:
        kfac = _check_kfac(kfac, NC, H, C, K, odt)
        Y = Z = Kg = Km = kfac[0]   # not read (Y gives the fused output's dummy pointers)
    N = layout.num_seqs
    sdt = torch.float64 if dW.dtype == torch.float64 else torch.float32
    if init_only:   # dummies for the pointers the kernel does not touch
        if fuse_out is not None or not init_grad:
            raise ValueError("init_only makes the initial pair's gradient alone (no fuse_out)")
        dWt = dW
    elif dWt_out is None:
        dWt = torch.empty(dW.shape, dtype=Y.dtype, device=dW.device)
    else:
        if dWt_out.shape != dW.shape or dWt_out.dtype != Y.dtype or not dWt_out.is_contiguous():
            raise ValueError("dWt_out must be a contiguous tensor of dW's shape in the operand dtype")
        dWt = dWt_out
    if end_over_pair_grads:
        if init_only or fuse_out is not None:
            raise ValueError("end_over_pair_grads needs dS0s and dM0s (no init_only, no fuse_out)")
        for name, t in (("dS0s", dS0s), ("dM0s", dM0s)):
            if (t is None or t.shape != (NC, H, K, V) or t.dtype != Y.dtype
                    or not t.is_contiguous()):
                raise ValueError(f"end_over_pair_grads: {name} must be a contiguous "
                                 f"{(NC, H, K, V)} tensor in the operand dtype {Y.dtype}")
    if init_only:
        dS_end = dM_end = S0s = M0s = dW
    elif end_over_pair_grads:
        dS_end, dM_end = dS0s, dM0s
    else:
        dS_end = dW.new_empty(NC, H, K, V, dtype=Y.dtype)
        dM_end = dW.new_empty(NC, H, K, V, dtype=Y.dtype)
    if init_grad:
        dS_init = dW.new_empty(N, H, K, V, dtype=sdt)
        dM_init = dW.new_empty(N, H, K, V, dtype=sdt)
    else:
        dS_init = dM_init = None
    has_dfin = dS_fin is not None
    if has_dfin != (dM_fin is not None):
        raise ValueError("dS_fin and dM_fin must both be given or both be None")
    BK, BV = triton.next_power_of_2(K), _block_v(K, V)
    fv, num_warps = "strided", 4
    if fuse_out is not None:
        fv, num_warps, bv_div = FUSE_VARIANTS[fuse_variant(fuse_variant_name)]
        BV = max(16, BV // bv_div)
    # fuse_out's variants keep their own blocks and warps (FUSE_VARIANTS)
    tuned_for = (K, V) if Y.dtype.itemsize == 2 and fuse_out is None else None
    lp = launch.params("state_bwd", shape=tuned_for, BV=BV, num_warps=num_warps, num_stages=1)
    grid = (triton.cdiv(V, lp["BV"]), N * H)
    dgates = dW if init_only else dW.new_empty(3, grid[0], NC, H, dtype=sdt)
    if fuse_out is None:
        qc, la, g0, do, cs, cl, scale = Y, a_end, a_end, dW, layout.seq_chunk_offsets, \
            layout.seq_chunk_offsets, 1.0
        ommdt, oprec = tl.float32, "ieee"
    else:
        from .chunk_local_fused import _prec, _tl_mm
        qc, la, g0, do, cs, cl, scale, mm_dtype = fuse_out
        ommdt = _tl_mm(mm_dtype)
        oprec = _prec(ommdt)
        dS0s = dM0s = dW  # not read
    wgmma.kernel(_state_bwd_kernel, "state_bwd")[grid](
        Y, Z, Kg, Km, a_end, g_end, u_end, dW, dS0s, dM0s,
        dS_fin if has_dfin else dW, dM_fin if has_dfin else dW, S0s, M0s,
        dWt, dS_end, dM_end, dS_init if init_grad else dW, dM_init if init_grad else dW,
        dgates, layout.seq_chunk_offsets, NC,
        qc, la, g0, do, cs, cl, float(scale),
        H=H, K=K, V=V, C=C, BK=BK, PREC=_precision(Y.dtype, allow_tf32),
        FUSE_OUT=fuse_out is not None, OMMDT=ommdt, OPREC=oprec, HAS_DFIN=has_dfin,
        STORE_DINIT=init_grad, INIT_ONLY=init_only, FV=fv, END_LATE=end_over_pair_grads,
        **_kfac_args(kfac), **lp,
    )
    if init_only:
        return dS_init, dM_init
    return dWt, dS_end, dM_end, dS_init, dM_init, dgates.sum(1)
