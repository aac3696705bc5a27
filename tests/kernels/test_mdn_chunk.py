"""mdn_chunk (torch and Triton backends) against the float64 token loop, forward and backward."""

import pytest
import torch

from mdn_kernels import gated_delta_rule_reference, mdn_chunk, mdn_recurrent_reference
from mdn_kernels.mdn.testing import random_inputs

NAMES = ["o", "S", "M", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta", "dS0", "dM0"]


def run(fn, xs, seed=123):
    """Outputs, final pair and every gradient under random cotangents."""
    o, (s, m) = fn(xs)
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(t.shape, dtype=torch.float64, generator=g).to(t.dtype) for t in (o, s, m)]
    loss = sum((t * c).sum() for t, c in zip((o, s, m), cots))
    grads = torch.autograd.grad(loss, xs)
    return [o, s, m, *grads]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(out, ref, tol):
    assert len(out) == len(ref)
    for name, a, b in zip(NAMES, out, ref):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def reference(xs, cu_seqlens=None, **kw):
    return mdn_recurrent_reference(*xs[:7], initial_state=(xs[7], xs[8]),
                                   output_final_state=True, cu_seqlens=cu_seqlens, **kw)


CASES = [  # backend, dtype, chunk, tolerance
    ("torch", torch.float64, 16, 1e-12),
    ("torch", torch.float32, 64, 1e-5),
    ("triton", torch.float32, 16, 1e-5),
]


@pytest.mark.parametrize("backend,dtype,chunk,tol", CASES)
@pytest.mark.parametrize("T", [64, 45])  # a multiple of the chunk, and a ragged length
@pytest.mark.parametrize("p_times_alpha", [True, False])
def test_matches_reference(backend, dtype, chunk, tol, T, p_times_alpha):
    B, H, K, V = 2, 2, 16, 32
    seed = T * 7 + int(p_times_alpha)
    ref = run(lambda x: reference(x, p_times_alpha=p_times_alpha),
              random_inputs(B, T, H, K, V, dtype=torch.float64, seed=seed, with_state=True,
                            requires_grad=True))
    xs = random_inputs(B, T, H, K, V, dtype=dtype, seed=seed, with_state=True, requires_grad=True)
    out = run(lambda x: mdn_chunk(*x[:7], initial_state=(x[7], x[8]), output_final_state=True,
                                  p_times_alpha=p_times_alpha, backend=backend, chunk_size=chunk), xs)
    check(out, ref, tol)


@pytest.mark.parametrize("backend,dtype,chunk,tol", CASES)
def test_packed_documents_with_initial_states(backend, dtype, chunk, tol):
    H, K, V = 2, 16, 32
    lens = [5, 40, 17, 1, 33]
    T = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0)
    seed = 11
    ref = run(lambda x: reference(x, cu_seqlens=cu),
              random_inputs(1, T, H, K, V, dtype=torch.float64, seed=seed, with_state=True,
                            num_states=len(lens), requires_grad=True))
    xs = random_inputs(1, T, H, K, V, dtype=dtype, seed=seed, with_state=True,
                       num_states=len(lens), requires_grad=True)
    out = run(lambda x: mdn_chunk(*x[:7], initial_state=(x[7], x[8]), output_final_state=True,
                                  cu_seqlens=cu, backend=backend, chunk_size=chunk), xs)
    check(out, ref, tol)


def test_packed_equals_separate_sequences():
    """Packing resets the state: each document gives what it gives alone."""
    H, K, V = 2, 16, 16
    lens = [20, 9, 35]
    xs = random_inputs(1, sum(lens), H, K, V, dtype=torch.float64, seed=3, with_state=True,
                       num_states=3)
    cu = torch.tensor([0] + lens).cumsum(0)
    o, (S, M) = mdn_chunk(*xs[:7], initial_state=(xs[7], xs[8]), output_final_state=True,
                          cu_seqlens=cu, chunk_size=16)
    for n in range(3):
        a, b = int(cu[n]), int(cu[n + 1])
        part = [t[:, a:b] for t in xs[:7]]
        on, (Sn, Mn) = mdn_chunk(*part, initial_state=(xs[7][n:n + 1], xs[8][n:n + 1]),
                                 output_final_state=True, chunk_size=16)
        torch.testing.assert_close(o[:, a:b], on, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(S[n:n + 1], Sn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(M[n:n + 1], Mn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_momentum_is_gated_delta_rule(backend):
    """μ ≡ 0 (log μ = −inf) with p_times_alpha: GDN with step size β·η."""
    B, T, H, K, V = 2, 40, 2, 16, 16
    q, k, v, la, lm, beta, eta, S0, M0 = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=5,
                                                       with_state=True)
    lm = torch.full_like(lm, float("-inf"))
    o, (S, M) = mdn_chunk(q, k, v, la, lm, beta, eta, initial_state=(S0, torch.zeros_like(M0)),
                          output_final_state=True, backend=backend, chunk_size=16)
    ref_o, ref_S = gated_delta_rule_reference(*(t.double() for t in (q, k, v, la)),
                                              (beta * eta).double(), initial_state=S0.double())
    assert rel_err(o, ref_o) < 1e-5
    assert rel_err(S, ref_S) < 1e-5


def test_bf16_inputs_fp32_states():
    B, T, H, K, V = 1, 50, 2, 16, 32
    xs = random_inputs(B, T, H, K, V, dtype=torch.bfloat16, seed=8)
    o, (S, M) = mdn_chunk(*xs, output_final_state=True, chunk_size=16)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32 and M.dtype == torch.float32
    ref, (rS, rM) = mdn_recurrent_reference(*(t.double() for t in xs), output_final_state=True)
    assert rel_err(o, ref) < 2e-2 and rel_err(S, rS) < 2e-2


def test_triton_backend_without_initial_state():
    B, T, H, K, V = 1, 33, 1, 32, 16
    xs = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=9)
    o, (S, M) = mdn_chunk(*xs, output_final_state=True, backend="triton", chunk_size=16)
    ref, (rS, rM) = mdn_recurrent_reference(*(t.double() for t in xs), output_final_state=True)
    assert rel_err(o, ref) < 1e-5 and rel_err(S, rS) < 1e-5 and rel_err(M, rM) < 1e-5


def test_triton_bf16_operands():
    """16-bit inputs: the state pass runs on bf16 operands with fp32 accumulation and state. (On
    CPU the interpreter's bf16 dot is fixed by tests/conftest.py: patch_interpreter_bf16_dot.)"""
    B, T, H, K, V = 1, 40, 2, 16, 32
    xs = random_inputs(B, T, H, K, V, dtype=torch.bfloat16, seed=10, requires_grad=True)
    out = run(lambda x: mdn_chunk(*x, output_final_state=True, backend="triton", chunk_size=16), xs)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    ref = run(lambda x: mdn_chunk(*x, output_final_state=True, backend="torch", chunk_size=16), x64)
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a, b) < 2e-2, name
