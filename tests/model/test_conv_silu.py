"""The mixer's eager conv + SiLU (mixer.causal_conv_silu: keeps the padded input, recomputes the
conv in the backward) against the composite it replaces (F.silu(mixer.causal_conv(...))),
forward and backward, with and without documents and a CP halo; and what it keeps."""
import pytest
import torch
import torch.nn.functional as F

from mdn_scale.model.mixer import causal_conv, causal_conv_silu


def inputs(dtype, B=2, T=19, C=6, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=dtype)
    w = torch.randn(C, W, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    halo = torch.randn(B, W - 1, C, generator=g, dtype=dtype)
    cot = torch.randn(B, T, C, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, w, halo, cot


@pytest.mark.parametrize("docs", [None, [0, 5, 6, 30]], ids=["rows", "docs"])
@pytest.mark.parametrize("halo", [False, True], ids=["zeros", "halo"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_matches_the_composite(docs, halo, dtype, tol):
    x, w, h, cot = inputs(dtype, B=1 if docs else 2)
    cu = None if docs is None else torch.tensor(docs)
    off = 11 if docs else 0                    # a CP rank's first global position

    def run(fn):
        xx, ww, hh = (t.clone().requires_grad_() for t in (x, w, h))
        padded = torch.cat([hh, xx], dim=1) if halo else None
        y = fn(xx, ww, padded=padded, cu_seqlens=cu, token_offset=off)
        grads = torch.autograd.grad((y.float() * cot.float()).sum(), (xx, ww, hh) if halo else (xx, ww))
        return (y, *grads)

    got = run(causal_conv_silu)
    want = run(lambda *a, **k: F.silu(causal_conv(*a, **k)))
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, want):
        assert a.dtype == b.dtype, name
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err <= tol, f"{name}: {err:.2e}"


def test_keeps_the_input_not_the_output():
    """Under bf16 input and fp32 weights (autocast's case) the composite keeps the fp32 conv
    output for SiLU; this keeps the bf16 padded input, the weight and the mask only."""
    x, w, _, _ = inputs(torch.bfloat16, B=1, T=64, C=8)
    x.requires_grad_()
    w.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_conv_silu(x, w, cu_seqlens=torch.tensor([0, 30, 64]))
    assert all(t.dtype != torch.float32 or t.shape == w.shape for t in saved), \
        [(t.dtype, tuple(t.shape)) for t in saved]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.silu(causal_conv(x, w, cu_seqlens=torch.tensor([0, 30, 64])))
    assert any(t.dtype == torch.float32 and t.shape == (1, 64, 8) for t in saved)
