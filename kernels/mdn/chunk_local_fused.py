"""Fused Triton kernels for the chunk-parallel parts of chunkwise MDN (spec: chunk_torch.py).

`LocalPrepare` and `LocalOutput` are drop-in autograd replacements for chunk.py's
`_local_prepare` and `_local_output`: same arguments, same outputs (chunk layout [NC, H, C, ·],
compute dtype fp32), with hand-derived backward kernels. Tokens are read from and written to the
token layout [B·T, H, ·] directly, using each chunk's first token and length (padding rows are
masked to zero, which is exactly the identity-gate padding of layout.py); q, k and v are read
with their token strides (`token_rows`: the model's k and v are slices of the conv output, read
and kept without a copy). The backward kernels read q̂, k̂ either from the fp32 chunks or, with
RAW (chunk.raw_qk, the default), as the raw q, k times the saved l2norm scales: the product the
forward made, so the same values without keeping the chunks. The K and V dimensions are walked
in blocks of at most 64, so the live tiles stay C×64.

Kernels (one program per (chunk, head) unless said):
    prepare fwd: _prepare_a_kernel (gates → decays; q̂, k̂, Kg, Km; A)
                 → _solve_kernel (T = (I + A)⁻¹, blocked; saved for backward)
                 → _prepare_c_kernel ([U, Y, Z] = T R)
    prepare bwd: _prepare_bwd_t_kernel (through T: dv, dA, most of dk̂)
                 → _prepare_bwd_k_kernel (through A's other factors and l2norm: dk, dq, dη)
                 → _prepare_bwd_decay_kernel (through the decays: d log α, d log μ, dβ)
    output:      _output_fwd_kernel (grid adds V blocks), _output_bwd_kernel

Math (per chunk, per head; notation of chunk_torch.py's docstring):
    D1[t,i] = e^{la_t−la_i} (i≤t),  D2[t,i] = e^{le_t−la_i} (i<t),  Dm[i,j] = e^{lu_i−lu_j} (j≤i)
    B = diag(β) Dm;  Γ = D1 B;  Γ⁻ = D2 B;  b = β e^{lu};  γ = D1 b;  γ⁻ = D2 b
    A = Γ⁻ ⊙ (k̂ k̂ᵀ) ⊙ η_col;  T = (I + A)⁻¹;  [U, Y, Z] = T R,  R = [−v, e^{le} k̂, γ⁻ k̂].
T: the 16×16 diagonal blocks by row-by-row forward substitution, then block forward
substitution T_ij = −T_ii Σ_k A_ik T_kj (fp32 products).
Backward of T: dR = Tᵀ d[U,Y,Z] and dA = −Tᵀ (d[U,Y,Z] Rᵀ) Tᵀ on the strict lower triangle;
dA goes through scratch memory so that dAᵀ is a transposed load. Every transpose a product
needs is built elementwise (decay matrices), loaded transposed, or computed as its own product —
never `tl.trans` of a dot result (Triton 3.4–3.7.0 mis-compiles that on Hopper, DESIGN §9).
Decays are always exp of a masked difference of log-cumsums; the gradients of the log-cumsums
go to the gates by a reverse cumsum; l2norm's backward is dx = r (dx̂ − x̂ (x̂·dx̂)).

Only the fp32 compute dtype is supported (fp64 inputs keep the torch path). With 16-bit model
inputs (mm_dtype = bf16) the products over K and V take bf16 operands with fp32 accumulation, as
the torch path's `_mm`; the C×C decay products, the solve and dA run in fp32 (exact "ieee" FMAs
by default; MDN_FUSED_FP32_DOT=tf32x3 puts them on tensor cores at about fp32 accuracy).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch, wgmma
from .layout import PerTensorCache

LOG_FLOOR = -1e4          # as chunk.py: a finite floor for log α, log μ (μ ≡ 0 is GDN mode)
L2NORM_EPS = 1e-6         # as naive.l2norm
# Largest K / V blocks the kernels walk (tests lower them to exercise the block loops). K blocks
# of 32 keep every kernel at C = 64 within 255 registers a thread with at most ~64 bytes of
# spill (ptxas -v for sm_90, K = 128/256, V = 256/512); K blocks of 64 spill up to 1.7 KB.
BLOCK_K = 32
BLOCK_V = 64


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

@triton.jit
def _decay(row, col, mask):
    """exp(row[t] − col[i]) where mask[t, i], else 0 (masked before the exp)."""
    d = row[:, None] - col[None, :]
    return tl.exp(tl.where(mask, d, float("-inf")))


@triton.jit
def _decay_t(x, y, mask):
    """The transpose of _decay(x, y, ·): exp(x[b] − y[a]) at [a, b] where mask[a, b], else 0."""
    d = x[None, :] - y[:, None]
    return tl.exp(tl.where(mask, d, float("-inf")))


@triton.jit
def _pick(x, o_t, idx):
    """x[idx] of a 1-D tile as a scalar."""
    return tl.sum(tl.where(o_t == idx, x, 0.0), axis=0)


@triton.jit
def _sub(x, o_t, o_b):
    """x[o_b]: a sub-vector of a register vector x (indexed by o_t), selected without memory."""
    return tl.sum(tl.where(o_t[None, :] == o_b[:, None], x[None, :], 0.0), axis=1)


@triton.jit
def _gam_pair(la, lu, le, beta, o_t, C: tl.constexpr, F32P: tl.constexpr):
    """Γ = D1 B and Γ⁻ = D2 B. The contraction index runs in blocks of 16, each block's factors
    built from the gate vectors: an fp32 FMA dot over all C = 64 at once needs more than the 255
    registers a thread has (ptxas spills), over 16 it does not."""
    r = o_t[:, None]
    c = o_t[None, :]
    gam = tl.zeros([C, C], dtype=tl.float32)
    gam_r = tl.zeros([C, C], dtype=tl.float32)
    for b0 in tl.static_range(0, C, 16):
        o_b = b0 + tl.arange(0, 16)
        la_b = _sub(la, o_t, o_b)
        bm_b = _sub(beta, o_t, o_b)[:, None] * _decay(_sub(lu, o_t, o_b), lu, o_b[:, None] >= c)
        gam += tl.dot(_decay(la, la_b, r >= o_b[None, :]), bm_b, input_precision=F32P)
        gam_r += tl.dot(_decay(le, la_b, r > o_b[None, :]), bm_b, input_precision=F32P)
    return gam, gam_r


@triton.jit
def _gam_r_t(la, lu, le, beta, o_t, C: tl.constexpr, F32P: tl.constexpr):
    """Γ⁻ᵀ = Bᵀ D2ᵀ, blocked over the contraction index as _gam_pair."""
    r = o_t[:, None]
    c = o_t[None, :]
    acc = tl.zeros([C, C], dtype=tl.float32)
    for b0 in tl.static_range(0, C, 16):
        o_b = b0 + tl.arange(0, 16)
        lu_b = _sub(lu, o_t, o_b)
        bt_b = _sub(beta, o_t, o_b)[None, :] * _decay_t(lu_b, lu, r <= o_b[None, :])   # [C, 16]
        d2t_b = _decay_t(le, _sub(la, o_t, o_b), o_b[:, None] < c)                    # [16, C]
        acc += tl.dot(bt_b, d2t_b, input_precision=F32P)
    return acc


@triton.jit
def _gate_setup(LA, LM, BE, ET, g_off, m_t, o_t, C: tl.constexpr, PTA: tl.constexpr,
                FLOOR: tl.constexpr):
    """Gates of one chunk and head → the decay matrices and vectors of the module docstring."""
    la_raw = tl.load(LA + g_off, mask=m_t, other=0.0).to(tl.float32)
    lm_raw = tl.load(LM + g_off, mask=m_t, other=0.0).to(tl.float32)
    beta = tl.load(BE + g_off, mask=m_t, other=0.0).to(tl.float32)
    eta = tl.load(ET + g_off, mask=m_t, other=0.0).to(tl.float32)
    log_a = tl.maximum(la_raw, FLOOR)
    log_m = tl.maximum(lm_raw, FLOOR)
    la = tl.cumsum(log_a, axis=0)
    lu = tl.cumsum(log_m, axis=0)
    if PTA:
        le = la
    else:
        le = la - log_a
    return la_raw, lm_raw, log_a, beta, eta, la, lu, le


@triton.jit
def _raw_rows(start, o_t, i_h, XS, K: tl.constexpr):
    """Each of the chunk's tokens' element offset of head i_h in a raw q or k [B·T, H, K] with
    token stride XS (elements; head stride K, unit element stride): the op reads a strided view
    (the model's k, a slice of the conv output) as it is, without a contiguous copy."""
    return (start + o_t) * XS + i_h * K


@triton.jit
def _xn_rows(X, R, cck, row, m_t, o_t, o_k, mk, K: tl.constexpr, RAW: tl.constexpr):
    """x̂ [C, BK] (fp32, rows = the chunk's tokens) of q̂ or k̂. RAW False: X is the chunk layout
    [NC, H, C, K] fp32 (padding rows hold zeros). RAW True: X is the raw q or k [B·T, H, K]
    (`row`: each token's offset of this head, _raw_rows) and R the saved scales [NC, H, C]:
    x̂ = x·r, the very product _prepare_a_kernel made, so the values are bitwise those the chunk
    layout held. The scales are loaded here, at each use, not held across the caller's loops:
    held, they cost the output's backward 256 B of register spill (ptxas, K = 128; 20 B loaded
    here)."""
    if RAW:
        x = tl.load(X + row[:, None] + o_k[None, :], mask=m_t[:, None] & mk[None, :],
                    other=0.0)
        return x.to(tl.float32) * tl.load(R + cck + o_t)[:, None]
    else:
        return tl.load(X + (cck + o_t[:, None]) * K + o_k[None, :], mask=mk[None, :], other=0.0)


@triton.jit
def _xn_cols(X, R, cck, row, m_t, o_t, o_k, mk, K: tl.constexpr, RAW: tl.constexpr):
    """x̂ᵀ [BK, C], loaded transposed (as _xn_rows)."""
    if RAW:
        x = tl.load(X + row[None, :] + o_k[:, None], mask=mk[:, None] & m_t[None, :],
                    other=0.0)
        return x.to(tl.float32) * tl.load(R + cck + o_t)[None, :]
    else:
        return tl.load(X + (cck + o_t[None, :]) * K + o_k[:, None], mask=mk[:, None], other=0.0)


# ---------------------------------------------------------------------------------------------
# LocalPrepare: forward (three kernels: chunk quantities and A → (I + A)⁻¹ → products)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prepare_a_kernel(
    Q, KK, LA, LM, BE, ET, CS, CL,
    QC, KC, ETC, LAC, G0C, GAM, KGO, KMO, AEND, GEND, UEND, AMAT, ELE, G0R, RQ, RK, QS, KS,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
    PTA: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr, FLOOR: tl.constexpr,
    EPS: tl.constexpr, F32P: tl.constexpr, CGO=None, CMO=None, KHO=None,
    FACTORS: tl.constexpr = False,
):
    """Gates → decays (Γ, γ, Γ⁻, γ⁻, ends); q̂, k̂, Kg, Km in chunk layout; A = Γ⁻ ⊙ k̂k̂ᵀ ⊙ η.
    FACTORS (the factored state passes, chunk.state_kfac): Kg's and Km's factors instead of Kg
    and Km: the row scales c_g, c_m [C] (Kg = diag(c_g) k̂) and k̂ in KHO's dtype."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    g_off = (start + o_t) * H + i_h
    r = o_t[:, None]
    c = o_t[None, :]
    incl = r >= c
    qrow = _raw_rows(start, o_t, i_h, QS, K)
    krow = _raw_rows(start, o_t, i_h, KS, K)

    _, _, _, beta, eta, la, lu, le = _gate_setup(LA, LM, BE, ET, g_off, m_t, o_t, C, PTA, FLOOR)
    gam, gam_r = _gam_pair(la, lu, le, beta, o_t, C, F32P)
    bvec = beta * tl.exp(lu)
    g0 = tl.sum(_decay(la, la, incl) * bvec[None, :], axis=1)
    g0r = tl.sum(_decay(le, la, r > c) * bvec[None, :], axis=1)
    la_last = _pick(la, o_t, C - 1)
    lu_last = _pick(lu, o_t, C - 1)
    cg = tl.sum(tl.where(r == C - 1, gam, 0.0), axis=0) * eta       # Γ[C−1, j] η_j
    cm = tl.exp(lu_last - lu) * eta
    if FACTORS:
        tl.store(CGO + cck + o_t, cg)
        tl.store(CMO + cck + o_t, cm)
    tl.store(ETC + cck + o_t, eta)
    tl.store(LAC + cck + o_t, la)
    tl.store(G0C + cck + o_t, g0)
    tl.store(ELE + cck + o_t, tl.exp(le))
    tl.store(G0R + cck + o_t, g0r)
    tl.store(GAM + cck * C + r * C + c, gam)
    tl.store(AEND + ch, tl.exp(la_last))
    tl.store(GEND + ch, _pick(g0, o_t, C - 1))
    tl.store(UEND + ch, tl.exp(lu_last))

    if NORM:
        sq = tl.zeros([C], dtype=tl.float32)
        sk = tl.zeros([C], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m = m_t[:, None] & (o_k < K)[None, :]
            qb = tl.load(Q + qrow[:, None] + o_k[None, :], mask=m, other=0.0).to(tl.float32)
            kb = tl.load(KK + krow[:, None] + o_k[None, :], mask=m, other=0.0).to(tl.float32)
            sq += tl.sum(qb * qb, axis=1)
            sk += tl.sum(kb * kb, axis=1)
        rq = 1.0 / tl.sqrt(sq + EPS)
        rk = 1.0 / tl.sqrt(sk + EPS)
    else:
        rq = tl.full([C], 1.0, dtype=tl.float32)
        rk = tl.full([C], 1.0, dtype=tl.float32)
    tl.store(RQ + cck + o_t, rq)
    tl.store(RK + cck + o_t, rk)

    p = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        m = m_t[:, None] & mk[None, :]
        qn = tl.load(Q + qrow[:, None] + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        qn = qn * rq[:, None]
        kn = tl.load(KK + krow[:, None] + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        kn = kn * rk[:, None]
        kn_t = tl.load(KK + krow[None, :] + o_k[:, None], mask=mk[:, None] & m_t[None, :],
                       other=0.0).to(tl.float32) * rk[None, :]
        p += tl.dot(kn.to(MMDT), kn_t.to(MMDT), input_precision=MMPREC)
        ck = (cck + r) * K + o_k[None, :]
        tl.store(QC + ck, qn, mask=mk[None, :])
        tl.store(KC + ck, kn, mask=mk[None, :])
        if FACTORS:
            tl.store(KHO + ck, kn.to(KHO.dtype.element_ty), mask=mk[None, :])
        else:
            tl.store(KGO + ck, (cg[:, None] * kn).to(KGO.dtype.element_ty), mask=mk[None, :])
            tl.store(KMO + ck, (cm[:, None] * kn).to(KMO.dtype.element_ty), mask=mk[None, :])
    tl.store(AMAT + cck * C + r * C + c, gam_r * p * eta[None, :])


@triton.jit
def _inv_diag16(AMAT, base, C: tl.constexpr, i: tl.constexpr):
    """(I + A_ii)⁻¹ of the i-th 16×16 diagonal block, by forward substitution:
    row t = e_t − Σ_{j<t} A[t, j] T[j, :] (A_iiᵀ is loaded, so A[t, :] comes out as a column)."""
    o = tl.arange(0, 16)
    r = o[:, None]
    c = o[None, :]
    a_t = tl.load(AMAT + base + (i * 16 + c) * C + i * 16 + r)         # A_iiᵀ
    t = tl.zeros([16, 16], dtype=tl.float32)
    for s in range(16):
        col = tl.sum(tl.where(c == s, a_t, 0.0), axis=1)
        row = tl.where(o == s, 1.0, 0.0) - tl.sum(col[:, None] * t, axis=0)
        t = tl.where(r == s, row[None, :], t)
    return t


@triton.jit
def _blk(X, base, C: tl.constexpr, i: tl.constexpr, j: tl.constexpr):
    o = tl.arange(0, 16)
    return tl.load(X + base + (i * 16 + o[:, None]) * C + j * 16 + o[None, :])


@triton.jit
def _put(X, base, C: tl.constexpr, i: tl.constexpr, j: tl.constexpr, val):
    o = tl.arange(0, 16)
    tl.store(X + base + (i * 16 + o[:, None]) * C + j * 16 + o[None, :], val)


@triton.jit
def _solve_kernel(AMAT, TMAT, C: tl.constexpr, F32P: tl.constexpr):
    """T = (I + A)⁻¹ for one chunk-head, A strictly lower triangular, C ∈ {16, 32, 64}: the 16×16
    diagonal blocks by substitution, then block forward substitution
    T_ij = −T_ii Σ_{j≤k<i} A_ik T_kj with 16×16 products (all fp32). Upper blocks are zero."""
    base = tl.program_id(0).to(tl.int64) * C * C
    t00 = _inv_diag16(AMAT, base, C, 0)
    _put(TMAT, base, C, 0, 0, t00)
    if C >= 32:
        z = tl.zeros([16, 16], dtype=tl.float32)
        t11 = _inv_diag16(AMAT, base, C, 1)
        t10 = -tl.dot(t11, tl.dot(_blk(AMAT, base, C, 1, 0), t00, input_precision=F32P),
                      input_precision=F32P)
        _put(TMAT, base, C, 1, 1, t11)
        _put(TMAT, base, C, 1, 0, t10)
        _put(TMAT, base, C, 0, 1, z)
        if C >= 64:
            t22 = _inv_diag16(AMAT, base, C, 2)
            t33 = _inv_diag16(AMAT, base, C, 3)
            a20 = _blk(AMAT, base, C, 2, 0)
            a21 = _blk(AMAT, base, C, 2, 1)
            a30 = _blk(AMAT, base, C, 3, 0)
            a31 = _blk(AMAT, base, C, 3, 1)
            a32 = _blk(AMAT, base, C, 3, 2)
            t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=F32P), input_precision=F32P)
            t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision=F32P)
                          + tl.dot(a21, t10, input_precision=F32P), input_precision=F32P)
            t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=F32P), input_precision=F32P)
            t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision=F32P)
                          + tl.dot(a32, t21, input_precision=F32P), input_precision=F32P)
            t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision=F32P)
                          + tl.dot(a31, t10, input_precision=F32P)
                          + tl.dot(a32, t20, input_precision=F32P), input_precision=F32P)
            _put(TMAT, base, C, 2, 2, t22)
            _put(TMAT, base, C, 3, 3, t33)
            _put(TMAT, base, C, 2, 1, t21)
            _put(TMAT, base, C, 2, 0, t20)
            _put(TMAT, base, C, 3, 2, t32)
            _put(TMAT, base, C, 3, 1, t31)
            _put(TMAT, base, C, 3, 0, t30)
            for i in tl.static_range(4):
                for j in tl.static_range(i + 1, 4):
                    _put(TMAT, base, C, i, j, z)


@triton.jit
def _prepare_c_kernel(
    VV, KC, TMAT, ELE, G0R, CS, CL, UO, YO, ZO, VS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr,
    TMO=None, FACTORS: tl.constexpr = False,
):
    """[U, Y, Z] = T [−v, e^{le} k̂, γ⁻ k̂]. FACTORS (chunk.state_kfac): U and T in TMO's dtype,
    not Y, Z (the factored state passes make their products from T and k̂)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    vrow = _raw_rows(start, o_t, i_h, VS, V)   # v read with its token stride (token_rows)
    r = o_t[:, None]
    t32 = tl.load(TMAT + cck * C + r * C + o_t[None, :])
    tmm = t32.to(MMDT)
    if FACTORS:
        tl.store(TMO + cck * C + r * C + o_t[None, :], t32.to(TMO.dtype.element_ty))
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        vb = tl.load(VV + vrow[:, None] + o_v[None, :], mask=m_t[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        ub = tl.dot(tmm, (-vb).to(MMDT), input_precision=MMPREC)
        tl.store(UO + (cck + r) * V + o_v[None, :], ub.to(UO.dtype.element_ty), mask=mv[None, :])
    if not FACTORS:   # Y, Z (the factored passes make their products from T and k̂)
        ele = tl.load(ELE + cck + o_t)
        g0r = tl.load(G0R + cck + o_t)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            mk = o_k < K
            ck = (cck + r) * K + o_k[None, :]
            kn = tl.load(KC + ck, mask=mk[None, :], other=0.0)
            y = tl.dot(tmm, (ele[:, None] * kn).to(MMDT), input_precision=MMPREC)
            z = tl.dot(tmm, (g0r[:, None] * kn).to(MMDT), input_precision=MMPREC)
            tl.store(YO + ck, y.to(YO.dtype.element_ty), mask=mk[None, :])
            tl.store(ZO + ck, z.to(ZO.dtype.element_ty), mask=mk[None, :])


# ---------------------------------------------------------------------------------------------
# LocalPrepare: backward (two kernels: through (I + A)⁻¹ → through the decays and l2norm)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prepare_bwd_t_kernel(
    VV, KC, RK, TMAT, ELE, G0R, CS, CL, DKC, DU, DY, DZ,
    DV, DKN, DA, KDK, DLE, DG0R, KS, VS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr,
    DAP: tl.constexpr, RAW: tl.constexpr,
):
    """dR = Tᵀ dsol (→ dv, and the R_Y, R_Z parts of dk̂, dle, dγ⁻); dT = dsol Rᵀ;
    dA = −Tᵀ dT Tᵀ (strict lower). dk̂'s partial sum (all but the A and Kg/Km terms) and its
    row products with k̂ go to scratch for the second kernel."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    g_off = (start + o_t) * H + i_h
    r = o_t[:, None]
    c = o_t[None, :]
    t_t = tl.load(TMAT + cck * C + c * C + r)                  # Tᵀ, loaded transposed
    krow = _raw_rows(start, o_t, i_h, KS, K)
    vrow = _raw_rows(start, o_t, i_h, VS, V)
    t_t_mm = t_t.to(MMDT)
    ele = tl.load(ELE + cck + o_t)
    g0r = tl.load(G0R + cck + o_t)
    dtm = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        du = tl.load(DU + (cck + r) * V + o_v[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
        vb_t = tl.load(VV + vrow[None, :] + o_v[:, None], mask=mv[:, None] & m_t[None, :],
                       other=0.0).to(tl.float32)
        dtm += tl.dot(du.to(MMDT), (-vb_t).to(MMDT), input_precision=MMPREC)
        dv = -tl.dot(t_t_mm, du.to(MMDT), input_precision=MMPREC)
        tl.store(DV + g_off[:, None] * V + o_v[None, :], dv.to(DV.dtype.element_ty),
                 mask=m_t[:, None] & mv[None, :])
    kdk = tl.zeros([C], dtype=tl.float32)
    kdry = tl.zeros([C], dtype=tl.float32)
    kdrz = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        ck = (cck + r) * K + o_k[None, :]
        kn = _xn_rows(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW)
        kn_t = _xn_cols(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW)
        dy = tl.load(DY + ck, mask=mk[None, :], other=0.0).to(tl.float32)
        dz = tl.load(DZ + ck, mask=mk[None, :], other=0.0).to(tl.float32)
        dtm += tl.dot(dy.to(MMDT), (kn_t * ele[None, :]).to(MMDT), input_precision=MMPREC)
        dtm += tl.dot(dz.to(MMDT), (kn_t * g0r[None, :]).to(MMDT), input_precision=MMPREC)
        dry = tl.dot(t_t_mm, dy.to(MMDT), input_precision=MMPREC)
        drz = tl.dot(t_t_mm, dz.to(MMDT), input_precision=MMPREC)
        dkn = (tl.load(DKC + ck, mask=mk[None, :], other=0.0)
               + ele[:, None] * dry + g0r[:, None] * drz)
        tl.store(DKN + ck, dkn, mask=mk[None, :])
        kdk += tl.sum(kn * dkn, axis=1)
        kdry += tl.sum(kn * dry, axis=1)
        kdrz += tl.sum(kn * drz, axis=1)
    da = -tl.dot(t_t, tl.dot(dtm, t_t, input_precision=DAP), input_precision=DAP)
    tl.store(DA + cck * C + r * C + c, tl.where(r > c, da, 0.0))
    tl.store(KDK + cck + o_t, kdk)
    tl.store(DLE + cck + o_t, ele * kdry)
    tl.store(DG0R + cck + o_t, kdrz)


@triton.jit
def _prepare_bwd_k_kernel(
    LA, LM, BE, ET, CS, CL, QC, KC, RQ, RK, DA, DKN, KDK,
    DQC, DETC, DGAM, DKG, DKM,
    DQ, DK, DET, DGT, DGR, KDKM, QS, KS,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
    PTA: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr, FLOOR: tl.constexpr,
    F32P: tl.constexpr, RAW: tl.constexpr, SYM: tl.constexpr,
):
    """From dA (A = Γ⁻ ⊙ k̂k̂ᵀ ⊙ η_col), Kg, Km and the direct cotangents: dk̂ → dk, dq through
    l2norm's backward, and dη. Hands on to the decay kernel: dΓ⁻ and the total dΓ (scratch
    [C, C]) and k̂·dKm. P = k̂k̂ᵀ is symmetric, so dk̂ gets (dP + dPᵀ) k̂. SYM (prep_bwd_sym(),
    the default): dPᵀ is dP stored over dA's scratch (which nothing reads after this kernel) and
    loaded transposed, and (dP + dPᵀ) k̂ is one product; otherwise (the earlier path) dPᵀ is made
    from dAᵀ and Γ⁻ᵀ, Γ⁻ᵀ recomputed (four fp32 products), and dP k̂ + dPᵀ k̂ are two."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    g_off = (start + o_t) * H + i_h
    r = o_t[:, None]
    c = o_t[None, :]

    _, _, _, beta, eta, la, lu, le = _gate_setup(LA, LM, BE, ET, g_off, m_t, o_t, C, PTA, FLOOR)
    la_last = _pick(la, o_t, C - 1)
    lu_last = _pick(lu, o_t, C - 1)
    # Γ[C−1, j] = Σ_i e^{la_last − la_i} β_i e^{lu_i − lu_j} (i ≥ j)
    gam_last = tl.sum((tl.exp(la_last - la) * beta)[:, None] * _decay(lu, lu, r >= c), axis=0)
    cg = gam_last * eta
    e_lu_rel = tl.exp(lu_last - lu)
    cm = e_lu_rel * eta

    # P = k̂k̂ᵀ; row products k̂·dKg, k̂·dKm, q̂·dq̂
    qrow = _raw_rows(start, o_t, i_h, QS, K)
    krow = _raw_rows(start, o_t, i_h, KS, K)
    p = tl.zeros([C, C], dtype=tl.float32)
    kdkg = tl.zeros([C], dtype=tl.float32)
    kdkm = tl.zeros([C], dtype=tl.float32)
    qdq = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        ck = (cck + r) * K + o_k[None, :]
        kn = _xn_rows(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW)
        kn_t = _xn_cols(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW)
        p += tl.dot(kn.to(MMDT), kn_t.to(MMDT), input_precision=MMPREC)
        kdkg += tl.sum(kn * tl.load(DKG + ck, mask=mk[None, :], other=0.0).to(tl.float32), axis=1)
        kdkm += tl.sum(kn * tl.load(DKM + ck, mask=mk[None, :], other=0.0).to(tl.float32), axis=1)
        qdq += tl.sum(_xn_rows(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW)
                      * tl.load(DQC + ck, mask=mk[None, :], other=0.0), axis=1)

    # dΓ⁻ = dA ⊙ P ⊙ η_col, dP = dA ⊙ Γ⁻ ⊙ η_col, dPᵀ from dAᵀ (a transposed load), dη
    _, gam_r = _gam_pair(la, lu, le, beta, o_t, C, F32P)
    da = tl.load(DA + cck * C + r * C + c)
    tl.store(DGR + cck * C + r * C + c, da * p * eta[None, :])
    dp = da * gam_r * eta[None, :]
    deta = (tl.sum(da * gam_r * p, axis=0) + tl.load(DETC + cck + o_t) + gam_last * kdkg
            + e_lu_rel * kdkm)
    tl.store(DET + g_off, deta.to(DET.dtype.element_ty), mask=m_t)
    if SYM:
        tl.debug_barrier()   # every thread has read its dA before dP overwrites it
        tl.store(DA + cck * C + r * C + c, dp)
        tl.debug_barrier()   # every dP is stored before any is read back transposed
        dp_t = tl.load(DA + cck * C + c * C + r)
    else:
        gam_rt = _gam_r_t(la, lu, le, beta, o_t, C, F32P)
        dp_t = tl.load(DA + cck * C + c * C + r) * gam_rt * eta[:, None]
    # dΓ in total: the direct cotangent and Kg's row C−1
    dgam = tl.load(DGAM + cck * C + r * C + c) + tl.where(r == C - 1, (eta * kdkg)[None, :], 0.0)
    tl.store(DGT + cck * C + r * C + c, dgam)
    tl.store(KDKM + cck + o_t, kdkm)

    # k̂·dk̂ in closed form (P = k̂k̂ᵀ), then dk and dq through l2norm's backward
    if SYM:
        dp = dp + dp_t
        kdk = tl.load(KDK + cck + o_t) + tl.sum(dp * p, axis=1) + cg * kdkg + cm * kdkm
    else:
        kdk = (tl.load(KDK + cck + o_t) + tl.sum(dp * p, axis=1) + tl.sum(dp_t * p, axis=1)
               + cg * kdkg + cm * kdkm)
    if NORM:
        rk = tl.load(RK + cck + o_t)
        rq = tl.load(RQ + cck + o_t)
    dp_mm = dp.to(MMDT)
    if not SYM:
        dp_t_mm = dp_t.to(MMDT)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        ck = (cck + r) * K + o_k[None, :]
        tk = g_off[:, None] * K + o_k[None, :]
        m = m_t[:, None] & mk[None, :]
        kn = _xn_rows(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW)
        kn_mm = kn.to(MMDT)
        dkn = tl.load(DKN + ck, mask=mk[None, :], other=0.0) + tl.dot(dp_mm, kn_mm,
                                                                       input_precision=MMPREC)
        if not SYM:
            dkn += tl.dot(dp_t_mm, kn_mm, input_precision=MMPREC)
        dkn = (dkn
               + cg[:, None] * tl.load(DKG + ck, mask=mk[None, :], other=0.0).to(tl.float32)
               + cm[:, None] * tl.load(DKM + ck, mask=mk[None, :], other=0.0).to(tl.float32))
        dqn = tl.load(DQC + ck, mask=mk[None, :], other=0.0)
        if NORM:
            qn = _xn_rows(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW)
            dkn = rk[:, None] * (dkn - kn * kdk[:, None])
            dqn = rq[:, None] * (dqn - qn * qdq[:, None])
        tl.store(DK + tk, dkn.to(DK.dtype.element_ty), mask=m)
        tl.store(DQ + tk, dqn.to(DQ.dtype.element_ty), mask=m)


