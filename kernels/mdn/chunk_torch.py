"""Chunkwise MDN in PyTorch: the algorithm the kernels implement, written to be read (DESIGN §4).

Per chunk of C tokens, per head (all coefficients are ratios of cumulative products, formed as
exp of differences of log-cumsums, so no exponent is ever positive):

    la_t = Σ_{i≤t} log α_i,  lu_t = Σ_{i≤t} log μ_i
    le_t = la_t (p_times_alpha) or la_{t-1}: the decay at which w_t reads the state
    Γ[t, j]  = Σ_{i=j}^{t}   β_i exp(la_t − la_i + lu_i − lu_j)    (lower, with diagonal)
    Γ⁻[t, j] = Σ_{i=j}^{t-1} β_i exp(le_t − la_i + lu_i − lu_j)    (strictly lower)
    γ[t]  = Σ_{i≤t}   β_i exp(la_t − la_i + lu_i),  γ⁻[t] = Σ_{i<t} β_i exp(le_t − la_i + lu_i)

Then, with g_j = η_j k_j w_j (K×V),

    S_t = a_t S0 − γ[t] M0 − Σ_{j≤t} Γ[t, j] g_j,     M_t = u_t M0 + Σ_{j≤t} e^{lu_t − lu_j} g_j
    (I + A) W = diag(e^{le}) K S0 − diag(γ⁻) K M0 − V,  A[t, j] = Γ⁻[t, j] η_j (k_t · k_j)

so W = U + Y S0 − Z M0 with U = −(I+A)⁻¹V, Y = (I+A)⁻¹ diag(e^{le}) K, Z = (I+A)⁻¹ diag(γ⁻) K.
The pair at the chunk's end is S' = a S0 − γ M0 − Kgᵀ W, M' = u M0 + Kmᵀ W (Kg, Km below).

Everything here is chunk-parallel and differentiable by autograd; the one sequential part, the
pass over chunks carrying (S, M), is `state_pass` (torch loop here, Triton on GPU), which has
its own backward.
"""
from __future__ import annotations

import torch

from .layout import ChunkLayout
from .naive import l2norm


