"""Weight gradients of the linear layers accumulated straight into their fp32 ``.grad``.

Megatron-core's linear layers can add each weight gradient into the weight's ``main_grad``
inside the backward (``gradient_accumulation_fusion``), with apex's
``fused_weight_gradient_mlp_cuda`` doing the GEMM. Without it (we train fp32 weights under bf16
autocast, no apex), every linear's backward makes a bf16 weight gradient, autograd casts it to
the weight's fp32 and AccumulateGrad adds it to ``.grad``: three passes over every weight per
microbatch (the 1.3B 4K step: ~20 ms of ~540 on an H200, BENCHMARKS.md session 23).

``enable(model)`` switches it on for every Megatron linear of ``model`` with
``main_grad = .grad``: a forward pre-hook gives each linear's weight a ``.grad`` (zeros where
there is none) and points ``main_grad`` at it, so whatever reset ``.grad`` in between (the CP
startup check sets it to None), the backward adds into the tensor the optimizer reads; the
layer then returns no weight gradient and AccumulateGrad does nothing for it. The GEMM
(``wgrad_gemm_accum_fp32``, the function apex provides, installed into Megatron's module):

- "mm_add" (the default, ``MDN_WGRAD_GEMM``): the product in the operands' dtype as the unfused
  layer makes it (autocast's casts included), added into the fp32 gradient in one op: bit for bit
  the unfused gradient, without its cast and its separate add;
- "addmm" (CUDA, where torch has ``addmm(..., out_dtype=)`` for 16-bit operands): one cuBLAS GEMM
  that reads and writes the fp32 gradient (beta = 1), the product never rounded to bf16. Slower
  on the H200 (cuBLAS's fp32-output GEMM): the 1.3B 4K step 539.5 / 543.9 ms against mm_add's
  530.8 / 532.0 and the unfused 542.3 / 557.4 (plan s23b, BENCHMARKS.md session 23).

The Megatron backend turns it on with ``train.fuse_wgrad`` (default true). DeepSpeed's engine
owns its gradients and does not take it.
"""

from __future__ import annotations

import functools
import os
import types

import torch

GEMMS = ("mm_add", "addmm")


def gemm_choice() -> str:
    """MDN_WGRAD_GEMM: "mm_add" (default) or "addmm" (module docstring)."""
    v = os.environ.get("MDN_WGRAD_GEMM", "mm_add")
    if v not in GEMMS:
        raise ValueError(f"MDN_WGRAD_GEMM must be one of {GEMMS}, got {v!r}")
    return v


@functools.lru_cache(maxsize=None)
def addmm_out_dtype_works(device_type: str) -> bool:
    """Whether torch.addmm accumulates bf16 operands into an fp32 tensor in place on this
    device (out_dtype=float32, beta = 1), checked once against the fp64 product."""
    if device_type != "cuda":
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(24, 40, generator=g).to("cuda", torch.bfloat16)
        b = torch.randn(40, 16, generator=g).to("cuda", torch.bfloat16)
        c = torch.randn(24, 16, generator=g).to("cuda")
        want = c.double() + a.double() @ b.double()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(((c.double() - want).abs().max() < 1e-4).item())
    except (RuntimeError, TypeError):
        return False


def _operands(input: torch.Tensor, grad_output: torch.Tensor):
    """The product's operands as the unfused layer's ``grad_output.t().matmul(input)`` sees them:
    autocast's dtype where autocast is on (Megatron runs the backward under the forward's
    autocast state), else the common dtype."""
    dev = grad_output.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(input.dtype, grad_output.dtype)
    return grad_output.to(dt), input.to(dt)


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """main_grad [out, in] += grad_outputᵀ [out, N] @ input [N, in] (apex's signature)."""
    g, x = _operands(input, grad_output)
    use_addmm = gemm_choice() == "addmm" and g.dtype != main_grad.dtype
    if use_addmm and not addmm_out_dtype_works(main_grad.device.type):
        raise RuntimeError("MDN_WGRAD_GEMM=addmm: torch.addmm(out_dtype=) does not work here")
    if use_addmm:
        torch.addmm(main_grad, g.t(), x, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.add_(torch.mm(g.t(), x))


# apex's module as Megatron's layers call it (megatron.core.tensor_parallel.layers)
FUSED_MODULE = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32,
                                     wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp32)


def _linears(model: torch.nn.Module) -> list:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def _attach_main_grad(module, args, kwargs):
    """Forward pre-hook: the weight this call multiplies by (a tied output layer's comes as the
    `weight` argument) gets a .grad and main_grad = .grad."""
    w = kwargs.get("weight")
    if w is None and len(args) > 1:
        w = args[1]
    if w is None:
        w = module.weight
    if w is None or not w.requires_grad or not torch.is_grad_enabled():
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    w.main_grad = w.grad


def enable(model: torch.nn.Module) -> int:
    """Turn the fused accumulation on for every Megatron linear of `model` whose weight is fp32 or
    16-bit (module docstring); returns how many. Idempotent."""
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = FUSED_MODULE
    # Megatron's fused path takes fp32 or 16-bit main_grad only (float64 weights: unfused)
    linears = [m for m in _linears(model) if m.weight is not None
               and m.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)]
    for m in linears:
        if getattr(m, "_mdn_fused_wgrad", False):
            continue
        m.gradient_accumulation_fusion = True
        m.register_forward_pre_hook(_attach_main_grad, with_kwargs=True)
        m._mdn_fused_wgrad = True
    return len(linears)