@triton.jit
def _prepare_bwd_decay_kernel(
    LA, LM, BE, ET, CS, CL, DGT, DGR, KDKM, DLE, DG0R,
    DLAC, DG0C, DAEND, DGEND, DUEND,
    DLA, DLM, DBE,
    H: tl.constexpr, C: tl.constexpr, PTA: tl.constexpr, FLOOR: tl.constexpr,
    F32P: tl.constexpr,
):
    """The decays' backward: dΓ, dΓ⁻ (from _prepare_bwd_k_kernel), dγ, dγ⁻, the chunk ends and
    Km → d la, d lu, d le → the gates by reverse cumsum; dβ. Γ = D1 B, Γ⁻ = D2 B, γ = D1 b,
    γ⁻ = D2 b; the C×C products run in blocks of 16 of their contraction index, the block of
    dΓ / dΓ⁻ loaded from scratch (rows or columns, as the product needs)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    g_off = (start + o_t) * H + i_h
    r = o_t[:, None]
    c = o_t[None, :]
    incl = r >= c
    strict = r > c
    last = o_t == C - 1

    la_raw, lm_raw, _, beta, eta, la, lu, le = _gate_setup(
        LA, LM, BE, ET, g_off, m_t, o_t, C, PTA, FLOOR)
    la_last = _pick(la, o_t, C - 1)
    lu_last = _pick(lu, o_t, C - 1)
    bvec = beta * tl.exp(lu)
    dle = tl.load(DLE + cck + o_t)
    dg0r = tl.load(DG0R + cck + o_t)
    dg0 = tl.load(DG0C + cck + o_t) + tl.where(last, tl.load(DGEND + ch), 0.0)
    dla = tl.load(DLAC + cck + o_t) + tl.where(last, tl.load(DAEND + ch) * tl.exp(la_last), 0.0)
    s_m = tl.exp(lu_last - lu) * eta * tl.load(KDKM + cck + o_t)          # Km = e^{lu_last−lu} η k̂
    dlu = tl.where(last, tl.load(DUEND + ch) * tl.exp(lu_last) + tl.sum(s_m, axis=0), 0.0) - s_m

    # dD1 = dΓ Bᵀ + dγ bᵀ, dD2 = dΓ⁻ Bᵀ + dγ⁻ bᵀ (contraction over j);
    # dB = D1ᵀ dΓ + D2ᵀ dΓ⁻ (contraction over t)
    dd1 = dg0[:, None] * bvec[None, :]
    dd2 = dg0r[:, None] * bvec[None, :]
    db_m = tl.zeros([C, C], dtype=tl.float32)
    for b0 in tl.static_range(0, C, 16):
        o_b = b0 + tl.arange(0, 16)
        lu_b = _sub(lu, o_t, o_b)
        la_b = _sub(la, o_t, o_b)
        bt_rows = beta[None, :] * _decay_t(lu, lu_b, o_b[:, None] <= c)       # Bᵀ[j∈b, :]
        cols = cck * C + r * C + o_b[None, :]                                  # [C, 16]
        dd1 += tl.dot(tl.load(DGT + cols), bt_rows, input_precision=F32P)
        dd2 += tl.dot(tl.load(DGR + cols), bt_rows, input_precision=F32P)
        rows = cck * C + o_b[:, None] * C + c                                  # [16, C]
        d1t_cols = _decay_t(la_b, la, r <= o_b[None, :])                       # D1ᵀ[:, t∈b]
        d2t_cols = _decay_t(_sub(le, o_t, o_b), la, r < o_b[None, :])          # D2ᵀ[:, t∈b]
        db_m += tl.dot(d1t_cols, tl.load(DGT + rows), input_precision=F32P)
        db_m += tl.dot(d2t_cols, tl.load(DGR + rows), input_precision=F32P)
    e1 = tl.where(incl, dd1 * _decay(la, la, incl), 0.0)
    dla += tl.sum(e1, axis=1) - tl.sum(e1, axis=0)
    d2 = _decay(le, la, strict)
    e2 = tl.where(strict, dd2 * d2, 0.0)
    dle += tl.sum(e2, axis=1)
    dla += dle - tl.sum(e2, axis=0)
    # db = D1ᵀ dγ + D2ᵀ dγ⁻
    db_v = tl.sum(_decay_t(la, la, r <= c) * dg0[None, :], axis=1) \
        + tl.sum(_decay_t(le, la, r < c) * dg0r[None, :], axis=1)
    dm = _decay(lu, lu, incl)
    em = tl.where(incl, db_m * beta[:, None] * dm, 0.0)
    dbeta = tl.sum(tl.where(incl, db_m * dm, 0.0), axis=1) + db_v * tl.exp(lu)
    dlu += tl.sum(em, axis=1) - tl.sum(em, axis=0) + db_v * bvec
    dlog_a = tl.cumsum(dla, axis=0, reverse=True)
    if not PTA:
        dlog_a -= dle
    dlog_m = tl.cumsum(dlu, axis=0, reverse=True)
    dlog_a = tl.where(la_raw >= FLOOR, dlog_a, 0.0)    # clamp's gradient
    dlog_m = tl.where(lm_raw >= FLOOR, dlog_m, 0.0)
    tl.store(DLA + g_off, dlog_a.to(DLA.dtype.element_ty), mask=m_t)
    tl.store(DLM + g_off, dlog_m.to(DLM.dtype.element_ty), mask=m_t)
    tl.store(DBE + g_off, dbeta.to(DBE.dtype.element_ty), mask=m_t)


# ---------------------------------------------------------------------------------------------
# LocalOutput: o = scale·[(e^{la} Q) S0 − (γ Q) M0 − tril(Γ ⊙ Q Kᵀ ⊙ η) W]
# ---------------------------------------------------------------------------------------------

@triton.jit
def _output_fwd_kernel(
    QC, KC, ETC, LAC, G0C, GAM, W, S0S, M0S, CS, CL, O, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    r = o_t[:, None]
    c = o_t[None, :]
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V
    e_la = tl.exp(tl.load(LAC + cck + o_t))
    g0 = tl.load(G0C + cck + o_t)
    eta = tl.load(ETC + cck + o_t)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    p = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        qb = tl.load(QC + (cck + r) * K + o_k[None, :], mask=mk[None, :], other=0.0)
        kb_t = tl.load(KC + (cck + c) * K + o_k[:, None], mask=mk[:, None], other=0.0)
        p += tl.dot(qb.to(MMDT), kb_t.to(MMDT), input_precision=MMPREC)
        kv = ch * K * V + o_k[:, None] * V + o_v[None, :]
        mkv = mk[:, None] & mv[None, :]
        s0 = tl.load(S0S + kv, mask=mkv, other=0.0)
        m0 = tl.load(M0S + kv, mask=mkv, other=0.0)
        acc += tl.dot((e_la[:, None] * qb).to(MMDT), s0.to(MMDT), input_precision=MMPREC)
        acc -= tl.dot((g0[:, None] * qb).to(MMDT), m0.to(MMDT), input_precision=MMPREC)
    attn = tl.where(r >= c, tl.load(GAM + cck * C + r * C + c) * p * eta[None, :], 0.0)
    wb = tl.load(W + (cck + r) * V + o_v[None, :], mask=mv[None, :], other=0.0)
    acc -= tl.dot(attn.to(MMDT), wb.to(MMDT), input_precision=MMPREC)
    tok = start + o_t
    tl.store(O + (tok * H + i_h)[:, None] * V + o_v[None, :], (scale * acc).to(O.dtype.element_ty),
             mask=m_t[:, None] & mv[None, :])


@triton.jit
def _output_bwd_kernel(
    QC, KC, ETC, LAC, G0C, GAM, W, S0S, M0S, CS, CL, DO, scale,
    DQC, DKC, DETC, DLAC, DG0C, DGAM, DW, DS0S, DM0S, RQ, RK, QS, KS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr,
    PAIR_GRAD: tl.constexpr, STORE_DW: tl.constexpr, RAW: tl.constexpr,
):
    # PAIR_GRAD False: dS0s, dM0s are left to the state pass's backward kernel (FUSE_OUT).
    # STORE_DW False: dW was made earlier by _output_bwd_dw_kernel (the same expressions).
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    tok_row = (start + o_t) * H + i_h
    qrow = _raw_rows(start, o_t, i_h, QS, K)
    krow = _raw_rows(start, o_t, i_h, KS, K)
    r = o_t[:, None]
    c = o_t[None, :]
    incl = r >= c
    e_la = tl.exp(tl.load(LAC + cck + o_t))
    g0 = tl.load(G0C + cck + o_t)
    eta = tl.load(ETC + cck + o_t)
    gam = tl.load(GAM + cck * C + r * C + c)
    gam_t = tl.load(GAM + cck * C + c * C + r)
    # P = Q Kᵀ and Pᵀ = K Qᵀ
    p = tl.zeros([C, C], dtype=tl.float32)
    p_t = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        qb = _xn_rows(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW).to(MMDT)
        kb = _xn_rows(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW).to(MMDT)
        qb_t = _xn_cols(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW).to(MMDT)
        kb_t = _xn_cols(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW).to(MMDT)
        p += tl.dot(qb, kb_t, input_precision=MMPREC)
        p_t += tl.dot(kb, qb_t, input_precision=MMPREC)
    attn_t = tl.where(r <= c, gam_t * p_t * eta[:, None], 0.0).to(MMDT)
    # dattn = −dO Wᵀ (and its transpose); dW = −attnᵀ dO, with dO = scale·do
    dat = tl.zeros([C, C], dtype=tl.float32)
    dat_t = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        dob = (scale * tl.load(DO + tok_row[:, None] * V + o_v[None, :],
                               mask=m_t[:, None] & mv[None, :], other=0.0).to(tl.float32)).to(MMDT)
        dob_t = scale * tl.load(DO + tok_row[None, :] * V + o_v[:, None],
                                mask=mv[:, None] & m_t[None, :], other=0.0).to(tl.float32)
        dob_t = dob_t.to(MMDT)
        wb = tl.load(W + (cck + r) * V + o_v[None, :], mask=mv[None, :], other=0.0).to(MMDT)
        wb_t = tl.load(W + (cck + c) * V + o_v[:, None], mask=mv[:, None], other=0.0).to(MMDT)
        dat -= tl.dot(dob, wb_t, input_precision=MMPREC)
        dat_t -= tl.dot(wb, dob_t, input_precision=MMPREC)
        if STORE_DW:
            dwb = -tl.dot(attn_t, dob, input_precision=MMPREC)
            tl.store(DW + (cck + r) * V + o_v[None, :], dwb, mask=mv[None, :])
    dat = tl.where(incl, dat, 0.0)
    dat_t = tl.where(r <= c, dat_t, 0.0)
    tl.store(DGAM + cck * C + r * C + c, dat * p * eta[None, :])
    tl.store(DETC + cck + o_t, tl.sum(dat * gam * p, axis=0))
    dp = (dat * gam * eta[None, :]).to(MMDT)
    dp_t = (dat_t * gam_t * eta[:, None]).to(MMDT)
    dla = tl.zeros([C], dtype=tl.float32)
    dg0 = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        ck = (cck + r) * K + o_k[None, :]
        qb = _xn_rows(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW)
        kb = _xn_rows(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW)
        qb_t = _xn_cols(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW)
        qa_t = (qb_t * e_la[None, :]).to(MMDT)
        qg_t = (qb_t * g0[None, :]).to(MMDT)
        dqs = tl.zeros([C, BK], dtype=tl.float32)
        dqm = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            mv = o_v < V
            dob = scale * tl.load(DO + tok_row[:, None] * V + o_v[None, :],
                                  mask=m_t[:, None] & mv[None, :], other=0.0).to(tl.float32)
            dob = dob.to(MMDT)
            kv_t = ch * K * V + o_k[None, :] * V + o_v[:, None]     # [BV, BK] view of S0ᵀ
            mkv_t = mv[:, None] & mk[None, :]
            s0_t = tl.load(S0S + kv_t, mask=mkv_t, other=0.0).to(MMDT)
            m0_t = tl.load(M0S + kv_t, mask=mkv_t, other=0.0).to(MMDT)
            dqs += tl.dot(dob, s0_t, input_precision=MMPREC)
            dqm += tl.dot(dob, m0_t, input_precision=MMPREC)
            if PAIR_GRAD:
                kv = ch * K * V + o_k[:, None] * V + o_v[None, :]
                mkv = mk[:, None] & mv[None, :]
                tl.store(DS0S + kv, tl.dot(qa_t, dob, input_precision=MMPREC), mask=mkv)
                tl.store(DM0S + kv, -tl.dot(qg_t, dob, input_precision=MMPREC), mask=mkv)
        dqb = (e_la[:, None] * dqs - g0[:, None] * dqm
               + tl.dot(dp, kb.to(MMDT), input_precision=MMPREC))
        dkb = tl.dot(dp_t, qb.to(MMDT), input_precision=MMPREC)
        dla += e_la * tl.sum(qb * dqs, axis=1)
        dg0 -= tl.sum(qb * dqm, axis=1)
        tl.store(DQC + ck, dqb, mask=mk[None, :])
        tl.store(DKC + ck, dkb, mask=mk[None, :])
    tl.store(DLAC + cck + o_t, dla)
    tl.store(DG0C + cck + o_t, dg0)


@triton.jit
def _output_bwd_dw_kernel(
    QC, KC, ETC, GAM, CS, CL, DO, scale, DW, LAC, G0C, DS0S, DM0S, RQ, RK, QS, KS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr, MMPREC: tl.constexpr,
    PAIR_GRAD: tl.constexpr, RAW: tl.constexpr,
):
    """dW = −attnᵀ dO alone, exactly as _output_bwd_kernel makes it: the state pass's backward
    needs dW first, the rest of the output's gradients can wait until its per-chunk pairs'
    cotangents are freed (chunk.StateOutput). PAIR_GRAD: the output's pair cotangents
    dS0s = (e^{la} Q̂)ᵀ dO and dM0s = −(γ Q̂)ᵀ dO too (dO = scale·do), with the operands and
    roundings of _output_bwd_kernel's."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    tok_row = (start + o_t) * H + i_h
    qrow = _raw_rows(start, o_t, i_h, QS, K)
    krow = _raw_rows(start, o_t, i_h, KS, K)
    r = o_t[:, None]
    c = o_t[None, :]
    eta = tl.load(ETC + cck + o_t)
    gam_t = tl.load(GAM + cck * C + c * C + r)
    p_t = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        kb = _xn_rows(KC, RK, cck, krow, m_t, o_t, o_k, mk, K, RAW).to(MMDT)
        qb_t = _xn_cols(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW).to(MMDT)
        p_t += tl.dot(kb, qb_t, input_precision=MMPREC)
    attn_t = tl.where(r <= c, gam_t * p_t * eta[:, None], 0.0).to(MMDT)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        dob = (scale * tl.load(DO + tok_row[:, None] * V + o_v[None, :],
                               mask=m_t[:, None] & mv[None, :], other=0.0).to(tl.float32)).to(MMDT)
        dwb = -tl.dot(attn_t, dob, input_precision=MMPREC)
        tl.store(DW + (cck + r) * V + o_v[None, :], dwb, mask=mv[None, :])
    if PAIR_GRAD:
        e_la = tl.exp(tl.load(LAC + cck + o_t))
        g0 = tl.load(G0C + cck + o_t)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            mk = o_k < K
            qb_t = _xn_cols(QC, RQ, cck, qrow, m_t, o_t, o_k, mk, K, RAW)
            qa_t = (qb_t * e_la[None, :]).to(MMDT)
            qg_t = (qb_t * g0[None, :]).to(MMDT)
            for v0 in range(0, V, BV):
                o_v = v0 + tl.arange(0, BV)
                mv = o_v < V
                dob = scale * tl.load(DO + tok_row[:, None] * V + o_v[None, :],
                                      mask=m_t[:, None] & mv[None, :], other=0.0).to(tl.float32)
                dob = dob.to(MMDT)
                kv = ch * K * V + o_k[:, None] * V + o_v[None, :]
                mkv = mk[:, None] & mv[None, :]
                tl.store(DS0S + kv, tl.dot(qa_t, dob, input_precision=MMPREC), mask=mkv)
                tl.store(DM0S + kv, -tl.dot(qg_t, dob, input_precision=MMPREC), mask=mkv)


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------

