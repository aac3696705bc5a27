"""Fused Triton kernels for the chunk-parallel parts of chunkwise MDN (spec: chunk_torch.py).

`LocalPrepare` and `LocalOutput` are drop-in autograd replacements for chunk.py's
`_local_prepare` and `_local_output`: same arguments, same outputs (chunk layout [NC, H, C, ·],
compute dtype fp32), with hand-derived backward kernels. One program per (chunk, head) (the
output's forward adds a V-block axis); the K and V dimensions are walked in blocks of at most
64 so the live tiles stay C×64. Tokens are read from and written to the token layout
[B·T, H, ·] directly, using each chunk's first token and length (padding rows are masked to
zero, which is exactly the identity-gate padding of layout.py).

Math (per chunk, per head; notation of chunk_torch.py's docstring):
    D1[t,i] = e^{la_t−la_i} (i≤t),  D2[t,i] = e^{le_t−la_i} (i<t),  Dm[i,j] = e^{lu_i−lu_j} (j≤i)
    B = diag(β) Dm;  Γ = D1 B;  Γ⁻ = D2 B;  b = β e^{lu};  γ = D1 b;  γ⁻ = D2 b
    A = Γ⁻ ⊙ (k kᵀ) ⊙ η_col;  T = (I + A)⁻¹ (forward substitution, row by row);
    [U, Y, Z] = T [−v, e^{le} k, γ⁻ k].
Backward of T: with sol = T R, dR = Tᵀ dsol and dA = −Tᵀ (dsol Rᵀ) Tᵀ (strict lower part);
the transposes a product needs are either built elementwise (decay matrices), loaded transposed
from memory, or computed as their own product (dAᵀ = −T (R dsolᵀ) T) — never `tl.trans` of a
dot result (Triton 3.4–3.7.0 mis-compiles that on Hopper, DESIGN §9). Decays are always
exp of a masked difference of log-cumsums (never a positive exponent); gradients of the
log-cumsums go to the gates by a reverse cumsum.

Only the fp32 compute dtype is supported (fp64 inputs keep the torch path). With 16-bit model
inputs (mm_dtype = bf16) the products over K and V take bf16 operands with fp32 accumulation, as
the torch path's `_mm`; the C×C decay products always run in fp32 ("ieee").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG_FLOOR = -1e4          # as chunk.py: a finite floor for log α, log μ (μ ≡ 0 is GDN mode)
L2NORM_EPS = 1e-6         # as naive.l2norm
BLOCK_CAP = 64            # largest K / V block; tests lower it to exercise the block loops


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


# ---------------------------------------------------------------------------------------------
# LocalPrepare: forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prepare_fwd_kernel(
    Q, KK, VV, LA, LM, BE, ET, CS, CL,
    QC, KC, ETC, LAC, G0C, GAM, UO, YO, ZO, KGO, KMO, AEND, GEND, UEND,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NORM: tl.constexpr, PTA: tl.constexpr,
    MMDT: tl.constexpr, FLOOR: tl.constexpr, EPS: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    o_t = tl.arange(0, C)
    m_t = o_t < length
    tok = start + o_t
    g_off = tok * H + i_h
    r = o_t[:, None]
    c = o_t[None, :]
    incl = r >= c
    strict = r > c

    _, _, log_a, beta, eta, la, lu, le = _gate_setup(LA, LM, BE, ET, g_off, m_t, o_t, C, PTA, FLOOR)
    d1 = _decay(la, la, incl)
    d2 = _decay(le, la, strict)
    dm = _decay(lu, lu, incl)
    bm = beta[:, None] * dm
    gam = tl.dot(d1, bm, input_precision="ieee")
    bvec = beta * tl.exp(lu)
    g0 = tl.sum(d1 * bvec[None, :], axis=1)
    g0r = tl.sum(d2 * bvec[None, :], axis=1)
    la_last = _pick(la, o_t, C - 1)
    lu_last = _pick(lu, o_t, C - 1)
    gam_last = tl.sum(tl.where(r == C - 1, gam, 0.0), axis=0)   # Γ[C−1, j]

    tl.store(ETC + ch * C + o_t, eta)
    tl.store(LAC + ch * C + o_t, la)
    tl.store(G0C + ch * C + o_t, g0)
    tl.store(GAM + ch * C * C + r * C + c, gam)
    tl.store(AEND + ch, tl.exp(la_last))
    tl.store(GEND + ch, _pick(g0, o_t, C - 1))
    tl.store(UEND + ch, tl.exp(lu_last))

    # l2 norms over the whole key dimension first (the blocks below need the scale)
    sq = tl.zeros([C], dtype=tl.float32)
    sk = tl.zeros([C], dtype=tl.float32)
    if NORM:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m = m_t[:, None] & (o_k < K)[None, :]
            tk = g_off[:, None] * K + o_k[None, :]
            qb = tl.load(Q + tk, mask=m, other=0.0).to(tl.float32)
            kb = tl.load(KK + tk, mask=m, other=0.0).to(tl.float32)
            sq += tl.sum(qb * qb, axis=1)
            sk += tl.sum(kb * kb, axis=1)
        rq = 1.0 / tl.sqrt(sq + EPS)
        rk = 1.0 / tl.sqrt(sk + EPS)
    else:
        rq = tl.full([C], 1.0, dtype=tl.float32)
        rk = tl.full([C], 1.0, dtype=tl.float32)

    # P = k̂ k̂ᵀ; normalised q̂, k̂ stored in chunk layout
    p = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = (o_k < K)
        m = m_t[:, None] & mk[None, :]
        tk = g_off[:, None] * K + o_k[None, :]
        qn = tl.load(Q + tk, mask=m, other=0.0).to(tl.float32) * rq[:, None]
        kn = tl.load(KK + tk, mask=m, other=0.0).to(tl.float32) * rk[:, None]
        knt = tl.load(KK + g_off[None, :] * K + o_k[:, None], mask=mk[:, None] & m_t[None, :],
                      other=0.0).to(tl.float32) * rk[None, :]
        p += tl.dot(kn.to(MMDT), knt.to(MMDT), input_precision="ieee")
        ck = ch * C * K + r * K + o_k[None, :]
        tl.store(QC + ck, qn, mask=mk[None, :])
        tl.store(KC + ck, kn, mask=mk[None, :])

    # T = (I + A)⁻¹ by forward substitution: row t = e_t − Σ_{j<t} A[t, j] T[j, :]
    bt = beta[None, :] * _decay_t(lu, lu, r <= c)                  # Bᵀ
    d2t = _decay_t(le, la, r < c)                                     # D2ᵀ
    a_t = tl.dot(bt, d2t, input_precision="ieee")                     # Γ⁻ᵀ, then Aᵀ
    a_t = a_t * p * eta[:, None]
    tmat = tl.zeros([C, C], dtype=tl.float32)
    for t in range(C):
        col = tl.sum(tl.where(c == t, a_t, 0.0), axis=1)          # A[t, :] indexed by j
        row = tl.where(o_t == t, 1.0, 0.0) - tl.sum(col[:, None] * tmat, axis=0)
        tmat = tl.where(r == t, row[None, :], tmat)
    tmm = tmat.to(MMDT)

    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        vb = tl.load(VV + g_off[:, None] * V + o_v[None, :], mask=m_t[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        ub = tl.dot(tmm, (-vb).to(MMDT), input_precision="ieee")
        tl.store(UO + ch * C * V + r * V + o_v[None, :], ub, mask=mv[None, :])

    e_le = tl.exp(le)
    cg = gam_last * eta
    cm = tl.exp(lu_last - lu) * eta
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = (o_k < K)
        m = m_t[:, None] & mk[None, :]
        kn = tl.load(KK + g_off[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32) \
            * rk[:, None]
        yb = tl.dot(tmm, (e_le[:, None] * kn).to(MMDT), input_precision="ieee")
        zb = tl.dot(tmm, (g0r[:, None] * kn).to(MMDT), input_precision="ieee")
        ck = ch * C * K + r * K + o_k[None, :]
        tl.store(YO + ck, yb, mask=mk[None, :])
        tl.store(ZO + ck, zb, mask=mk[None, :])
        tl.store(KGO + ck, cg[:, None] * kn, mask=mk[None, :])
        tl.store(KMO + ck, cm[:, None] * kn, mask=mk[None, :])


# ---------------------------------------------------------------------------------------------
# LocalPrepare: backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prepare_bwd_kernel(
    Q, KK, VV, LA, LM, BE, ET, CS, CL,
    DQC, DKC, DETC, DLAC, DG0C, DGAM, DU, DY, DZ, DKG, DKM, DAEND, DGEND, DUEND,
    DQ, DK, DV, DLA, DLM, DBE, DET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NORM: tl.constexpr, PTA: tl.constexpr,
    MMDT: tl.constexpr, FLOOR: tl.constexpr, EPS: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    o_t = tl.arange(0, C)
    m_t = o_t < length
    tok = start + o_t
    g_off = tok * H + i_h
    r = o_t[:, None]
    c = o_t[None, :]
    incl = r >= c
    strict = r > c
    last = o_t == C - 1

    la_raw, lm_raw, log_a, beta, eta, la, lu, le = _gate_setup(
        LA, LM, BE, ET, g_off, m_t, o_t, C, PTA, FLOOR)
    d1 = _decay(la, la, incl)
    d2 = _decay(le, la, strict)
    dm = _decay(lu, lu, incl)
    bm = beta[:, None] * dm
    d1t = _decay_t(la, la, r <= c)
    d2t = _decay_t(le, la, r < c)
    bt = beta[None, :] * _decay_t(lu, lu, r <= c)
    gam_r = tl.dot(d2, bm, input_precision="ieee")
    gam_rt = tl.dot(bt, d2t, input_precision="ieee")
    bvec = beta * tl.exp(lu)
    g0r = tl.sum(d2 * bvec[None, :], axis=1)
    la_last = _pick(la, o_t, C - 1)
    lu_last = _pick(lu, o_t, C - 1)
    # Γ[C−1, j] = Σ_i e^{la_last − la_i} β_i Dm[i, j]
    w_last = tl.exp(la_last - la) * beta
    gam_last = tl.sum(w_last[:, None] * dm, axis=0)
    e_le = tl.exp(le)
    e_lu_rel = tl.exp(lu_last - lu)
    cg = gam_last * eta
    cm = e_lu_rel * eta
    cck = ch * C                         # row offset of this chunk-head in chunk layout

    # norms, and q̂·dq̂ for l2norm's backward
    sq = tl.zeros([C], dtype=tl.float32)
    sk = tl.zeros([C], dtype=tl.float32)
    qdq = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        m = m_t[:, None] & mk[None, :]
        tk = g_off[:, None] * K + o_k[None, :]
        qb = tl.load(Q + tk, mask=m, other=0.0).to(tl.float32)
        kb = tl.load(KK + tk, mask=m, other=0.0).to(tl.float32)
        dqb = tl.load(DQC + (cck + r) * K + o_k[None, :], mask=mk[None, :], other=0.0)
        sq += tl.sum(qb * qb, axis=1)
        sk += tl.sum(kb * kb, axis=1)
        qdq += tl.sum(qb * dqb, axis=1)
    if NORM:
        rq = 1.0 / tl.sqrt(sq + EPS)
        rk = 1.0 / tl.sqrt(sk + EPS)
    else:
        rq = tl.full([C], 1.0, dtype=tl.float32)
        rk = tl.full([C], 1.0, dtype=tl.float32)
    qdq = qdq * rq

    # P = k̂ k̂ᵀ and the row products k̂·dK̂c, k̂·dKg, k̂·dKm
    p = tl.zeros([C, C], dtype=tl.float32)
    kdkc = tl.zeros([C], dtype=tl.float32)
    kdkg = tl.zeros([C], dtype=tl.float32)
    kdkm = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        m = m_t[:, None] & mk[None, :]
        kn = tl.load(KK + g_off[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32) \
            * rk[:, None]
        knt = tl.load(KK + g_off[None, :] * K + o_k[:, None], mask=mk[:, None] & m_t[None, :],
                      other=0.0).to(tl.float32) * rk[None, :]
        p += tl.dot(kn.to(MMDT), knt.to(MMDT), input_precision="ieee")
        ck = (cck + r) * K + o_k[None, :]
        kdkc += tl.sum(kn * tl.load(DKC + ck, mask=mk[None, :], other=0.0), axis=1)
        kdkg += tl.sum(kn * tl.load(DKG + ck, mask=mk[None, :], other=0.0), axis=1)
        kdkm += tl.sum(kn * tl.load(DKM + ck, mask=mk[None, :], other=0.0), axis=1)

    amat = gam_r * p * eta[None, :]
    a_t = gam_rt * p * eta[:, None]
    # T and Tᵀ by two forward substitutions (no transpose of a register tile needed)
    tmat = tl.zeros([C, C], dtype=tl.float32)
    tmat_t = tl.zeros([C, C], dtype=tl.float32)
    for t in range(C):
        e_t = tl.where(o_t == t, 1.0, 0.0)
        col = tl.sum(tl.where(c == t, a_t, 0.0), axis=1)          # A[t, j], indexed by j (rows)
        row = e_t - tl.sum(col[:, None] * tmat, axis=0)
        tmat = tl.where(r == t, row[None, :], tmat)
        arow = tl.sum(tl.where(r == t, amat, 0.0), axis=0)        # A[t, j], indexed by j (cols)
        colt = e_t - tl.sum(tmat_t * arow[None, :], axis=1)
        tmat_t = tl.where(c == t, colt[:, None], tmat_t)
    tmm_t = tmat_t.to(MMDT)

    # dT = dsol Rᵀ and dTᵀ = R dsolᵀ; dv = −Tᵀ dU; dR_Y, dR_Z row products with k̂
    dtm = tl.zeros([C, C], dtype=tl.float32)
    dtm_t = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        du = tl.load(DU + (cck + r) * V + o_v[None, :], mask=mv[None, :], other=0.0)
        du_t = tl.load(DU + (cck + c) * V + o_v[:, None], mask=mv[:, None], other=0.0)
        vb = tl.load(VV + g_off[:, None] * V + o_v[None, :], mask=m_t[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        vb_t = tl.load(VV + g_off[None, :] * V + o_v[:, None], mask=mv[:, None] & m_t[None, :],
                       other=0.0).to(tl.float32)
        dtm += tl.dot(du.to(MMDT), (-vb_t).to(MMDT), input_precision="ieee")
        dtm_t += tl.dot((-vb).to(MMDT), du_t.to(MMDT), input_precision="ieee")
        dv = -tl.dot(tmm_t, du.to(MMDT), input_precision="ieee")
        tl.store(DV + g_off[:, None] * V + o_v[None, :], dv.to(DV.dtype.element_ty),
                 mask=m_t[:, None] & mv[None, :])
    kdry = tl.zeros([C], dtype=tl.float32)
    kdrz = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        m = m_t[:, None] & mk[None, :]
        kn = tl.load(KK + g_off[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32) \
            * rk[:, None]
        knt = tl.load(KK + g_off[None, :] * K + o_k[:, None], mask=mk[:, None] & m_t[None, :],
                      other=0.0).to(tl.float32) * rk[None, :]
        ck = (cck + r) * K + o_k[None, :]
        ckt = (cck + c) * K + o_k[:, None]
        dy = tl.load(DY + ck, mask=mk[None, :], other=0.0)
        dz = tl.load(DZ + ck, mask=mk[None, :], other=0.0)
        dy_t = tl.load(DY + ckt, mask=mk[:, None], other=0.0)
        dz_t = tl.load(DZ + ckt, mask=mk[:, None], other=0.0)
        dtm += tl.dot(dy.to(MMDT), (knt * e_le[None, :]).to(MMDT), input_precision="ieee")
        dtm += tl.dot(dz.to(MMDT), (knt * g0r[None, :]).to(MMDT), input_precision="ieee")
        dtm_t += tl.dot((kn * e_le[:, None]).to(MMDT), dy_t.to(MMDT), input_precision="ieee")
        dtm_t += tl.dot((kn * g0r[:, None]).to(MMDT), dz_t.to(MMDT), input_precision="ieee")
        dry = tl.dot(tmm_t, dy.to(MMDT), input_precision="ieee")
        drz = tl.dot(tmm_t, dz.to(MMDT), input_precision="ieee")
        kdry += tl.sum(kn * dry, axis=1)
        kdrz += tl.sum(kn * drz, axis=1)

    # dA = −Tᵀ dT Tᵀ and dAᵀ = −T dTᵀ T, strictly lower (upper)
    da = -tl.dot(tmat_t, tl.dot(dtm, tmat_t, input_precision="ieee"), input_precision="ieee")
    da_t = -tl.dot(tmat, tl.dot(dtm_t, tmat, input_precision="ieee"), input_precision="ieee")
    da = tl.where(strict, da, 0.0)
    da_t = tl.where(r < c, da_t, 0.0)
    dgam_r = da * p * eta[None, :]                   # dΓ⁻
    dp = da * gam_r * eta[None, :]
    dp_t = da_t * gam_rt * eta[:, None]
    deta = (tl.sum(da * gam_r * p, axis=0) + tl.load(DETC + cck + o_t)
            + gam_last * kdkg + e_lu_rel * kdkm)
    dle = e_le * kdry
    dg0r = kdrz
    dgam = tl.load(DGAM + cck * C + r * C + c) + tl.where(r == C - 1, (eta * kdkg)[None, :], 0.0)
    dg0 = tl.load(DG0C + cck + o_t) + tl.where(last, tl.load(DGEND + ch), 0.0)
    dla = tl.load(DLAC + cck + o_t) + tl.where(last, tl.load(DAEND + ch) * tl.exp(la_last), 0.0)
    s_m = e_lu_rel * eta * kdkm
    dlu = tl.where(last, tl.load(DUEND + ch) * tl.exp(lu_last) + tl.sum(s_m, axis=0), 0.0) - s_m

    # decay products: Γ = D1 B, Γ⁻ = D2 B, γ = D1 b, γ⁻ = D2 b
    dd1 = tl.dot(dgam, bt, input_precision="ieee") + dg0[:, None] * bvec[None, :]
    dd2 = tl.dot(dgam_r, bt, input_precision="ieee") + dg0r[:, None] * bvec[None, :]
    e1 = tl.where(incl, dd1 * d1, 0.0)
    e2 = tl.where(strict, dd2 * d2, 0.0)
    db_m = tl.dot(d1t, dgam, input_precision="ieee") + tl.dot(d2t, dgam_r, input_precision="ieee")
    db_v = tl.sum(d1t * dg0[None, :], axis=1) + tl.sum(d2t * dg0r[None, :], axis=1)
    em = tl.where(incl, db_m * bm, 0.0)
    dbeta = tl.sum(tl.where(incl, db_m * dm, 0.0), axis=1) + db_v * tl.exp(lu)
    dlu += tl.sum(em, axis=1) - tl.sum(em, axis=0) + db_v * bvec
    dle += tl.sum(e2, axis=1)
    dla += tl.sum(e1, axis=1) - tl.sum(e1, axis=0) - tl.sum(e2, axis=0) + dle
    dlog_a = tl.cumsum(dla, axis=0, reverse=True)
    if not PTA:
        dlog_a -= dle
    dlog_m = tl.cumsum(dlu, axis=0, reverse=True)
    dlog_a = tl.where(la_raw >= FLOOR, dlog_a, 0.0)    # clamp's gradient
    dlog_m = tl.where(lm_raw >= FLOOR, dlog_m, 0.0)
    tl.store(DLA + g_off, dlog_a.to(DLA.dtype.element_ty), mask=m_t)
    tl.store(DLM + g_off, dlog_m.to(DLM.dtype.element_ty), mask=m_t)
    tl.store(DBE + g_off, dbeta.to(DBE.dtype.element_ty), mask=m_t)
    tl.store(DET + g_off, deta.to(DET.dtype.element_ty), mask=m_t)

    # k̂·dk̂ in closed form (P is k̂ k̂ᵀ), then dk and dq through l2norm's backward
    kdk = (kdkc + tl.sum(dp * p, axis=1) + tl.sum(dp_t * p, axis=1) + e_le * kdry + g0r * kdrz
           + cg * kdkg + cm * kdkm)
    dp_mm = dp.to(MMDT)
    dp_t_mm = dp_t.to(MMDT)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        mk = o_k < K
        m = m_t[:, None] & mk[None, :]
        tk = g_off[:, None] * K + o_k[None, :]
        qn = tl.load(Q + tk, mask=m, other=0.0).to(tl.float32) * rq[:, None]
        kn = tl.load(KK + tk, mask=m, other=0.0).to(tl.float32) * rk[:, None]
        ck = (cck + r) * K + o_k[None, :]
        dy = tl.load(DY + ck, mask=mk[None, :], other=0.0)
        dz = tl.load(DZ + ck, mask=mk[None, :], other=0.0)
        dkn = (tl.load(DKC + ck, mask=mk[None, :], other=0.0)
               + tl.dot(dp_mm, kn.to(MMDT), input_precision="ieee")
               + tl.dot(dp_t_mm, kn.to(MMDT), input_precision="ieee")
               + e_le[:, None] * tl.dot(tmm_t, dy.to(MMDT), input_precision="ieee")
               + g0r[:, None] * tl.dot(tmm_t, dz.to(MMDT), input_precision="ieee")
               + cg[:, None] * tl.load(DKG + ck, mask=mk[None, :], other=0.0)
               + cm[:, None] * tl.load(DKM + ck, mask=mk[None, :], other=0.0))
        dqn = tl.load(DQC + ck, mask=mk[None, :], other=0.0)
        if NORM:
            dkb = rk[:, None] * (dkn - kn * kdk[:, None])
            dqb = rq[:, None] * (dqn - qn * qdq[:, None])
        else:
            dkb = dkn
            dqb = dqn
        tl.store(DK + tk, dkb.to(DK.dtype.element_ty), mask=m)
        tl.store(DQ + tk, dqb.to(DQ.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# LocalOutput: o = scale·[(e^{la} Q) S0 − (γ Q) M0 − tril(Γ ⊙ Q Kᵀ ⊙ η) W]
# ---------------------------------------------------------------------------------------------

@triton.jit
def _output_fwd_kernel(
    QC, KC, ETC, LAC, G0C, GAM, W, S0S, M0S, CS, CL, O, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr,
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
        p += tl.dot(qb.to(MMDT), kb_t.to(MMDT), input_precision="ieee")
        kv = ch * K * V + o_k[:, None] * V + o_v[None, :]
        mkv = mk[:, None] & mv[None, :]
        s0 = tl.load(S0S + kv, mask=mkv, other=0.0)
        m0 = tl.load(M0S + kv, mask=mkv, other=0.0)
        acc += tl.dot((e_la[:, None] * qb).to(MMDT), s0.to(MMDT), input_precision="ieee")
        acc -= tl.dot((g0[:, None] * qb).to(MMDT), m0.to(MMDT), input_precision="ieee")
    attn = tl.where(r >= c, tl.load(GAM + cck * C + r * C + c) * p * eta[None, :], 0.0)
    wb = tl.load(W + (cck + r) * V + o_v[None, :], mask=mv[None, :], other=0.0)
    acc -= tl.dot(attn.to(MMDT), wb.to(MMDT), input_precision="ieee")
    tok = start + o_t
    tl.store(O + (tok * H + i_h)[:, None] * V + o_v[None, :], (scale * acc).to(O.dtype.element_ty),
             mask=m_t[:, None] & mv[None, :])


@triton.jit
def _output_bwd_kernel(
    QC, KC, ETC, LAC, G0C, GAM, W, S0S, M0S, CS, CL, DO, scale,
    DQC, DKC, DETC, DLAC, DG0C, DGAM, DW, DS0S, DM0S,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, MMDT: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    start = tl.load(CS + i_c).to(tl.int64)
    length = tl.load(CL + i_c)
    ch = i_c * H + i_h
    cck = ch * C
    o_t = tl.arange(0, C)
    m_t = o_t < length
    tok_row = (start + o_t) * H + i_h
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
        ck = (cck + r) * K + o_k[None, :]
        ckt = (cck + c) * K + o_k[:, None]
        qb = tl.load(QC + ck, mask=mk[None, :], other=0.0).to(MMDT)
        kb = tl.load(KC + ck, mask=mk[None, :], other=0.0).to(MMDT)
        qb_t = tl.load(QC + ckt, mask=mk[:, None], other=0.0).to(MMDT)
        kb_t = tl.load(KC + ckt, mask=mk[:, None], other=0.0).to(MMDT)
        p += tl.dot(qb, kb_t, input_precision="ieee")
        p_t += tl.dot(kb, qb_t, input_precision="ieee")
    attn_t = tl.where(r <= c, gam_t * p_t * eta[:, None], 0.0).to(MMDT)
    # dattn = −dO Wᵀ (and its transpose); dW = −attnᵀ dO, with dO = scale·do
    dat = tl.zeros([C, C], dtype=tl.float32)
    dat_t = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        mv = o_v < V
        dob = (scale * tl.load(DO + tok_row[:, None] * V + o_v[None, :],
                               mask=m_t[:, None] & mv[None, :], other=0.0).to(tl.float32)).to(MMDT)
        dob_t = (scale * tl.load(DO + tok_row[None, :] * V + o_v[:, None],
                                 mask=mv[:, None] & m_t[None, :], other=0.0).to(tl.float32)).to(MMDT)
        wb = tl.load(W + (cck + r) * V + o_v[None, :], mask=mv[None, :], other=0.0).to(MMDT)
        wb_t = tl.load(W + (cck + c) * V + o_v[:, None], mask=mv[:, None], other=0.0).to(MMDT)
        dat -= tl.dot(dob, wb_t, input_precision="ieee")
        dat_t -= tl.dot(wb, dob_t, input_precision="ieee")
        dwb = -tl.dot(attn_t, dob, input_precision="ieee")
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
        ckt = (cck + c) * K + o_k[:, None]
        qb = tl.load(QC + ck, mask=mk[None, :], other=0.0)
        kb = tl.load(KC + ck, mask=mk[None, :], other=0.0)
        qb_t = tl.load(QC + ckt, mask=mk[:, None], other=0.0)
        qa_t = (qb_t * e_la[None, :]).to(MMDT)
        qg_t = (qb_t * g0[None, :]).to(MMDT)
        dqs = tl.zeros([C, BK], dtype=tl.float32)
        dqm = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            mv = o_v < V
            dob = (scale * tl.load(DO + tok_row[:, None] * V + o_v[None, :],
                                   mask=m_t[:, None] & mv[None, :], other=0.0).to(tl.float32)).to(MMDT)
            kv_t = ch * K * V + o_k[None, :] * V + o_v[:, None]     # [BV, BK] view of S0ᵀ
            mkv_t = mv[:, None] & mk[None, :]
            s0_t = tl.load(S0S + kv_t, mask=mkv_t, other=0.0).to(MMDT)
            m0_t = tl.load(M0S + kv_t, mask=mkv_t, other=0.0).to(MMDT)
            dqs += tl.dot(dob, s0_t, input_precision="ieee")
            dqm += tl.dot(dob, m0_t, input_precision="ieee")
            kv = ch * K * V + o_k[:, None] * V + o_v[None, :]
            mkv = mk[:, None] & mv[None, :]
            tl.store(DS0S + kv, tl.dot(qa_t, dob, input_precision="ieee"), mask=mkv)
            tl.store(DM0S + kv, -tl.dot(qg_t, dob, input_precision="ieee"), mask=mkv)
        dqb = (e_la[:, None] * dqs - g0[:, None] * dqm
               + tl.dot(dp, kb.to(MMDT), input_precision="ieee"))
        dkb = tl.dot(dp_t, qb.to(MMDT), input_precision="ieee")
        dla += e_la * tl.sum(qb * dqs, axis=1)
        dg0 -= tl.sum(qb * dqm, axis=1)
        tl.store(DQC + ck, dqb, mask=mk[None, :])
        tl.store(DKC + ck, dkb, mask=mk[None, :])
    tl.store(DLAC + cck + o_t, dla)
    tl.store(DG0C + cck + o_t, dg0)


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------

def chunk_bounds(dest: torch.Tensor, num_chunks: int, chunk_size: int):
    """First token and token count of every chunk, from layout.dest (monotone: chunks hold
    consecutive tokens of one sequence). int32 [NC] each; no host sync."""
    first_slot = torch.arange(num_chunks, device=dest.device, dtype=dest.dtype) * chunk_size
    start = torch.searchsorted(dest, first_slot)
    end = torch.searchsorted(dest, first_slot + chunk_size)
    return start.to(torch.int32), (end - start).to(torch.int32)


def _blocks(K: int, V: int):
    return (min(BLOCK_CAP, triton.next_power_of_2(K)), min(BLOCK_CAP, triton.next_power_of_2(V)))


def _tl_mm(mm_dtype):
    if mm_dtype is None or mm_dtype == torch.float32:
        return tl.float32
    if mm_dtype == torch.bfloat16:
        return tl.bfloat16
    if mm_dtype == torch.float16:
        return tl.float16
    raise ValueError(f"mm_dtype must be None, float32, bfloat16 or float16, got {mm_dtype}")


def _check_cdt(cdt):
    if cdt != torch.float32:
        raise ValueError(f"the fused chunk-local kernels compute in float32 only, got cdt={cdt} "
                         "(float64 inputs take the torch path)")


def _num_warps(C: int) -> int:
    return 8 if C >= 64 else 4


class LocalPrepare(torch.autograd.Function):
    """Fused `chunk._local_prepare`: same arguments, same 14 outputs
    (qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end)."""

    @staticmethod
    def forward(ctx, q, k, v, log_alpha, log_mu, beta, eta, dest, num_chunks: int,
                chunk_size: int, cdt: torch.dtype, use_qk_l2norm: bool, p_times_alpha: bool,
                mm_dtype):
        _check_cdt(cdt)
        B, T, H, K = k.shape
        V = v.shape[-1]
        NC, C = num_chunks, chunk_size
        q, k, v = (x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
        gates = [g.reshape(B * T, H).contiguous() for g in (log_alpha, log_mu, beta, eta)]
        cs, cl = chunk_bounds(dest, NC, C)
        f32 = dict(dtype=torch.float32, device=k.device)
        qc = torch.empty(NC, H, C, K, **f32)
        kc = torch.empty(NC, H, C, K, **f32)
        et = torch.empty(NC, H, C, **f32)
        la = torch.empty(NC, H, C, **f32)
        g0 = torch.empty(NC, H, C, **f32)
        gam = torch.empty(NC, H, C, C, **f32)
        U = torch.empty(NC, H, C, V, **f32)
        Y = torch.empty(NC, H, C, K, **f32)
        Z = torch.empty(NC, H, C, K, **f32)
        Kg = torch.empty(NC, H, C, K, **f32)
        Km = torch.empty(NC, H, C, K, **f32)
        a_end = torch.empty(NC, H, **f32)
        g_end = torch.empty(NC, H, **f32)
        u_end = torch.empty(NC, H, **f32)
        BK, BV = _blocks(K, V)
        mmdt = _tl_mm(mm_dtype)
        if NC > 0:
            _prepare_fwd_kernel[(NC, H)](
                q, k, v, *gates, cs, cl,
                qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end,
                H=H, K=K, V=V, C=C, BK=BK, BV=BV, NORM=use_qk_l2norm, PTA=p_times_alpha,
                MMDT=mmdt, FLOOR=LOG_FLOOR, EPS=L2NORM_EPS, num_warps=_num_warps(C), num_stages=1)
        ctx.save_for_backward(q, k, v, *gates, cs, cl)
        ctx.meta = (B, T, H, K, V, NC, C, use_qk_l2norm, p_times_alpha, mmdt)
        return qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end

    @staticmethod
    def backward(ctx, *cots):
        q, k, v, la_in, lm_in, be_in, et_in, cs, cl = ctx.saved_tensors
        B, T, H, K, V, NC, C, norm, pta, mmdt = ctx.meta
        shapes = [(NC, H, C, K), (NC, H, C, K), (NC, H, C), (NC, H, C), (NC, H, C),
                  (NC, H, C, C), (NC, H, C, V), (NC, H, C, K), (NC, H, C, K), (NC, H, C, K),
                  (NC, H, C, K), (NC, H), (NC, H), (NC, H)]
        cots = [torch.zeros(s, dtype=torch.float32, device=k.device) if g is None
                else g.to(torch.float32).contiguous() for g, s in zip(cots, shapes)]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dgates = [torch.empty_like(g) for g in (la_in, lm_in, be_in, et_in)]
        BK, BV = _blocks(K, V)
        if NC > 0:
            _prepare_bwd_kernel[(NC, H)](
                q, k, v, la_in, lm_in, be_in, et_in, cs, cl, *cots, dq, dk, dv, *dgates,
                H=H, K=K, V=V, C=C, BK=BK, BV=BV, NORM=norm, PTA=pta, MMDT=mmdt,
                FLOOR=LOG_FLOOR, EPS=L2NORM_EPS, num_warps=_num_warps(C), num_stages=1)
        dq, dk = dq.view(B, T, H, K), dk.view(B, T, H, K)
        dv = dv.view(B, T, H, V)
        dgates = [g.view(B, T, H) for g in dgates]
        return (dq, dk, dv, *dgates) + (None,) * 7


class LocalOutput(torch.autograd.Function):
    """Fused `chunk._local_output`: same arguments, o [B, T, H, V] in out_dtype."""

    @staticmethod
    def forward(ctx, qc, kc, et, la, g0, gam, W, S0s, M0s, dest, scale: float, mm_dtype,
                out_shape: tuple, out_dtype: torch.dtype):
        NC, H, C, K = qc.shape
        V = W.shape[-1]
        for t in (qc, W, S0s, M0s):
            _check_cdt(t.dtype)
        args = [t.contiguous() for t in (qc, kc, et, la, g0, gam, W, S0s, M0s)]
        cs, cl = chunk_bounds(dest, NC, C)
        o = torch.empty(out_shape, dtype=out_dtype, device=qc.device)
        BK, BV = _blocks(K, V)
        mmdt = _tl_mm(mm_dtype)
        if NC > 0:
            _output_fwd_kernel[(NC, H, triton.cdiv(V, BV))](
                *args, cs, cl, o, float(scale), H=H, K=K, V=V, C=C, BK=BK, BV=BV, MMDT=mmdt,
                num_warps=4, num_stages=1)
        ctx.save_for_backward(*args, cs, cl)
        ctx.meta = (NC, H, C, K, V, float(scale), mmdt)
        return o

    @staticmethod
    def backward(ctx, do):
        qc, kc, et, la, g0, gam, W, S0s, M0s, cs, cl = ctx.saved_tensors
        NC, H, C, K, V, scale, mmdt = ctx.meta
        do = do.contiguous()
        grads = [torch.empty_like(t) for t in (qc, kc, et, la, g0, gam, W, S0s, M0s)]
        BK, BV = _blocks(K, V)
        if NC > 0:
            _output_bwd_kernel[(NC, H)](
                qc, kc, et, la, g0, gam, W, S0s, M0s, cs, cl, do, scale, *grads,
                H=H, K=K, V=V, C=C, BK=BK, BV=BV, MMDT=mmdt, num_warps=_num_warps(C),
                num_stages=1)
        return (*grads, None, None, None, None, None)
