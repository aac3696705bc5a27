"""The mixer's output correction as Triton kernels (mdn_scale/model/correction_kernels.py) under
TRITON_INTERPRET=1 against the eager MDNMixer.correct_q (the reference) and float64: q, k as the
mixer has them (views of the split conv output, B > 1, a token stride wider than H·K), k also
read by a later consumer (its two gradients meet in the kernel), fp32 and bf16. The mixer on
the GPU, fused against eager: tests/gpu/test_gate_kernels_gpu.py."""
import types

import pytest
import torch

from mdn_scale.model.correction_kernels import correct_q_triton
from mdn_scale.model.mixer import MDNMixer

B, T, H, K, V = 2, 37, 3, 24, 40   # T, K not multiples of the kernel's blocks


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, H * (2 * K + V), generator=g, dtype=torch.float64) * 2
    D_log = torch.rand(H, generator=g, dtype=torch.float64) * 2 - 1.5
    dq = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    dk = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    return qkv.to(dtype), D_log, dq, dk


def _run(fn, qkv, D_log, dq, dk, dtype, param_dtype):
    """fn(q, k, D_log) on views of qkv as the mixer makes them; the loss reads q' and k' (a
    later consumer of k, as the op is): values and the gradients of qkv and D_log."""
    x = qkv.detach().clone().requires_grad_(True)
    d = D_log.detach().to(param_dtype).clone().requires_grad_(True)
    q, k, _ = torch.split(x, [H * K, H * K, H * V], -1)
    q, k = q.reshape(B, T, H, K), k.reshape(B, T, H, K)
    qo, ko = fn(q, k, d)
    ((qo.double() * dq).sum() + (ko.double() * dk).sum()).backward()
    return qo.detach().double(), x.grad.double(), d.grad.double()


def _eager(q, k, D_log):
    return MDNMixer.correct_q(types.SimpleNamespace(D_log=D_log), q, k)


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_eager_and_float64(dtype):
    qkv, D_log, dq, dk = _case(dtype)
    ref = _run(_eager, qkv.double(), D_log, dq, dk, torch.float64, torch.float64)
    eager = _run(_eager, qkv, D_log, dq, dk, dtype, torch.float32)
    fused = _run(correct_q_triton, qkv, D_log, dq, dk, dtype, torch.float32)
    names = ("q'", "d qkv", "d D_log")
    for name, f, e, r in zip(names, fused, eager, ref):
        if dtype == torch.float32:
            assert _err(f, r) < 1e-6, name
        else:
            # one rounding where eager has two; but the interpreter truncates fp32 → bf16 where
            # the GPU rounds: within one bf16 ulp (2^-7) here, and no worse than eager on the GPU
            assert _err(f, r) < 2 ** -7 and _err(e, r) < 2 ** -7, name
    # the split's v part gets no gradient from either
    assert fused[1][..., 2 * H * K:].abs().max() == 0


def test_k_gradient_without_a_later_consumer():
    """k' unused: dk is −d·dq' alone (the kernel's HAS_DK=False path)."""
    qkv, D_log, dq, _ = _case(torch.float32, seed=1)
    x = qkv.clone().requires_grad_(True)
    q, k, _ = torch.split(x, [H * K, H * K, H * V], -1)
    qo, _ = correct_q_triton(q.reshape(B, T, H, K), k.reshape(B, T, H, K), D_log.float())
    (qo.double() * dq).sum().backward()
    want = -(D_log.exp()[:, None] * dq)
    got = x.grad[..., H * K:2 * H * K].reshape(B, T, H, K).double()
    assert _err(got, want) < 1e-6


def test_bad_inputs():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q, k"):
        correct_q_triton(q, q.double(), torch.zeros(2))
    with pytest.raises(ValueError, match="D_log"):
        correct_q_triton(q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="D_log must be contiguous fp32"):
        correct_q_triton(q, q, torch.zeros(2, dtype=torch.float64))