_BOUNDS = PerTensorCache()


def chunk_bounds(dest: torch.Tensor, num_chunks: int, chunk_size: int):
    """First token and token count of every chunk, from layout.dest (monotone: chunks hold
    consecutive tokens of one sequence). int32 [NC] each; no host sync.

    Made once per dest tensor (PerTensorCache), as build_layout caches the layout that owns it:
    every layer, forward and backward, of a micro-batch asks for the same bounds, which cost ~7
    small device ops each time (host-bound small micro-batches, BENCHMARKS.md)."""
    def build():
        first_slot = torch.arange(num_chunks, device=dest.device, dtype=dest.dtype) * chunk_size
        start = torch.searchsorted(dest, first_slot)
        end = torch.searchsorted(dest, first_slot + chunk_size)
        return start.to(torch.int32), (end - start).to(torch.int32)
    return _BOUNDS.get(dest, (num_chunks, chunk_size), build)


def _blocks(K: int, V: int):
    return (max(16, min(BLOCK_K, triton.next_power_of_2(K))),
            max(16, min(BLOCK_V, triton.next_power_of_2(V))))


def _tl_mm(mm_dtype):
    if mm_dtype is None or mm_dtype == torch.float32:
        return tl.float32
    if mm_dtype == torch.bfloat16:
        return tl.bfloat16
    if mm_dtype == torch.float16:
        return tl.float16
    raise ValueError(f"mm_dtype must be None, float32, bfloat16 or float16, got {mm_dtype}")


