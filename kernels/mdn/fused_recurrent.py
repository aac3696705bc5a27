"""Token-by-token MDN as one Triton kernel: short inputs and generation (a step with a state pair).

Forward only (decoding and evaluation need no gradient; training uses mdn_chunk). One program per
(value block, sequence, head) keeps its K×BV slices of S and M in registers and walks the tokens.
Spec: naive.mdn_recurrent_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import mdn_recurrent_reference
from . import wgmma


@triton.jit
def _fused_recurrent_kernel(
    Q, K_, V_, LA, LM, BETA, ETA, S_INIT, M_INIT, O, S_FIN, M_FIN, CU,
    T, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, IS_VARLEN: tl.constexpr, L2NORM: tl.constexpr, P_ALPHA: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos = tl.load(CU + i_n).to(tl.int64)
        eos = tl.load(CU + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    if HAS_INIT:
        s = tl.load(S_INIT + i_nh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
        m = tl.load(M_INIT + i_nh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
        m = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        th = t * H + i_h
        q = tl.load(Q + th * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        k = tl.load(K_ + th * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        v = tl.load(V_ + th * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if L2NORM:
            q = q / tl.sqrt(tl.sum(q * q) + 1e-6)
            k = k / tl.sqrt(tl.sum(k * k) + 1e-6)
        alpha = tl.exp(tl.load(LA + th).to(tl.float32))
        mu = tl.exp(tl.load(LM + th).to(tl.float32))
        beta = tl.load(BETA + th).to(tl.float32)
        eta = tl.load(ETA + th).to(tl.float32)
        if P_ALPHA:
            p = alpha * k
        else:
            p = k
        w = tl.sum(p[:, None] * s, axis=0) - v
        m = mu * m + eta * k[:, None] * w[None, :]
        s = alpha * s - beta * m
        o = scale * tl.sum(q[:, None] * s, axis=0)
        tl.store(O + th * V + o_v, o.to(O.dtype.element_ty), mask=m_v)
    tl.store(S_FIN + i_nh * K * V + kv, s, mask=m_kv)
    tl.store(M_FIN + i_nh * K * V + kv, m, mask=m_kv)


def fused_recurrent_mdn(q, k, v, log_alpha, log_mu, beta, eta, *, scale=None, initial_state=None,
                        output_final_state=True, cu_seqlens=None, use_qk_l2norm=True,
                        p_times_alpha=True, backend="auto"):
    """Forward-only MDN by the token loop; shapes as mdn_chunk (q, k [B,T,H,K], v [B,T,H,V],
    gates [B,T,H], states (S, M) [N,H,K,V] fp32). For decoding pass T = 1 and the pair from the
    previous step. backend "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the
    reference loop), "auto" (Triton on CUDA tensors)."""
    from .api import validate_inputs

    backend = validate_inputs(q, k, v, log_alpha, log_mu, beta, eta, initial_state, cu_seqlens,
                              backend)
    B, T, H, K = k.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if backend == "torch":
        with torch.no_grad():
            o, final = mdn_recurrent_reference(
                q, k, v, log_alpha, log_mu, beta, eta, scale=scale, initial_state=initial_state,
                output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                p_times_alpha=p_times_alpha)
        final = tuple(f.float() if f.dtype != torch.float64 else f for f in final)
        return o, (final if output_final_state else None)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    sdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    o = torch.empty_like(v)
    S_fin = v.new_empty(N, H, K, V, dtype=sdt)
    M_fin = v.new_empty(N, H, K, V, dtype=sdt)
    BK = triton.next_power_of_2(K)
    BV = max(16, min(triton.next_power_of_2(V), 4096 // BK))
    has_init = initial_state is not None
    S0, M0 = (initial_state[0].contiguous(), initial_state[1].contiguous()) if has_init else (o, o)
    c = [t.contiguous() for t in (q, k, v, log_alpha, log_mu, beta, eta)]
    wgmma.kernel(_fused_recurrent_kernel, "recurrent")[(triton.cdiv(V, BV), N * H)](
        *c, S0, M0, o, S_fin, M_fin, cu_seqlens if cu_seqlens is not None else o,
        T, scale, H=H, K=K, V=V, BK=BK, BV=BV, HAS_INIT=has_init,
        IS_VARLEN=cu_seqlens is not None, L2NORM=use_qk_l2norm, P_ALPHA=p_times_alpha,
        num_warps=4,
    )
    return o, ((S_fin, M_fin) if output_final_state else None)
