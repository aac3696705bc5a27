"""mdn_kernels.mdn.wgmma on the H100: a kernel group named in MDN_NO_WGMMA compiles without
wgmma (its PTX has none) while the same kernel outside it uses wgmma, and both give the same
product. (The CPU tests check the parsing and the variable's scoping with a recorder.)"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from .conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@triton.jit
def _dot_kernel(A, B, C, N: tl.constexpr):
    o = tl.arange(0, N)
    a = tl.load(A + o[:, None] * N + o[None, :])
    b = tl.load(B + o[:, None] * N + o[None, :])
    tl.store(C + o[:, None] * N + o[None, :], tl.dot(a, b))


def test_twin_compiles_without_wgmma(monkeypatch):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("wgmma is Hopper's (sm_90)")
    from mdn_kernels.mdn import wgmma
    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    a, b = (torch.randn(64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = {}
    for choice in ("none", "state_bwd"):
        monkeypatch.setenv("MDN_NO_WGMMA", choice)
        c = torch.empty(64, 64, device="cuda", dtype=torch.float32)
        compiled = wgmma.kernel(_dot_kernel, "state_bwd")[(1,)](a, b, c, N=64, num_warps=4)
        # (not "wgmma" alone: the PTX's .loc lines name this file)
        out[choice] = (c, "wgmma.mma_async" in compiled.asm["ptx"])
    assert out["none"][1], "the plain kernel was expected to use wgmma on sm_90"
    assert not out["state_bwd"][1], "the twin's PTX still has wgmma"
    torch.testing.assert_close(out["none"][0], out["state_bwd"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["none"][0], a.float() @ b.float(), rtol=1e-2, atol=1e-2)
