"""The mixer's gates (MDNMixer.gates, DESIGN §6) as one Triton kernel each way.

Eager PyTorch runs the gate math as ~20 elementwise kernels forward (fp32 copies of the four
strided [B, T, H] projections, softplus, exp, tanh, sigmoid, log1p, ...) and ~40 backward (each
op's gradient, casts, and one reduction per per-head parameter) for a few hundred KB of data:
the 400M H100 profile (benchmarks/results/model_h100_mdn_400m_v3_profile.txt) shows ~1 ms of
device span per layer in the forward alone, all of it launch-bound. Here one program handles
BLOCK_N tokens × all heads: it reads a, b, m, e (strided views of the in-projection, any
16/32-bit dtype) and the fp32 per-head parameters, and writes (log_alpha, log_mu, beta, eta) in
fp32, and a packed copy of a | b | e | m ([B, T, 4, H] in their dtype) for the backward, which
recomputes the forward from it (nothing else is saved) and writes the gradients of a, b, m, e in their dtype, and one fp32 partial sum per program of
each per-head parameter's gradient; torch sums the partials (fixed order: deterministic).

Math (fp32, the formula of MDNMixer.gates; x = η·exp(log_factor)):
    log_alpha = −exp(A_log)·softplus(a + dt_bias) − log1p(x²)
    log_mu    = max(−exp(Mu_log)·softplus(m + mu_bias), min_log_mu)   (−inf without momentum)
    eta       = tanh(e / tau) + 1
    beta      = sigmoid(b) · x² / (1 + x²)
softplus is torch's (threshold 20: the identity above it, gradient 1); the clamp passes the
gradient where the unclamped value is >= min_log_mu (torch's clamp_min), zero below.
log1p is a short series below 0.05 (where log(1 + y) would lose the digits of y), log(1 + y)
above; η = tanh(u) + 1 as 2·sigmoid(2u), which keeps its relative precision where tanh(u) → −1
(the eager sum loses it: η ~ 1e-5 keeps ~3 digits there). Fixed launch configs (no autotune):
they run under TRITON_INTERPRET=1 on CPU (the CPU tests) and start fast.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_N = 128  # tokens per program
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_PARAMS = 5  # partial sums per program: A_log, dt_bias, Mu_log, mu_bias, log_factor


@triton.jit
def _log1p(y):
    # |y| < 0.05: the series to y^6 (truncation < 3e-9 relative); else log(1 + y), whose
    # value is >= 0.049 there, so a log accurate to ~1e-7 absolute keeps ~2e-6 relative
    ys = tl.minimum(tl.abs(y), 0.05) * tl.where(y < 0, -1.0, 1.0)
    series = ys * (1.0 - ys * (0.5 - ys * (1.0 / 3.0 - ys * (0.25 - ys * (0.2 - ys * (1.0 / 6.0))))))
    return tl.where(tl.abs(y) < 0.05, series, tl.log(1.0 + y))


@triton.jit
def _softplus(x):
    # torch's softplus (beta 1, threshold 20); log1p(exp(x)) as above
    return tl.where(x > 20.0, x, _log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_tile(X, sb, st, rows, T, cols, mask):
    b = rows // T
    t = rows % T
    ptr = X + b[:, None].to(tl.int64) * sb + t[:, None].to(tl.int64) * st + cols[None, :]
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile(pid, A, Bp, E, sa_b, sa_t, sb_b, sb_t, se_b, se_t, A_LOG, DT_BIAS, LOG_FACTOR,
          N, T, H: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr):
    # what both kernels start from: this program's BLOCK tokens × all heads, the per-head
    # parameters and the a, b, e tiles in fp32
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BH)
    m_h = cols < H
    mask = (rows < N)[:, None] & m_h[None, :]
    A_exp = tl.exp(tl.load(A_LOG + cols, mask=m_h, other=0.0))
    dt_bias = tl.load(DT_BIAS + cols, mask=m_h, other=0.0)
    factor = tl.exp(tl.load(LOG_FACTOR + cols, mask=m_h, other=0.0))
    a = _load_tile(A, sa_b, sa_t, rows, T, cols, mask)
    b = _load_tile(Bp, sb_b, sb_t, rows, T, cols, mask)
    e = _load_tile(E, se_b, se_t, rows, T, cols, mask)
    out = rows[:, None].to(tl.int64) * H + cols[None, :]
    return rows, cols, m_h, mask, out, A_exp, dt_bias, factor, a, b, e


@triton.jit
def _eta_x2(e, factor, inv_tau):
    # η = tanh(e/τ) + 1 as 2σ(2e/τ) (no cancellation where tanh → −1) and x² = (η·e^{log_factor})²,
    # shared by the forward and the backward's recompute
    eta = 2.0 * tl.sigmoid(2.0 * e * inv_tau)
    x = eta * factor[None, :]
    return eta, x, x * x


@triton.jit
def _gates_fwd_kernel(
    A, Bp, M, E, sa_b, sa_t, sb_b, sb_t, sm_b, sm_t, se_b, se_t,
    A_LOG, DT_BIAS, MU_LOG, MU_BIAS, LOG_FACTOR,
    LOG_ALPHA, LOG_MU, BETA, ETA, PACK,
    N, T, H: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr,
    inv_tau, min_log_mu, MOMENTUM: tl.constexpr, G: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, m_h, mask, out, A_exp, dt_bias, factor, a, b, e = _tile(
        pid, A, Bp, E, sa_b, sa_t, sb_b, sb_t, se_b, se_t, A_LOG, DT_BIAS, LOG_FACTOR,
        N, T, H, BH, BLOCK)
    pack = rows[:, None].to(tl.int64) * (G * H) + cols[None, :]
    tl.store(PACK + pack, a.to(PACK.dtype.element_ty), mask=mask)
    tl.store(PACK + pack + H, b.to(PACK.dtype.element_ty), mask=mask)
    tl.store(PACK + pack + 2 * H, e.to(PACK.dtype.element_ty), mask=mask)

    eta, x, x2 = _eta_x2(e, factor, inv_tau)
    beta = tl.sigmoid(b) * x2 / (1.0 + x2)
    log_alpha = -A_exp[None, :] * _softplus(a + dt_bias[None, :]) - _log1p(x2)
    if MOMENTUM:
        Mu_exp = tl.exp(tl.load(MU_LOG + cols, mask=m_h, other=0.0))
        mu_bias = tl.load(MU_BIAS + cols, mask=m_h, other=0.0)
        m = _load_tile(M, sm_b, sm_t, rows, T, cols, mask)
        tl.store(PACK + pack + 3 * H, m.to(PACK.dtype.element_ty), mask=mask)
        log_mu = tl.maximum(-Mu_exp[None, :] * _softplus(m + mu_bias[None, :]), min_log_mu)
    else:
        log_mu = tl.full([BLOCK, BH], float("-inf"), tl.float32)
    tl.store(LOG_ALPHA + out, log_alpha, mask=mask)
    tl.store(LOG_MU + out, log_mu, mask=mask)
    tl.store(BETA + out, beta, mask=mask)
    tl.store(ETA + out, eta, mask=mask)


@triton.jit
def _gates_bwd_kernel(
    A, Bp, M, E, sa_b, sa_t, sb_b, sb_t, sm_b, sm_t, se_b, se_t,
    A_LOG, DT_BIAS, MU_LOG, MU_BIAS, LOG_FACTOR,
    G_LA, G_LM, G_BETA, G_ETA,
    DA, DB, DM, DE, PARTIAL,
    N, T, H: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr,
    inv_tau, min_log_mu, MOMENTUM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, m_h, mask, out, A_exp, dt_bias, factor, a, b, e = _tile(
        pid, A, Bp, E, sa_b, sa_t, sb_b, sb_t, se_b, se_t, A_LOG, DT_BIAS, LOG_FACTOR,
        N, T, H, BH, BLOCK)
    g_la = tl.load(G_LA + out, mask=mask, other=0.0)
    g_beta = tl.load(G_BETA + out, mask=mask, other=0.0)
    g_eta = tl.load(G_ETA + out, mask=mask, other=0.0)

    # forward, recomputed
    eta, x, x2 = _eta_x2(e, factor, inv_tau)
    sb = tl.sigmoid(b)
    sa = a + dt_bias[None, :]
    la0 = -A_exp[None, :] * _softplus(sa)
    # backward
    inv1 = 1.0 / (1.0 + x2)
    d_x2 = g_beta * sb * inv1 * inv1 - g_la * inv1
    d_sb = g_beta * x2 * inv1
    d_b = d_sb * sb * (1.0 - sb)
    d_x = 2.0 * x * d_x2
    d_lf = d_x * x  # dx/dlog_factor = x
    d_e = (g_eta + d_x * factor[None, :]) * (eta * (2.0 - eta)) * inv_tau  # 1 − tanh² = η(2 − η)
    d_Alog = g_la * la0  # d la0 / dA_log = la0
    d_sa = tl.where(sa > 20.0, 1.0, tl.sigmoid(sa)) * (-A_exp[None, :]) * g_la
    tl.store(DA + out, d_sa.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + out, d_b.to(DB.dtype.element_ty), mask=mask)
    tl.store(DE + out, d_e.to(DE.dtype.element_ty), mask=mask)
    P = PARTIAL + pid.to(tl.int64) * 5 * BH + cols
    tl.store(P + 0 * BH, tl.sum(tl.where(mask, d_Alog, 0.0), 0))
    tl.store(P + 1 * BH, tl.sum(tl.where(mask, d_sa, 0.0), 0))
    tl.store(P + 4 * BH, tl.sum(tl.where(mask, d_lf, 0.0), 0))
    if MOMENTUM:
        Mu_exp = tl.exp(tl.load(MU_LOG + cols, mask=m_h, other=0.0))
        mu_bias = tl.load(MU_BIAS + cols, mask=m_h, other=0.0)
        m = _load_tile(M, sm_b, sm_t, rows, T, cols, mask)
        g_lm = tl.load(G_LM + out, mask=mask, other=0.0)
        sm = m + mu_bias[None, :]
        lm0 = -Mu_exp[None, :] * _softplus(sm)
        g = tl.where(lm0 >= min_log_mu, g_lm, 0.0)
        d_Mulog = g * lm0
        d_sm = tl.where(sm > 20.0, 1.0, tl.sigmoid(sm)) * (-Mu_exp[None, :]) * g
        tl.store(DM + out, d_sm.to(DM.dtype.element_ty), mask=mask)
        tl.store(P + 2 * BH, tl.sum(tl.where(mask, d_Mulog, 0.0), 0))
        tl.store(P + 3 * BH, tl.sum(tl.where(mask, d_sm, 0.0), 0))


def _strides(x: torch.Tensor) -> tuple[int, int]:
    if x.stride(2) != 1:
        raise ValueError(f"gates_triton: the head dim must be contiguous, got strides {x.stride()}")
    return x.stride(0), x.stride(1)


class _GatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, m, e, A_log, dt_bias, Mu_log, mu_bias, log_factor, tau, min_log_mu):
        B, T, H = a.shape
        N = B * T
        momentum = m is not None
        G = 4 if momentum else 3
        mm = m if momentum else a  # placeholder pointer, never read without momentum
        mu_log = Mu_log if momentum else A_log
        mub = mu_bias if momentum else dt_bias
        # four tensors, not views of one: the op may use them in place
        out = [torch.empty(B, T, H, device=a.device, dtype=torch.float32) for _ in range(4)]
        # a | b | e | m, packed: what the backward reads (saving the strided views instead
        # would keep the whole in-projection output alive until the backward)
        pack = torch.empty(B, T, G, H, device=a.device, dtype=a.dtype)
        BH = triton.next_power_of_2(H)
        grid = (triton.cdiv(N, BLOCK_N),)
        _gates_fwd_kernel[grid](
            a, b, mm, e, *_strides(a), *_strides(b), *_strides(mm), *_strides(e),
            A_log, dt_bias, mu_log, mub, log_factor,
            out[0], out[1], out[2], out[3], pack,
            N, T, H=H, BH=BH, BLOCK=BLOCK_N, inv_tau=1.0 / tau, min_log_mu=float(min_log_mu),
            MOMENTUM=momentum, G=G, num_warps=4)
        ctx.save_for_backward(pack, A_log, dt_bias, mu_log, mub, log_factor)
        ctx.momentum, ctx.tau, ctx.min_log_mu = momentum, tau, float(min_log_mu)
        ctx.dtypes = (a.dtype, b.dtype, mm.dtype, e.dtype)
        log_alpha, log_mu, beta, eta = out
        if not momentum:
            ctx.mark_non_differentiable(log_mu)
        return log_alpha, log_mu, beta, eta

    @staticmethod
    def backward(ctx, g_la, g_lm, g_beta, g_eta):
        pack, A_log, dt_bias, mu_log, mub, log_factor = ctx.saved_tensors
        B, T, G, H = pack.shape
        N = B * T
        momentum = ctx.momentum
        a, b, e = pack[:, :, 0], pack[:, :, 1], pack[:, :, 2]
        mm = pack[:, :, 3] if momentum else a
        BH = triton.next_power_of_2(H)
        nprog = triton.cdiv(N, BLOCK_N)
        f32 = lambda g: (torch.zeros(B, T, H, device=a.device, dtype=torch.float32)  # noqa: E731
                         if g is None else g.to(torch.float32).contiguous())
        g_la, g_beta, g_eta = f32(g_la), f32(g_beta), f32(g_eta)
        g_lm = f32(g_lm) if momentum else g_la  # placeholder, never read without momentum
        ta, tb, tm, te = ctx.dtypes
        da, db, de = (torch.empty(B, T, H, device=a.device, dtype=t) for t in (ta, tb, te))
        dm = torch.empty(B, T, H, device=a.device, dtype=tm) if momentum else da
        partial = torch.zeros(nprog, _NUM_PARAMS, BH, device=a.device, dtype=torch.float32)
        _gates_bwd_kernel[(nprog,)](
            a, b, mm, e, *_strides(a), *_strides(b), *_strides(mm), *_strides(e),
            A_log, dt_bias, mu_log, mub, log_factor,
            g_la, g_lm, g_beta, g_eta, da, db, dm, de, partial,
            N, T, H=H, BH=BH, BLOCK=BLOCK_N, inv_tau=1.0 / ctx.tau, min_log_mu=ctx.min_log_mu,
            MOMENTUM=momentum, num_warps=4)
        sums = partial.sum(0)[:, :H]
        d = lambda i, p: sums[i].to(p.dtype)  # noqa: E731
        if not momentum:
            return (da, db, None, de, d(0, A_log), d(1, dt_bias), None, None, d(4, log_factor),
                    None, None)
        return (da, db, dm, de, d(0, A_log), d(1, dt_bias), d(2, mu_log), d(3, mub),
                d(4, log_factor), None, None)


def gates_triton(a: torch.Tensor, b: torch.Tensor, m: Optional[torch.Tensor], e: torch.Tensor,
                 A_log: torch.Tensor, dt_bias: torch.Tensor, Mu_log: Optional[torch.Tensor],
                 mu_bias: Optional[torch.Tensor], log_factor: torch.Tensor, *, tau: float,
                 min_log_mu: float):
    """(log_alpha, log_mu, beta, eta), each [B, T, H] fp32, from the [B, T, H] projections
    (16/32-bit, any strides with a contiguous head dim) and the fp32 [H] gate parameters.
    ``m`` (and Mu_log, mu_bias) None: no momentum, log_mu = −inf (no gradient)."""
    for x in (a, b, m, e):
        if x is not None and (x.dtype != a.dtype or a.dtype not in INPUT_DTYPES or x.dim() != 3
                              or x.shape != a.shape):
            raise ValueError(f"gates_triton: [B, T, H] projections of one dtype in {INPUT_DTYPES}, "
                             f"got {x.dtype} {tuple(x.shape)} (a: {a.dtype} {tuple(a.shape)})")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"gates_triton: tau must be positive, got {tau}")
    for p in (A_log, dt_bias, Mu_log, mu_bias, log_factor):
        if p is not None and (p.dtype != torch.float32 or not p.is_contiguous()):
            raise ValueError("gates_triton: the per-head parameters must be contiguous fp32")
    return _GatesFunction.apply(a, b, m, e, A_log, dt_bias, Mu_log, mu_bias, log_factor,
                                float(tau), float(min_log_mu))
