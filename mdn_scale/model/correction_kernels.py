"""The mixer's output correction q ← q − exp(D_log)·k (DESIGN §6, before the l2 norm) as one
Triton kernel each way.

Eager (MDNMixer.correct_q, the reference) runs it as a product into an fp32 copy of k, a cast
back, a subtraction, and in the backward a negation, a cast, two products, a reduction and the
add of k's two gradients (the op's and this one's): ~13 ms of the 1.3B 4K step on an H200
(plan s23b's ops by call site). Here:

    forward   q' = q − d_h·k in fp32, rounded once to q's dtype, d_h = exp(D_log[h]);
              k comes back as k' (a view of k: the op reads it in place), so that k's
              gradient arrives here whole;
    backward  dq = dq', dk = dk' − d_h·dq' (fp32, rounded once), and dD_log[h] =
              −d_h·Σ dq'·k from one fp32 partial sum per program, summed by torch (fixed
              order: deterministic).

q, k: [B, T, H, K], 16/32-bit, read in place where their (B, T) and (H, K) dims each flatten
(the mixer's split of the conv output: any token stride, contiguous heads; else copied);
D_log: [H] fp32. Fixed launch
configs (no autotune): they run under TRITON_INTERPRET=1 on CPU (the CPU tests) and start
fast. The eager path differs by its extra roundings (d·k rounded to q's dtype before the
subtraction, k's gradient rounded before the add).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # tokens per program (one head each)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _head_tile(DLOG, N, K: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile: rows [pid·BLOCK, +BLOCK) of head program_id(1), as (the rows'
    int64 indices [BLOCK, 1], the head's columns in a row [1, BK], the mask, d_h)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    return rows[:, None].to(tl.int64), h * K + cols[None, :], mask, tl.exp(tl.load(DLOG + h))


@triton.jit
def _correct_fwd_kernel(Q, KX, DLOG, QO, sq, sk, N, H: tl.constexpr, K: tl.constexpr,
                        BK: tl.constexpr, BLOCK: tl.constexpr):
    r64, c, mask, d = _head_tile(DLOG, N, K, BK, BLOCK)
    q = tl.load(Q + r64 * sq + c, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(KX + r64 * sk + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(QO + r64 * (H * K) + c, (q - d * k).to(QO.dtype.element_ty), mask=mask)


@triton.jit
def _correct_bwd_kernel(DQO, DKO, KX, DLOG, DK, PARTIAL, sdq, sdk, sk, N, H: tl.constexpr,
                        K: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_DK: tl.constexpr):
    r64, c, mask, d = _head_tile(DLOG, N, K, BK, BLOCK)
    dq = tl.load(DQO + r64 * sdq + c, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(KX + r64 * sk + c, mask=mask, other=0.0).to(tl.float32)
    dk = -d * dq
    if HAS_DK:
        dk += tl.load(DKO + r64 * sdk + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(DK + r64 * (H * K) + c, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + tl.program_id(0).to(tl.int64) * H + tl.program_id(1),
             -d * tl.sum(tl.sum(dq * k, 1), 0))


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, T, H, K] as [B·T, H·K] rows (a view where its strides allow, as for the mixer's
    split views; else reshape's copy) and their row stride."""
    B, T, H, K = x.shape
    x2 = x.reshape(B * T, H * K)
    return x2, x2.stride(0)


class _CorrectQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, D_log):
        B, T, H, K = q.shape
        N = B * T
        q2, sq = _rows(q)
        k2, sk = _rows(k)
        qo = torch.empty(B, T, H, K, device=q.device, dtype=q.dtype)
        if N:
            _correct_fwd_kernel[(triton.cdiv(N, BLOCK_N), H)](
                q2, k2, D_log, qo, sq, sk, N, H=H, K=K, BK=triton.next_power_of_2(K),
                BLOCK=BLOCK_N, num_warps=4)
        ctx.save_for_backward(k, D_log)
        return qo, k.view_as(k)

    @staticmethod
    def backward(ctx, dqo, dko):
        k, D_log = ctx.saved_tensors
        B, T, H, K = k.shape
        N = B * T
        k2, sk = _rows(k)
        if dqo is None:
            dqo = torch.zeros_like(k)
        dq2, sdq = _rows(dqo)
        dk2, sdk = _rows(dko) if dko is not None else (dq2, 0)
        dk = torch.empty(B, T, H, K, device=k.device, dtype=k.dtype)
        nprog = triton.cdiv(N, BLOCK_N)
        partial = torch.zeros(max(nprog, 1), H, device=k.device, dtype=torch.float32)
        if N:
            _correct_bwd_kernel[(nprog, H)](
                dq2, dk2, k2, D_log, dk, partial, sdq, sdk, sk, N, H=H, K=K,
                BK=triton.next_power_of_2(K), BLOCK=BLOCK_N, HAS_DK=dko is not None, num_warps=4)
        return dqo, dk, partial.sum(0).to(D_log.dtype)


def correct_q_triton(q: torch.Tensor, k: torch.Tensor, D_log: torch.Tensor):
    """(q − exp(D_log)[h]·k, k') for q, k [B, T, H, K] (16/32-bit, one dtype, contiguous heads)
    and D_log [H] fp32; k' is a view of k through which k's gradient must flow (module
    docstring)."""
    if (q.dim() != 4 or q.shape != k.shape or q.dtype != k.dtype or q.dtype not in INPUT_DTYPES):
        raise ValueError(f"correct_q_triton: q, k [B, T, H, K] of one dtype in {INPUT_DTYPES}, "
                         f"got q {q.dtype} {tuple(q.shape)}, k {k.dtype} {tuple(k.shape)}")
    if D_log.shape != (q.shape[2],) or D_log.dtype != torch.float32 or not D_log.is_contiguous():
        raise ValueError(f"correct_q_triton: D_log must be contiguous fp32 [{q.shape[2]}], got "
                         f"{D_log.dtype} {tuple(D_log.shape)}")
    return _CorrectQ.apply(q, k, D_log)
