"""Chunkwise MDN: the autograd function and the driver shared by the torch and Triton backends.

The chunk-parallel parts (chunk_torch.chunk_prepare / chunk_output) are batched tensor ops and
differentiate by autograd; the sequential pass over chunks is `StatePass`, whose forward and
backward run as Triton kernels (backend "triton") or as the torch loops that specify them.
"""
from __future__ import annotations

import os

import torch

from .chunk_torch import (
    chunk_output,
    chunk_prepare,
    state_pass_bwd_torch,
    state_pass_fwd_torch,
    state_pass_grads,
)
from .layout import ChunkLayout, build_layout, from_chunks, to_chunks
from .naive import l2norm

LOG_FLOOR = -1e4


class StatePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout: ChunkLayout,
                backend: str, allow_tf32: bool):
        if backend == "triton":
            from .state_pass import fits_shared_memory
            # 16-bit model: bf16 operands for the products, as FLA's GDN kernels (state stays
            # fp32). fp32 operands at K > 128 exceed shared memory: those take the torch loop.
            low = torch.bfloat16 if allow_tf32 else U.dtype
            if fits_shared_memory(Y.shape[-1], low):
                U, Y, Z, Kg, Km = (t.to(low) for t in (U, Y, Z, Kg, Km))
            else:
                backend = "torch"
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
        ctx.compute_dtype = U.dtype if U.dtype == torch.float64 else torch.float32
        return W, S0s, M0s, S, M

    @staticmethod
    def backward(ctx, dW, dS0s, dM0s, dS_fin, dM_fin):
        Y, Z, Kg, Km, a_end, g_end, u_end, W, S0s, M0s = ctx.saved_tensors
        cot = [t.contiguous() for t in (dW, dS0s, dM0s, dS_fin, dM_fin)]
        if ctx.backend == "triton":
            from .state_pass import state_pass_bwd_triton
            dWt, dS_end, dM_end, dS_i, dM_i, dgates = state_pass_bwd_triton(
                Y, Z, Kg, Km, a_end, g_end, u_end, *cot, S0s, M0s, ctx.layout, ctx.allow_tf32)
        else:
            dWt, dS_end, dM_end, dS_i, dM_i = state_pass_bwd_torch(
                Y, Z, Kg, Km, a_end, g_end, u_end, *cot, ctx.layout)
            dgates = None
        # Y, Z, Kg, Km may have been saved in bf16: gradients in the compute dtype.
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates, ctx.compute_dtype)
        return (*grads, dS_i, dM_i, None, None, None)


def _local_prepare(q, k, v, log_alpha, log_mu, beta, eta, dest, num_chunks: int, chunk_size: int,
                   cdt: torch.dtype, use_qk_l2norm: bool, p_times_alpha: bool, mm_dtype):
    """Token layout [B, T, H, ·] → normalised chunks and chunk_prepare's quantities."""
    B, T = k.shape[:2]

    def chunks(x):
        return to_chunks(x.reshape(B * T, *x.shape[2:]).to(cdt), dest, num_chunks, chunk_size)

    if use_qk_l2norm:
        q, k = l2norm(q.to(cdt)), l2norm(k.to(cdt))
    # A finite floor keeps differences of log-cumsums finite when a gate is exactly 0 (μ ≡ 0 is
    # the GDN mode); e^-1e4 underflows to exactly 0 in fp32 and fp64, so the result is unchanged.
    log_alpha, log_mu = log_alpha.clamp(min=LOG_FLOOR), log_mu.clamp(min=LOG_FLOOR)
    qc, kc, vc, la, lm, bt, et = (chunks(x) for x in (q, k, v, log_alpha, log_mu, beta, eta))
    prep = chunk_prepare(qc, kc, vc, la, lm, bt, et, p_times_alpha=p_times_alpha, mm_dtype=mm_dtype)
    return (qc, kc, et, prep["la"], prep["g0"], prep["gam"], prep["U"], prep["Y"], prep["Z"],
            prep["Kg"], prep["Km"], prep["a_end"], prep["g_end"], prep["u_end"])


def _local_output(qc, kc, et, la, g0, gam, W, S0s, M0s, dest, scale: float, mm_dtype,
                  out_shape: tuple, out_dtype: torch.dtype):
    o = chunk_output(qc, kc, et, la, g0, gam, W, S0s, M0s, scale, mm_dtype=mm_dtype)
    return from_chunks(o, dest).view(out_shape).to(out_dtype)


_COMPILED: dict = {}


def _maybe_compiled(fn, device: torch.device):
    """torch.compile the chunk-parallel parts on CUDA (fuses the elementwise work between the
    matmuls); MDN_COMPILE=0 turns it off. On CPU they run eagerly (CI, references)."""
    if device.type != "cuda" or os.environ.get("MDN_COMPILE", "1") == "0":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def chunk_mdn(q, k, v, log_alpha, log_mu, beta, eta, *, scale, initial_state, output_final_state,
              cu_seqlens, use_qk_l2norm, p_times_alpha, backend, chunk_size=64, state_pass=None):
    """Chunkwise MDN on validated inputs (see mdn_kernels.mdn_chunk for shapes).

    `state_pass` replaces `StatePass.apply` (same arguments and results): context parallelism
    (mdn_kernels.cp) plugs its cross-rank version in here and reuses everything else.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    low_precision = v.dtype in (torch.bfloat16, torch.float16)
    # 16-bit models: bf16 operands for the big products on GPU (fp32 accumulation), like FLA.
    mm_dtype = torch.bfloat16 if (low_precision and k.is_cuda and
                                  os.environ.get("MDN_LOWP_MM", "1") != "0") else None
    layout = build_layout(B, T, cu_seqlens, chunk_size, k.device)
    (qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end) = _maybe_compiled(
        _local_prepare, k.device)(q, k, v, log_alpha, log_mu, beta, eta, layout.dest,
                                  layout.num_chunks, chunk_size, cdt, use_qk_l2norm,
                                  p_times_alpha, mm_dtype)
    N = layout.num_seqs
    if initial_state is None:
        S_init = k.new_zeros(N, H, K, V, dtype=cdt)
        M_init = k.new_zeros(N, H, K, V, dtype=cdt)
    else:
        S_init, M_init = (s.to(cdt) for s in initial_state)
    W, S0s, M0s, S, M = (state_pass or StatePass.apply)(
        U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, backend, low_precision)
    o = _maybe_compiled(_local_output, k.device)(qc, kc, et, la, g0, gam, W, S0s, M0s, layout.dest,
                                                 scale, mm_dtype, (B, T, H, V), v.dtype)
    return o, ((S, M) if output_final_state else None)