def _f32p() -> str:
    """Precision of the fp32 products (decays, solve, dA; all products for fp32 models):
    MDN_FUSED_FP32_DOT = "ieee" (default: exact fp32 FMAs) or "tf32x3" (three TF32 MMAs on
    tensor cores, about fp32 accuracy) -- a speed knob to measure on the GPU; ptxas reports more
    register spill with it (up to ~1.5 KB in _prepare_bwd_k_kernel, tools/compile_fused_sm90.py)."""
    prec = os.environ.get("MDN_FUSED_FP32_DOT", "ieee")
    if prec not in ("ieee", "tf32x3"):
        raise ValueError(f"MDN_FUSED_FP32_DOT must be 'ieee' or 'tf32x3', got {prec!r}")
    return prec


def prep_bwd_sym() -> bool:
    """MDN_PREP_BWD_SYM: "1" (default) _prepare_bwd_k_kernel makes dPᵀ by a transposed load of
    dP (through dA's scratch) and applies dP + dPᵀ in one product; "0" the earlier path (Γ⁻ᵀ
    recomputed, two products), kept to time against. Results move by float rounding only."""
    flag = os.environ.get("MDN_PREP_BWD_SYM", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"MDN_PREP_BWD_SYM must be 0 or 1, got {flag!r}")
    return flag == "1"


