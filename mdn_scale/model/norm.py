"""RMSNorm for Megatron blocks (pre-norm, final norm) and the mixer's gated per-head output norm.

Megatron-core's local `WrappedTorchNorm` refuses sequence parallelism; this one supports it the
Megatron way: under SP each TP rank normalises different tokens, so the weight is marked
`sequence_parallel` and Megatron's finalize_model_grads all-reduces its gradient over TP.

The block norms take model.norm_kernel through their spec (specs.norm_spec): "triton" runs
norm_kernels.rms_norm_triton where it applies (CUDA, fp32 / bf16 / fp16, d <= 8192), the eager
rms_norm everywhere else; the same math and the same parameter either way.
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x * rsqrt(mean(x²) + eps) * weight over the last dim, computed in >= fp32, returned in
    out_dtype (default x's dtype)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(dt)).to(out_dtype or x.dtype)


def block_norm_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block norm hands on: x's, but the autocast dtype for an fp32 x under autocast.

    A block norm's output only feeds a linear layer (the mixer's or attention's in-projection,
    the MLP's fc1, the LM head), which under autocast casts it to the autocast dtype anyway, so
    the products are bitwise the same. Under bf16 autocast over fp32 weights the residual stream
    is bf16 after the first layer; only layer 0's input norm sees the fp32 embedding. Handing on
    fp32 there breaks Megatron's sequence-parallel column linear: its backward reduce-scatters
    the (autocast-dtype) input gradient into a buffer of its input's dtype, and NCCL refuses
    the mismatch ("input tensor must be the same type as the output tensor"). It also saves
    that linear's fp32 input copy."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RMSNorm(nn.Module):
    """Megatron norm interface: RMSNorm(config, hidden_size, eps); `kernel` is model.norm_kernel
    ("eager" | "triton"), given by the spec (specs.norm_spec)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, kernel: str = "eager",
                 **_unused):
        super().__init__()
        from .config import NORM_KERNELS
        if kernel not in NORM_KERNELS:
            raise ValueError(f"model.norm_kernel: must be one of {NORM_KERNELS} (got {kernel!r})")
        self.eps = eps
        self.kernel = kernel
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                              device=None if config.use_cpu_initialization
                                              else torch.cuda.current_device()))
        # Read by Megatron's finalize_model_grads (all-reduce over TP under SP).
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = block_norm_out_dtype(x)
        if self.kernel == "triton":
            from .norm_kernels import rms_norm_triton, use_triton_norm
            if use_triton_norm(self.kernel, x, self.weight):
                return rms_norm_triton(x, self.weight, self.eps, out_dtype)
        return rms_norm(x, self.weight, self.eps, out_dtype)
