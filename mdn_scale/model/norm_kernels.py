"""The block RMSNorm (norm.rms_norm: Megatron's input_layernorm / pre_mlp_layernorm / final norm)
as one Triton kernel each way.

Eager PyTorch runs rms_norm as ~9 kernels forward (an fp32 copy of x, pow, mean, add, rsqrt,
two muls, the weight's cast, the output cast) and ~12 backward, each a pass over an fp32 [T, d]
tensor; on the host-bound small micro-batches each costs a launch (BENCHMARKS.md "Small
micro-batches are host-bound"). Here:

forward: one program per ROWS rows of the [N, d] input (BLOCK_D = next_pow2(d) columns, masked),
    loads x (fp32 / bf16 / fp16, any row stride, contiguous last dim) and the weight, writes
    y = x · rstd · w in x's dtype (or the caller's out_dtype) and rstd = rsqrt(mean(x²) + eps) per row (fp32, [N]).
    The autograd Function saves x (a view of the caller's tensor, no copy) and rstd: nothing else.
backward: a fixed number of programs (at most BWD_PROGRAMS), program p handling row blocks
    p, p + P, p + 2P, ...: dx = rstd · (w·dy − x̂ · mean(w·dy · x̂)) with x̂ = x · rstd, written in
    x's dtype; dweight = Σ_rows dy · x̂ accumulated in fp32 per program, one [P, BLOCK_D] partial
    each, and one torch sum over the programs (fixed assignment and order: deterministic, the
    same bits every run on a given N, d), cast to the weight's dtype.

Math is exactly norm.rms_norm's: fp32 compute (float64 inputs take the eager path: the kernels
would lose their digits), y in x's dtype; the weight's gradient in the weight's dtype, as
autograd through `weight.to(fp32)` gives. Fixed launch configs (no autotune): they run under
TRITON_INTERPRET=1 on CPU (tests/model/test_norm_kernels.py) and start fast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 8192  # one row in one tile; wider rows take the eager path
BWD_PROGRAMS = 512  # backward programs at most (dweight partials: BWD_PROGRAMS × BLOCK_D fp32)


def _launch(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps): ~4K elements a tile (d = 1024: 4 rows, 8 warps; 8192: 1, 16)."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(16, 4096 // block_d))
    warps = max(1, min(16, rows * block_d // 512))
    return block_d, rows, warps


@triton.jit
def _rmsnorm_fwd_kernel(X, sx, W, Y, RSTD, N, D, eps,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    m_d = cols < D
    m_r = rows < N
    mask = m_r[:, None] & m_d[None, :]
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m_d, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + r64 * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=m_r)


@triton.jit
def _rmsnorm_bwd_kernel(X, sx, W, RSTD, DY, sdy, DX, PARTIAL, N, D, nprog,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    m_d = cols < D
    w = tl.load(W + cols, mask=m_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    nblocks = tl.cdiv(N, ROWS)
    for blk in range(pid, nblocks, nprog):
        rows = blk * ROWS + tl.arange(0, ROWS)
        m_r = rows < N
        mask = m_r[:, None] & m_d[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=m_r, other=0.0)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(wdy * xhat, 1) / D
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + r64 * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)  # masked rows / columns load 0: they add 0
    tl.store(PARTIAL + pid.to(tl.int64) * BLOCK_D + cols, dw)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """t as [N, d] with a row stride and a contiguous last dim: a view where the leading dims
    flatten to one stride (contiguous inputs, Megatron's [S, B, d]), else a contiguous copy."""
    try:
        t2 = t.view(-1, d)
    except RuntimeError:
        return t.reshape(-1, d).contiguous()
    return t2 if t2.stride(1) == 1 else t2.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        d = x.shape[-1]
        x2 = _rows(x, d)
        N = x2.shape[0]
        y = torch.empty(N, d, device=x.device, dtype=out_dtype)
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)
        block_d, rows, warps = _launch(d)
        _rmsnorm_fwd_kernel[(triton.cdiv(N, rows),)](
            x2, x2.stride(0), weight, y, rstd, N, d, float(eps),
            ROWS=rows, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, d = x2.shape
        dy2 = _rows(dy, d)
        dx = torch.empty(N, d, device=x2.device, dtype=x2.dtype)
        block_d, rows, warps = _launch(d)
        nprog = min(triton.cdiv(N, rows), BWD_PROGRAMS)
        partial = torch.empty(nprog, block_d, device=x2.device, dtype=torch.float32)
        _rmsnorm_bwd_kernel[(nprog,)](
            x2, x2.stride(0), weight, rstd, dy2, dy2.stride(0), dx, partial, N, d, nprog,
            ROWS=rows, BLOCK_D=block_d, num_warps=warps)
        dw = partial.sum(0)[:d].to(weight.dtype)
        return dx.view(ctx.shape), dw, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """norm.rms_norm by the Triton kernels: x [..., d] (fp32 / bf16 / fp16, d <= MAX_D, any
    strides: a row-strided view is read in place, anything else copied contiguous first),
    weight [d] (fp32 / bf16 / fp16, contiguous). Output contiguous, x's shape, in out_dtype
    (fp32 / bf16 / fp16; default x's dtype); x's gradient in x's dtype."""
    d = x.shape[-1]
    out_dtype = out_dtype or x.dtype
    if x.dtype not in INPUT_DTYPES or weight.dtype not in INPUT_DTYPES or out_dtype not in INPUT_DTYPES:
        raise ValueError(f"rms_norm_triton: x, weight and the output must be one of {INPUT_DTYPES}, "
                         f"got {x.dtype} / {weight.dtype} / {out_dtype}")
    if weight.shape != (d,) or not weight.is_contiguous():
        raise ValueError(f"rms_norm_triton: weight must be contiguous [{d}], got "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    if not 1 <= d <= MAX_D:
        raise ValueError(f"rms_norm_triton: the last dim must be in [1, {MAX_D}], got {d}")
    if x.numel() == 0:
        from .norm import rms_norm
        return rms_norm(x, weight, eps, out_dtype)
    return _RMSNormFunction.apply(x, weight, float(eps), out_dtype)


def use_triton_norm(choice: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether RMSNorm runs the kernels: model.norm_kernel 'triton', CUDA, 16/32-bit x and
    weight, d <= MAX_D, non-empty. Anything else (CPU, float64, ...) takes the eager rms_norm."""
    return (choice == "triton" and x.is_cuda and x.dtype in INPUT_DTYPES
            and weight.dtype in INPUT_DTYPES and 1 <= x.shape[-1] <= MAX_D and x.numel() > 0)