def _prec(mmdt) -> str:
    # fp32 operands: _f32p() (never plain tf32); 16-bit operands: the ordinary MMA path.
    return _f32p() if mmdt == tl.float32 else "tf32"


def _second_order_prec(mmdt) -> str:
    """dA = −Tᵀ dT Tᵀ: two fp32 products over all C. With 16-bit operands elsewhere (dT itself
    comes from bf16 products) TF32 is far below the error already there, and an fp32 FMA dot
    over C = 64 needs more registers than a thread has; fp32 models keep _f32p()."""
    return _f32p() if mmdt == tl.float32 else "tf32"


def _check_cdt(cdt):
    if cdt != torch.float32:
        raise ValueError(f"the fused chunk-local kernels compute in float32 only, got cdt={cdt} "
                         "(float64 inputs take the torch path)")


def _check_chunk(C: int):
    if C not in (16, 32, 64):
        raise ValueError(f"the fused chunk-local kernels support chunk_size 16, 32 or 64, got {C}")


def _num_warps(C: int) -> int:
    return 8 if C >= 64 else 4


# The kernels without a V block loop, and the one without any block loop.
_NO_BV = ("prepare_a", "prepare_bwd_k")
_NO_BLOCKS = ("prepare_bwd_decay",)
# The kernels whose C×C decay products' precision is a launch key (launch.py's f32dot).
_F32DOT = ("prepare_a", "prepare_bwd_k", "prepare_bwd_decay")


