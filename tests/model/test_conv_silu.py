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


def _random_cp_docs(W: int, seed: int):
    """4 ranks of 9 tokens, 3 channels, float64: random packed documents plus starts at a rank's
    first token and inside two halos; the conv weight of width W and the CP = 1 output."""
    g = torch.Generator().manual_seed(seed)
    R, T, C = 4, 9, 3
    n = int(torch.randint(1, 12, (), generator=g))
    inner = torch.randperm(R * T - 1, generator=g)[:n] + 1
    starts = sorted(set(inner.tolist()) | {T, 2 * T + 1, 3 * T - 2})  # rank start, inside halos
    cu = torch.tensor([0] + starts + [R * T])
    x = torch.randn(1, R * T, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, W, generator=g, dtype=torch.float64)
    return R, T, C, cu, x, w, causal_conv(x, w, cu_seqlens=cu)


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_padded_doc_offsets_give_the_masked_halo_conv(W, seed):
    """mdn_kernels.cp.padded_doc_offsets: a conv that only knows document offsets (what FLA's
    causal_conv1d takes), run over [halo | slice] as one packed stream with these offsets, gives
    the slice exactly what the CP path's masked conv gives it (global offsets + token_offset) —
    on random documents, including ones that start inside the halo, at the slice's first token
    and on rank 0 (zero halo before global token 0)."""
    from mdn_kernels.cp import padded_doc_offsets

    R, T, C, cu, x, w, want = _random_cp_docs(W, seed)
    for rank in range(R):
        sl = x[:, rank * T:(rank + 1) * T]
        halo = x[:, rank * T - (W - 1):rank * T] if rank else torch.zeros(1, W - 1, C, dtype=x.dtype)
        padded = torch.cat([halo, sl], dim=1)
        masked = causal_conv(sl, w, padded=padded, cu_seqlens=cu, token_offset=rank * T)
        offs = padded_doc_offsets(cu, T, W, rank * T)
        assert offs.dtype == torch.int32 and offs[0] == 0 and offs[-1] == T + W - 1
        assert (offs[1:] > offs[:-1]).all(), offs                 # no empty documents
        packed = causal_conv(padded, w, cu_seqlens=offs)[:, W - 1:]
        torch.testing.assert_close(masked, want[:, rank * T:(rank + 1) * T], rtol=0, atol=1e-12)
        torch.testing.assert_close(packed, masked, rtol=0, atol=1e-12)


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_halo_state_offsets_give_the_masked_halo_conv(W, seed):
    """mdn_kernels.cp.halo_state_offsets: the slice's own documents, and how many halo rows its
    first document may read (`history`). A conv that takes the last `history` halo rows as the
    first document's initial state (FLA's initial_state, emulated here by a conv over those rows
    and the slice, the first document stretched over them) gives the slice the CP = 1 conv's
    output — on random documents, ones that start inside the halo, at the slice's first token,
    and on rank 0 (no history)."""
    from mdn_kernels.cp import halo_state_offsets

    R, T, C, cu, x, w, want = _random_cp_docs(W, seed)
    h = W - 1
    for rank in range(R):
        local, history = halo_state_offsets(cu, T, W, rank * T)
        assert local.dtype == torch.int32 and local[0] == 0 and local[-1] == T
        assert (local[1:] > local[:-1]).all(), local                # no empty documents
        assert 0 <= history <= h and (rank > 0 or history == 0)
        if rank * T in cu.tolist():
            assert history == 0                                      # the slice starts a document
        hist = x[:, rank * T - history:rank * T]
        stream = torch.cat([hist, x[:, rank * T:(rank + 1) * T]], dim=1)
        docs = torch.cat([torch.zeros(1, dtype=torch.int64), local[1:].long() + history])
        got = causal_conv(stream, w, cu_seqlens=docs)[:, history:]
        torch.testing.assert_close(got, want[:, rank * T:(rank + 1) * T], rtol=0, atol=1e-12)


def test_halo_state_offsets_name_bad_sizes():
    from mdn_kernels.cp import halo_state_offsets
    with pytest.raises(ValueError, match="width >= 1 and T >= 1"):
        halo_state_offsets(torch.tensor([0, 8]), 0, 4, 0)
