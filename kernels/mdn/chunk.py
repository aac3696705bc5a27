"""Chunkwise MDN: the autograd function and the driver shared by the torch and Triton backends.

The chunk-parallel parts (chunk_torch.chunk_prepare / chunk_output) are batched tensor ops and
differentiate by autograd; the sequential pass over chunks is `StatePass`, whose forward and
backward run as Triton kernels (backend "triton") or as the torch loops that specify them.
"""
from __future__ import annotations

import torch

from .chunk_torch import (
    chunk_output,
    chunk_prepare,
    state_pass_bwd_torch,
    state_pass_fwd_torch,
    state_pass_grads,
)
from .layout import ChunkLayout, build_layout
from .naive import l2norm

LOG_FLOOR = -1e4


class StatePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout: ChunkLayout,
                backend: str, allow_tf32: bool):
        args = [t.contiguous() for t in (U, Y, Z, Kg, Km, a_end, g_end, u_end)]
        S_init, M_init = S_init.contiguous(), M_init.contiguous()
        if backend == "triton":
            from .state_pass import state_pass_fwd_triton
            W, S0s, M0s, S, M = state_pass_fwd_triton(*args, S_init, M_init, layout, allow_tf32)
        else:
            with torch.no_grad():
                W, S0s, M0s, S, M = state_pass_fwd_torch(*args, S_init, M_init, layout)
        ctx.save_for_backward(*args[1:], W, S0s, M0s)
        ctx.layout, ctx.backend, ctx.allow_tf32 = layout, backend, allow_tf32
        return W, S0s, M0s, S, M

    @staticmethod
    def backward(ctx, dW, dS0s, dM0s, dS_fin, dM_fin):
        Y, Z, Kg, Km, a_end, g_end, u_end, W, S0s, M0s = ctx.saved_tensors
        cot = [t.contiguous() for t in (dW, dS0s, dM0s, dS_fin, dM_fin)]
        if ctx.backend == "triton":
            from .state_pass import state_pass_bwd_triton
            dWt, dS_end, dM_end, dS_i, dM_i = state_pass_bwd_triton(
                Y, Z, Kg, Km, a_end, g_end, u_end, *cot, ctx.layout, ctx.allow_tf32)
        else:
            dWt, dS_end, dM_end, dS_i, dM_i = state_pass_bwd_torch(
                Y, Z, Kg, Km, a_end, g_end, u_end, *cot, ctx.layout)
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end)
        return (*grads, dS_i, dM_i, None, None, None)


def chunk_mdn(q, k, v, log_alpha, log_mu, beta, eta, *, scale, initial_state, output_final_state,
              cu_seqlens, use_qk_l2norm, p_times_alpha, backend, chunk_size=64, state_pass=None):
    """Chunkwise MDN on validated inputs (see mdn_kernels.mdn_chunk for shapes).

    `state_pass` replaces `StatePass.apply` (same arguments and results): context parallelism
    (mdn_kernels.cp) plugs its cross-rank version in here and reuses everything else.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    layout = build_layout(B, T, cu_seqlens, chunk_size, k.device)

    def flat(x):
        return x.reshape(B * T, *x.shape[2:]).to(cdt)

    qf, kf = flat(q), flat(k)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qc, kc, vc = layout.to_chunks(qf), layout.to_chunks(kf), layout.to_chunks(flat(v))
    # A finite floor keeps differences of log-cumsums finite when a gate is exactly 0 (μ ≡ 0 is
    # the GDN mode); e^-1e4 underflows to exactly 0 in fp32 and fp64, so the result is unchanged.
    log_alpha, log_mu = log_alpha.clamp(min=LOG_FLOOR), log_mu.clamp(min=LOG_FLOOR)
    la, lm, bt, et = (layout.to_chunks(flat(g)) for g in (log_alpha, log_mu, beta, eta))
    prep = chunk_prepare(qc, kc, vc, la, lm, bt, et, p_times_alpha=p_times_alpha)
    N = layout.num_seqs
    if initial_state is None:
        S_init = vc.new_zeros(N, H, K, V)
        M_init = vc.new_zeros(N, H, K, V)
    else:
        S_init, M_init = (s.to(cdt) for s in initial_state)
    allow_tf32 = v.dtype in (torch.bfloat16, torch.float16)
    W, S0s, M0s, S, M = (state_pass or StatePass.apply)(
        prep["U"], prep["Y"], prep["Z"], prep["Kg"], prep["Km"],
        prep["a_end"], prep["g_end"], prep["u_end"], S_init, M_init, layout, backend, allow_tf32)
    o = chunk_output(qc, kc, et, prep, W, S0s, M0s, scale)
    o = layout.from_chunks(o).view(B, T, H, V).to(v.dtype)
    return o, ((S, M) if output_final_state else None)