def launch_defaults(name: str, K: int, V: int, C: int) -> dict:
    """Kernel `name`'s own launch parameters (before launch.TUNED and MDN_LAUNCH): the K / V
    blocks it takes, num_warps, num_stages."""
    BK, BV = _blocks(K, V)
    d = {} if name in _NO_BLOCKS else dict(BK=BK) if name in _NO_BV else dict(BK=BK, BV=BV)
    if name in _F32DOT:
        d["f32dot"] = int(_f32p() == "tf32x3")
    return dict(d, num_warps=_num_warps(C), num_stages=1)


def _lp(name: str, K: int, V: int, C: int, mmdt) -> dict:
    """Launch parameters of kernel `name` (mdn_kernels.mdn.launch): launch_defaults, with
    16-bit operands at C = 64 the values measured on the H100 (launch.TUNED); MDN_LAUNCH may
    override them."""
    shape = (K, V) if mmdt in (tl.bfloat16, tl.float16) and C == 64 else None
    return launch.params(name, shape=shape, **launch_defaults(name, K, V, C))


def _lp_f32(name: str, K: int, V: int, C: int, mmdt) -> tuple[dict, str]:
    """_lp for the kernels with the f32dot key: (their launch parameters, their F32P)."""
    lp = _lp(name, K, V, C, mmdt)
    return lp, ("tf32x3" if lp.pop("f32dot") else "ieee")