def _decay(la_row: torch.Tensor, la_col: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(la_row[t] − la_col[i]) where mask[t, i], else 0; never exponentiates a masked entry."""
    diff = la_row[..., :, None] - la_col[..., None, :]
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def _mm(a: torch.Tensor, b: torch.Tensor, mm_dtype) -> torch.Tensor:
    """a @ b, with operands rounded to mm_dtype (bf16 for 16-bit models, as FLA's GDN kernels do:
    fp32 accumulation) when given; the result stays in the compute dtype. Without mm_dtype, a b
    in a narrower dtype (the Triton state pass hands W, S0s, M0s over in bf16 for 16-bit inputs)
    is widened to a's, exactly."""
    if mm_dtype is None:
        return a @ (b if b.dtype == a.dtype else b.to(a.dtype))
    return (a.to(mm_dtype) @ b.to(mm_dtype)).to(a.dtype)


def chunk_prepare(q, k, v, log_alpha, log_mu, beta, eta, *, p_times_alpha: bool, mm_dtype=None):
    """Chunk-local quantities. Inputs in chunk layout: q, k [NC, H, C, K]; v [NC, H, C, V];
    gates [NC, H, C]; all in the compute dtype (fp32 or fp64), q and k already normalised.
    The C×C decay products stay in the compute dtype; the products over K and V take mm_dtype."""
    C = k.shape[-2]
    dev = k.device
    incl = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    strict = incl.tril(-1)
    la = log_alpha.cumsum(-1)
    lu = log_mu.cumsum(-1)
    le = la if p_times_alpha else la - log_alpha
    d_incl = _decay(la, la, incl)            # e^{la_t − la_i}, i ≤ t
    d_read = _decay(le, la, strict)          # e^{le_t − la_i}, i < t
    d_mom = _decay(lu, lu, incl)             # e^{lu_i − lu_j}, j ≤ i
    bd_mom = beta[..., :, None] * d_mom      # β_i e^{lu_i − lu_j}
    gam = d_incl @ bd_mom                    # Γ
    gam_read = d_read @ bd_mom               # Γ⁻
    b_eu = (beta * lu.exp())[..., None]      # β_i e^{lu_i}
    g0 = (d_incl @ b_eu)[..., 0]             # γ
    g0_read = (d_read @ b_eu)[..., 0]        # γ⁻
    eta_col = eta[..., None, :]
    A = gam_read * _mm(k, k.transpose(-1, -2), mm_dtype) * eta_col
    eye = torch.eye(C, dtype=k.dtype, device=dev)
    # (I + A)⁻¹ itself (C columns) and then one product: far cheaper than solving for the
    # V + 2K right-hand sides directly.
    t_inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    rhs = torch.cat([-v, le.exp()[..., None] * k, g0_read[..., None] * k], dim=-1)
    sol = _mm(t_inv, rhs, mm_dtype)
    Vd, Kd = v.shape[-1], k.shape[-1]
    U, Y, Z = sol.split([Vd, Kd, Kd], dim=-1)
    last_la, last_lu = la[..., -1:], lu[..., -1:]
    Kg = (gam[..., -1, :] * eta)[..., None] * k
    Km = ((lu[..., -1:] - lu).exp() * eta)[..., None] * k
    return dict(
        U=U, Y=Y, Z=Z, Kg=Kg, Km=Km,
        a_end=last_la[..., 0].exp(), g_end=g0[..., -1], u_end=last_lu[..., 0].exp(),
        la=la, g0=g0, gam=gam,
    )


def chunk_output(q, k, eta, la, g0, gam, W, S0s, M0s, scale: float, mm_dtype=None):
    """o = scale·[(e^{la} Q) S0 − (γ Q) M0 − (Γ ⊙ Q Kᵀ ⊙ η) W], per chunk."""
    inter = _mm(la.exp()[..., None] * q, S0s, mm_dtype) - _mm(g0[..., None] * q, M0s, mm_dtype)
    attn = (gam * _mm(q, k.transpose(-1, -2), mm_dtype) * eta[..., None, :]).tril()
    return scale * (inter - _mm(attn, W, mm_dtype))


# ---------------------------------------------------------------------------------------------
# The sequential pass over chunks (torch spec of kernels/mdn/state_pass.py's Triton kernels).
# ---------------------------------------------------------------------------------------------

def state_pass_fwd_torch(U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout: ChunkLayout):
    """Carry (S, M) through each sequence's chunks.

    U [NC, H, C, V]; Y, Z, Kg, Km [NC, H, C, K]; a_end, g_end, u_end [NC, H];
    S_init, M_init [N, H, K, V] fp32. Returns W [NC, H, C, V], the pair entering every chunk
    S0s, M0s [NC, H, K, V], and the final pair [N, H, K, V].
    """
    NC = U.shape[0]
    N = layout.num_seqs
    off = layout.seq_chunk_offsets
    nch = off[1:] - off[:-1]
    S, M = S_init, M_init
    W = U.new_zeros(U.shape)
    S0s = U.new_zeros((NC,) + tuple(S_init.shape[1:]))
    M0s = U.new_zeros(S0s.shape)
    for s in range(layout.max_chunks):
        act = (nch > s).nonzero()[:, 0]
        if act.numel() == 0:
            break
        ci = off[act] + s
        Sa, Ma = S[act], M[act]
        S0s = S0s.index_put((ci,), Sa)
        M0s = M0s.index_put((ci,), Ma)
        Wc = U[ci] + Y[ci] @ Sa - Z[ci] @ Ma
        W = W.index_put((ci,), Wc)
        S_new = a_end[ci][..., None, None] * Sa - g_end[ci][..., None, None] * Ma - Kg[ci].transpose(-1, -2) @ Wc
        M_new = u_end[ci][..., None, None] * Ma + Km[ci].transpose(-1, -2) @ Wc
        S = S.index_put((act,), S_new)
        M = M.index_put((act,), M_new)
    del N
    return W, S0s, M0s, S, M


def state_pass_bwd_torch(Y, Z, Kg, Km, a_end, g_end, u_end, dW, dS0s, dM0s, dS_fin, dM_fin,
                         layout: ChunkLayout):
    """Reverse pass: cotangents of (W, S0s, M0s, final pair) → dW_total (the gradient of U),
    the cotangent of the pair leaving every chunk (dS_end, dM_end) [NC, H, K, V], and the
    gradient of the initial pair. The remaining gradients are matmuls (state_pass_grads)."""
    off = layout.seq_chunk_offsets
    nch = off[1:] - off[:-1]
    dS, dM = dS_fin, dM_fin
    dWt = torch.zeros_like(dW)
    dS_end = dS0s.new_zeros(dS0s.shape)
    dM_end = dS0s.new_zeros(dS0s.shape)
    for s in reversed(range(layout.max_chunks)):
        act = (nch > s).nonzero()[:, 0]
        ci = off[act] + s
        dSa, dMa = dS[act], dM[act]
        dS_end[ci] = dSa
        dM_end[ci] = dMa
        dWc = dW[ci] - Kg[ci] @ dSa + Km[ci] @ dMa
        dWt[ci] = dWc
        dS_prev = a_end[ci][..., None, None] * dSa + Y[ci].transpose(-1, -2) @ dWc + dS0s[ci]
        dM_prev = (-g_end[ci][..., None, None] * dSa + u_end[ci][..., None, None] * dMa
                   - Z[ci].transpose(-1, -2) @ dWc + dM0s[ci])
        dS = dS.clone(); dM = dM.clone()
        dS[act] = dS_prev
        dM[act] = dM_prev
    return dWt, dS_end, dM_end, dS, dM


def state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates=None, out_dtype=None):
    """Gradients of the per-chunk inputs of the state pass, all chunk-parallel. dgates: the
    (da, dg, du) reductions when a kernel already made them. Products run in the operands'
    dtype (bf16 for 16-bit models); results in out_dtype."""
    out_dtype = out_dtype or W.dtype
    dY = (dWt @ S0s.transpose(-1, -2)).to(out_dtype)
    dZ = -(dWt @ M0s.transpose(-1, -2)).to(out_dtype)
    dKg = -(W @ dS_end.transpose(-1, -2)).to(out_dtype)
    dKm = (W @ dM_end.transpose(-1, -2)).to(out_dtype)
    if dgates is None:
        da = (dS_end * S0s).sum((-1, -2))
        dg = -(dS_end * M0s).sum((-1, -2))
        du = (dM_end * M0s).sum((-1, -2))
    else:
        da, dg, du = dgates
    return dWt.to(out_dtype), dY, dZ, dKg, dKm, da, dg, du
