"""Random MDN inputs with gates in the ranges the layer produces (DESIGN §6), for tests and
benchmarks. Drawn in float64 from a seeded generator, then cast, so every dtype sees the same
numbers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_like_gates(B, T, H, *, generator, min_log_mu=-2.0, dtype=torch.float64):
    """log_alpha, log_mu, beta, eta [B, T, H] as the MDN mixer makes them, gate constraint
    included (A_log = log U(0,16), dt log-uniform in [1e-3, 1e-1], log_factor = log U(0,4))."""
    g = generator
    f64 = torch.float64

    def per_head(lo, hi):
        return torch.empty(H, dtype=f64).uniform_(lo, hi, generator=g)

    a_scale = per_head(1e-3, 16.0)                 # exp(A_log), exp(Mu_log)
    mu_scale = per_head(1e-3, 16.0)
    dt = torch.exp(per_head(math.log(1e-3), math.log(1e-1)))
    dt_bias = dt + torch.log(-torch.expm1(-dt))    # softplus⁻¹(dt)
    factor = per_head(1e-3, 4.0)                   # exp(log_factor)
    x = lambda: torch.randn(B, T, H, dtype=f64, generator=g)  # noqa: E731
    log_alpha = -a_scale * F.softplus(x() + dt_bias)
    log_mu = (-mu_scale * F.softplus(x() + dt_bias)).clamp(min=min_log_mu)
    eta = torch.tanh(x() / math.sqrt(2.0)) + 1
    beta = torch.sigmoid(x())
    theta = torch.atan(eta * factor)
    beta = torch.sin(theta) ** 2 * beta
    log_alpha = log_alpha + torch.log(torch.cos(theta) ** 2)
    return tuple(t.to(dtype) for t in (log_alpha, log_mu, beta, eta))


def random_inputs(B, T, H, K, V, *, dtype=torch.float32, device="cpu", seed=0,
                  with_state=False, num_states=None, requires_grad=False):
    """(q, k, v, log_alpha, log_mu, beta, eta[, S0, M0]) on `device` in `dtype` (states fp32,
    or fp64 when dtype is fp64)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gates = layer_like_gates(B, T, H, generator=g)
    out = [t.to(dtype) for t in (q, k, v, *gates)]
    if with_state:
        n = num_states if num_states is not None else B
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        out += [r(n, H, K, V).to(sdt) * 0.5, r(n, H, K, V).to(sdt) * 0.1]
    out = [t.to(device) for t in out]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def random_state_factors(NC, H, C, K, *, op_dtype=torch.float64, seed=0):
    """Random factors of the state pass's four C×K operands (state_pass_bwd_triton's kfac),
    shaped as chunk_local_fused's preparation makes them: k̂ [NC, H, C, K] (rows of norm ~1),
    T = (I + A)⁻¹ [NC, H, C, C] of a strictly lower A of small entries (both in op_dtype),
    e^{le}, γ⁻ in (0.1, 1] and c_g, c_m ~ 0.5 [NC, H, C] (fp64 with fp64 operands, else fp32)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kh = r(NC, H, C, K) * K ** -0.5
    tm = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + torch.tril(r(NC, H, C, C) * 0.1, -1))
    ele, g0r = torch.rand(2, NC, H, C, generator=g, dtype=torch.float64) * 0.9 + 0.1
    cg, cm = r(2, NC, H, C) * 0.5
    vdt = torch.float64 if op_dtype == torch.float64 else torch.float32
    return [kh.to(op_dtype), tm.to(op_dtype)] + [t.to(vdt) for t in (ele, g0r, cg, cm)]


def tensors_on_ctx(out: torch.Tensor) -> list[str]:
    """'Node.attr' for every tensor (or list/tuple holding one) that a node of out's autograd
    graph keeps as a plain attribute (a custom Function's ctx is its node). Activation recompute
    (non-reentrant checkpoint) drops and rebuilds only save_for_backward's tensors, so the op's
    Functions must keep none on ctx; the tests assert this list is empty."""
    found, stack, seen = [], [out.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        for k, v in getattr(n, "__dict__", {}).items():
            vals = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(t, torch.Tensor) for t in vals):
                found.append(f"{type(n).__name__}.{k}")
        stack += [f for f, _ in n.next_functions]
    return found


def patch_interpreter_bf16_dot() -> None:
    """Make Triton's CPU interpreter multiply bf16 tiles correctly (tests only).

    Triton 3.6's interpreter keeps bf16 tensors as their raw 16-bit patterns in numpy (which has
    no bf16) and its tl.dot multiplies those integers: a bf16 dot is garbage there (1e10 where
    the answer is ~1), while compiled Triton multiplies bf16 exactly into fp32. This widens bf16
    operands to fp32 before the interpreter's dot (exact: a bf16 is the high half of an fp32), so
    the 16-bit paths of the kernels can be tested on CPU. Idempotent; a no-op when the
    interpreter is not importable. (Its fp32 → bf16 casts still truncate where compiled Triton
    rounds to nearest: expect somewhat larger bf16 errors on CPU than on the GPU.)"""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except Exception:  # pragma: no cover - no Triton / another interpreter layout
        return
    if getattr(InterpreterBuilder.create_dot, "_mdn_bf16", False):
        return
    original = InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._mdn_bf16 = True
    InterpreterBuilder.create_dot = create_dot