class LocalPrepare(torch.autograd.Function):
    """Fused `chunk._local_prepare`: same arguments, the same 14 outputs
    (qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end), then the l2norm scales
    rq, rk [NC, H, C] fp32 (1 without l2norm; not differentiable), which let the later nodes
    recompute q̂ = q·rq, k̂ = k·rk from the raw q, k instead of keeping qc, kc (raw_qk).

    Saved for backward: the raw v and gates, (I + A)⁻¹ [NC, H, C, C] fp32, per-token vectors
    (e^{le}, γ⁻, the l2norm scales) and, with `raw_qk` (an extra last argument, chunk.raw_qk()),
    the raw q, k [B·T, H, K] (views where token_rows can: the model's k is a slice of the conv
    output, which it keeps anyway) in place of
    the outputs q̂, k̂ (fp32 chunks: 8K bytes per token and head); the backward kernels make
    q̂, k̂ again by the product the forward made, so every gradient is bitwise the same.

    `kfac` (after raw_qk; chunk.state_kfac): six more non-differentiable outputs after rq, rk,
    the factors the factored state passes read instead of Y, Z, Kg, Km: k̂ [NC, H, C, K] and
    T = (I + A)⁻¹ [NC, H, C, C] in op_dtype, e^{le}, γ⁻, c_g, c_m [NC, H, C] fp32. Y, Z, Kg, Km
    are then neither computed nor stored: they come back as zero-stride views of one zero
    (their cotangents, dense, still flow back through them).

    `op_dtype` (an extra last argument, default fp32): the dtype of the state-pass operands
    U, Y, Z, Kg, Km. bf16 there writes them straight in the dtype the state pass stores them in
    for 16-bit models (the same rounding as its `.to(bfloat16)`, without the fp32 copies), and
    their cotangents come back in bf16 as well."""

    @staticmethod
    def forward(ctx, q, k, v, log_alpha, log_mu, beta, eta, dest, num_chunks: int,
                chunk_size: int, cdt: torch.dtype, use_qk_l2norm: bool, p_times_alpha: bool,
                mm_dtype, op_dtype=None, raw_qk: bool = False, kfac: bool = False):
        _check_cdt(cdt)
        _check_chunk(chunk_size)
        B, T, H, K = k.shape
        V = v.shape[-1]
        NC, C = num_chunks, chunk_size
        # views where the strides allow (the model's k and v: slices of the conv output); v is
        # saved, so without raw_qk (the earlier path) its contiguous copy, as before
        q, k = token_rows(q), token_rows(k)
        v = token_rows(v) if raw_qk else v.reshape(B * T, H, V).contiguous()
        gates = [g.reshape(B * T, H).contiguous() for g in (log_alpha, log_mu, beta, eta)]
        cs, cl = chunk_bounds(dest, NC, C)
        new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=k.device)  # noqa: E731
        op_dtype = op_dtype or torch.float32
        if op_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"op_dtype must be float32 or bfloat16, got {op_dtype}")
        op = lambda *shape: torch.empty(*shape, dtype=op_dtype, device=k.device)  # noqa: E731
        qc, kc = new(NC, H, C, K), new(NC, H, C, K)
        if kfac:   # not made (the factors below are): zero-stride stand-ins of their shape
            Y, Z, Kg, Km = (op(()).zero_().expand(NC, H, C, K) for _ in range(4))
        else:
            Y, Z, Kg, Km = (op(NC, H, C, K) for _ in range(4))
        et, la, g0, ele, g0r, rq, rk = (new(NC, H, C) for _ in range(7))
        gam, amat, tmat = (new(NC, H, C, C) for _ in range(3))
        U = op(NC, H, C, V)
        a_end, g_end, u_end = (new(NC, H) for _ in range(3))
        cgm = [new(NC, H, C), new(NC, H, C)] if kfac else []
        kh, tm = (op(NC, H, C, K), op(NC, H, C, C)) if kfac else (None, None)
        mmdt = _tl_mm(mm_dtype)
        if NC > 0:
            lp_a, f32p_a = _lp_f32("prepare_a", K, V, C, mmdt)
            wgmma.kernel(_prepare_a_kernel, "prepare")[(NC, H)](
                q, k, *gates, cs, cl, qc, kc, et, la, g0, gam, Kg, Km, a_end, g_end, u_end,
                amat, ele, g0r, rq, rk, q.stride(0), k.stride(0), H=H, K=K, C=C,
                NORM=use_qk_l2norm,
                PTA=p_times_alpha, MMDT=mmdt, MMPREC=_prec(mmdt), FLOOR=LOG_FLOOR, EPS=L2NORM_EPS,
                F32P=f32p_a,
                **(dict(CGO=cgm[0], CMO=cgm[1], KHO=kh, FACTORS=True) if kfac else {}), **lp_a)
            wgmma.kernel(_solve_kernel, "prepare")[(NC * H,)](amat, tmat, C=C, F32P=_f32p(),
                                     num_warps=1 if C == 16 else 2, num_stages=1)
            wgmma.kernel(_prepare_c_kernel, "prepare")[(NC, H)](
                v, kc, tmat, ele, g0r, cs, cl, U, Y, Z, v.stride(0), H=H, K=K, V=V, C=C,
                MMDT=mmdt, MMPREC=_prec(mmdt), **(dict(TMO=tm, FACTORS=True) if kfac else {}),
                **_lp("prepare_c", K, V, C, mmdt))
        del amat
        qk = (q, k) if raw_qk else (qc, kc)
        ctx.save_for_backward(v, *gates, cs, cl, *qk, tmat, ele, g0r, rq, rk)
        # the token strides of the raw q, k (what the backward kernels read where raw_qk)
        ctx.meta = (B, T, H, K, V, NC, C, use_qk_l2norm, p_times_alpha, mmdt, raw_qk,
                    q.stride(0), k.stride(0))
        ctx.q_dtype, ctx.k_dtype, ctx.op_dtype = q.dtype, k.dtype, op_dtype
        factors = [kh, tm, ele, g0r, *cgm] if kfac else []
        ctx.mark_non_differentiable(rq, rk, *factors)
        return (qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end, rq, rk,
                *factors)

    @staticmethod
    def backward(ctx, *cots):
        v, la_in, lm_in, be_in, et_in, cs, cl, qc, kc, tmat, ele, g0r, rq, rk = ctx.saved_tensors
        B, T, H, K, V, NC, C, norm, pta, mmdt, raw, q_stride, k_stride = ctx.meta
        shapes = [(NC, H, C, K), (NC, H, C, K), (NC, H, C), (NC, H, C), (NC, H, C),
                  (NC, H, C, C), (NC, H, C, V), (NC, H, C, K), (NC, H, C, K), (NC, H, C, K),
                  (NC, H, C, K), (NC, H), (NC, H), (NC, H)]
        # U, Y, Z, Kg, Km (outputs 6..10) may be bf16 (op_dtype): their cotangents stay so.
        dts = [ctx.op_dtype if 6 <= i <= 10 else torch.float32 for i in range(len(shapes))]
        (dqc, dkc, detc, dlac, dg0c, dgam, dU, dY, dZ, dKg, dKm, da_end, dg_end, du_end) = (
            torch.zeros(s, dtype=dt, device=v.device) if g is None
            else g.to(dt).contiguous() for g, s, dt in zip(cots, shapes, dts))
        dq = torch.empty(B * T, H, K, dtype=ctx.q_dtype, device=v.device)
        dk = torch.empty(B * T, H, K, dtype=ctx.k_dtype, device=v.device)
        dv = torch.empty(B * T, H, V, dtype=v.dtype, device=v.device)   # v may be a strided view
        dgates = [torch.empty_like(g) for g in (la_in, lm_in, be_in, et_in)]
        f32 = dict(dtype=torch.float32, device=v.device)
        dkn = torch.empty(NC, H, C, K, **f32)
        da, dgt, dgr = (torch.empty(NC, H, C, C, **f32) for _ in range(3))
        kdk, dle, dg0r, kdkm = (torch.empty(NC, H, C, **f32) for _ in range(4))
        if NC > 0:
            wgmma.kernel(_prepare_bwd_t_kernel, "prepare_bwd")[(NC, H)](
                v, kc, rk, tmat, ele, g0r, cs, cl, dkc, dU, dY, dZ, dv, dkn, da, kdk, dle, dg0r,
                k_stride, v.stride(0), H=H, K=K, V=V, C=C, MMDT=mmdt, MMPREC=_prec(mmdt),
                DAP=_second_order_prec(mmdt), RAW=raw, **_lp("prepare_bwd_t", K, V, C, mmdt))
            lp_k, f32p_k = _lp_f32("prepare_bwd_k", K, V, C, mmdt)
            lp_d, f32p_d = _lp_f32("prepare_bwd_decay", K, V, C, mmdt)
            wgmma.kernel(_prepare_bwd_k_kernel, "prepare_bwd")[(NC, H)](
                la_in, lm_in, be_in, et_in, cs, cl, qc, kc, rq, rk, da, dkn, kdk,
                dqc, detc, dgam, dKg, dKm, dq, dk, dgates[3], dgt, dgr, kdkm, q_stride, k_stride,
                H=H, K=K, C=C, NORM=norm, PTA=pta, MMDT=mmdt, MMPREC=_prec(mmdt),
                FLOOR=LOG_FLOOR, F32P=f32p_k, RAW=raw, SYM=prep_bwd_sym(), **lp_k)
            wgmma.kernel(_prepare_bwd_decay_kernel, "prepare_bwd")[(NC, H)](
                la_in, lm_in, be_in, et_in, cs, cl, dgt, dgr, kdkm, dle, dg0r,
                dlac, dg0c, da_end, dg_end, du_end, *dgates[:3],
                H=H, C=C, PTA=pta, FLOOR=LOG_FLOOR, F32P=f32p_d, **lp_d)
        dq, dk = dq.view(B, T, H, K), dk.view(B, T, H, K)
        dv = dv.view(B, T, H, V)
        dgates = [g.view(B, T, H) for g in dgates]
        return (dq, dk, dv, *dgates) + (None,) * 10


def output_forward(qc, kc, et, la, g0, gam, W, S0s, M0s, cs, cl, scale: float, mm_dtype,
                   out_shape: tuple, out_dtype: torch.dtype, out: torch.Tensor | None = None):
    """o [B, T, H, V] from the chunk quantities and the per-chunk pairs (contiguous inputs).
    `out`: write into it instead (contiguous, out_shape, out_dtype); only the tokens of the given
    chunks are written (cs holds their absolute first tokens), so a caller may run the chunks
    in slices (CP's segmented lean node)."""
    NC, H, C, K = qc.shape
    V = W.shape[-1]
    _check_cdt(qc.dtype)
    for t in (W, S0s, M0s):  # the state pass hands these over in bf16 for 16-bit models
        if t.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"W, S0s, M0s must be float32 or bfloat16, got {t.dtype}")
    if out is None:
        o = torch.empty(out_shape, dtype=out_dtype, device=qc.device)
    else:
        if tuple(out.shape) != tuple(out_shape) or out.dtype != out_dtype or not out.is_contiguous():
            raise ValueError("out must be a contiguous tensor of out_shape and out_dtype")
        o = out
    mmdt = _tl_mm(mm_dtype)
    lp = _lp("output_fwd", K, V, C, mmdt)
    if NC > 0:
        wgmma.kernel(_output_fwd_kernel, "output_fwd")[(NC, H, triton.cdiv(V, lp["BV"]))](
            qc, kc, et, la, g0, gam, W, S0s, M0s, cs, cl, o, float(scale), H=H, K=K, V=V, C=C,
            MMDT=mmdt, MMPREC=_prec(mmdt), **lp)
    return o


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """q, k or v [B, T, H, D] as the kernels read it: [B·T, H, D] with unit element stride, head
    stride D and one token stride; a view where x's strides allow (the model's k and v are
    slices of the conv output: no copy), else a contiguous copy."""
    B, T, H, D = x.shape
    r = x.reshape(B * T, H, D)
    return r if r.stride(2) == 1 and r.stride(1) == D else r.contiguous()


def _raw_norms(qc, kc, norms):
    """(NC, H, C, K) of the chunk quantities, and the kernels' RAW arguments (the scales and the
    token strides): with norms = (rq, rk) [NC, H, C] fp32, qc and kc are the raw q, k
    [B·T, H, K] (token_rows' layout, any float dtype; see LocalPrepare), else the fp32 chunks
    [NC, H, C, K]."""
    if norms is None:
        return qc.shape, (qc, qc, 0, 0)
    rq, rk = norms
    for x in (qc, kc):
        if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
            raise ValueError("norms: q, k must be [B*T, H, K] with head stride K and unit element "
                             f"stride, got {tuple(x.shape)} strides {x.stride()}")
    if rq.shape != rk.shape or rq.dim() != 3:
        raise ValueError(f"norms: rq, rk must be [NC, H, C], got {tuple(rq.shape)}, "
                         f"{tuple(rk.shape)}")
    return (*rq.shape, qc.shape[-1]), (rq, rk, qc.stride(0), kc.stride(0))


def _out_or_new(out, shape, dtype, device, name: str) -> torch.Tensor:
    """`out` checked against what a kernel writes (shape, dtype, contiguous), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out for {name}: needs a contiguous {dtype} tensor of shape "
                         f"{tuple(shape)}, got {out.dtype} {tuple(out.shape)}")
    return out


def output_backward_dw(qc, kc, et, gam, cs, cl, do, scale: float, mm_dtype, w_dtype,
                       pair_of=None, norms=None, out=None):
    """dW alone (see _output_bwd_dw_kernel); pass it to output_backward(dW=...).

    pair_of = (la, g0, S0s): the output's pair cotangents dS0s, dM0s as well (S0s's shape and
    dtype), returned as (dW, dS0s, dM0s); then call output_backward(pair_grads=False, dW=...)
    for the rest. norms = (rq, rk): qc, kc are the raw q, k (see _raw_norms). out: the
    contiguous [NC, H, C, V] w_dtype tensor dW is written into (a slice of a larger one)."""
    (NC, H, C, K), rqk = _raw_norms(qc, kc, norms)
    V = do.shape[-1]
    dW = _out_or_new(out, (NC, H, C, V), w_dtype, qc.device, "dW")
    if pair_of is None:
        la = g0 = dS0s = dM0s = dW   # not touched
    else:
        la, g0, S0s = pair_of
        dS0s, dM0s = torch.empty_like(S0s), torch.empty_like(S0s)
    mmdt = _tl_mm(mm_dtype)
    if NC > 0:
        wgmma.kernel(_output_bwd_dw_kernel, "output_bwd")[(NC, H)](
            qc, kc, et, gam, cs, cl, do.contiguous(), float(scale), dW, la, g0, dS0s, dM0s, *rqk,
            H=H, K=K, V=V, C=C, MMDT=mmdt, MMPREC=_prec(mmdt), PAIR_GRAD=pair_of is not None,
            RAW=norms is not None, **_lp("output_bwd_dw", K, V, C, mmdt))
    return dW if pair_of is None else (dW, dS0s, dM0s)


def output_backward(qc, kc, et, la, g0, gam, W, S0s, M0s, cs, cl, do, scale: float, mm_dtype,
                    pair_grads: bool = True, dW=None, norms=None, out=None):
    """Gradients of (qc, kc, et, la, g0, gam, W, S0s, M0s), each in its input's dtype; with
    pair_grads False the last two are None (the state pass's backward makes them, fused); with
    dW given (output_backward_dw's) it is returned as is and not made again. norms = (rq, rk):
    qc, kc are the raw q, k (see _raw_norms); dqc, dkc are still the fp32 chunks'. out: the
    tensors the first six gradients (and dW, where it is made here) are written into, in that
    order (contiguous slices of larger ones: StateOutput's backward in segments)."""
    (NC, H, C, K), rqk = _raw_norms(qc, kc, norms)
    V = W.shape[-1]
    do = do.contiguous()
    out = list(out) if out is not None else [None] * 7
    names = ("dqc", "dkc", "det", "dla", "dg0", "dgam", "dW")
    shapes = [((NC, H, C, K), torch.float32)] * 2 + [(t.shape, t.dtype) for t in (et, la, g0, gam)]
    grads = [_out_or_new(o, sh, dt, W.device, n) for o, (sh, dt), n in zip(out, shapes, names)]
    grads += [_out_or_new(out[6], W.shape, W.dtype, W.device, "dW") if dW is None else dW]
    grads += [torch.empty_like(t) if pair_grads else None for t in (S0s, M0s)]
    ptrs = grads[:7] + ([grads[7], grads[8]] if pair_grads else [grads[6], grads[6]])
    mmdt = _tl_mm(mm_dtype)
    if NC > 0:
        wgmma.kernel(_output_bwd_kernel, "output_bwd")[(NC, H)](
            qc, kc, et, la, g0, gam, W, S0s, M0s, cs, cl, do, float(scale), *ptrs, *rqk,
            H=H, K=K, V=V, C=C, MMDT=mmdt, MMPREC=_prec(mmdt),
            PAIR_GRAD=pair_grads, STORE_DW=dW is None, RAW=norms is not None,
            **_lp("output_bwd", K, V, C, mmdt))
    return grads


class LocalOutput(torch.autograd.Function):
    """Fused `chunk._local_output`: same arguments, o [B, T, H, V] in out_dtype. `qk_raw`
    (an extra last argument) = (q, k, rq, rk): save those (LocalPrepare's raw_qk) instead of
    qc, kc."""

    @staticmethod
    def forward(ctx, qc, kc, et, la, g0, gam, W, S0s, M0s, dest, scale: float, mm_dtype,
                out_shape: tuple, out_dtype: torch.dtype, qk_raw=None):
        args = [t.contiguous() for t in (qc, kc, et, la, g0, gam, W, S0s, M0s)]
        cs, cl = chunk_bounds(dest, qc.shape[0], qc.shape[2])
        o = output_forward(*args, cs, cl, scale, mm_dtype, out_shape, out_dtype)
        from .chunk import raw_qk_saved
        args, norms = raw_qk_saved(args, qk_raw)
        ctx.save_for_backward(*args, cs, cl, *norms)
        ctx.scale, ctx.mm_dtype = float(scale), mm_dtype
        return o

    @staticmethod
    def backward(ctx, do):
        *args, rq, rk = ctx.saved_tensors
        grads = output_backward(*args, do, ctx.scale, ctx.mm_dtype,
                                norms=None if rq is None else (rq, rk))
        return (*grads, None, None, None, None, None, None)
