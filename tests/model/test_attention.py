"""SDPACoreAttention's varlen path (grouped documents, one masked SDPA call per group) against
the per-document loop it replaced, in float64: outputs and q, k, v gradients, thd and sbhd
inputs, one process and CP=2 (real gloo processes, documents across the rank boundary)."""

import gc
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model_dist import run_ranks
import model_workers as workers
from mdn_scale.model import attention as attn

H, D, THETA = 2, 8, 10000.0


class _OneRank:
    def size(self):
        return 1

    def rank(self):
        return 0


def _core(scale=None):
    return attn.SDPACoreAttention(None, pg_collection=SimpleNamespace(cp=_OneRank()),
                                  softmax_scale=scale, rope_theta=THETA)


def _inputs(T, seed, B=None):
    g = torch.Generator().manual_seed(seed)
    shape = (T, H, D) if B is None else (T, B, H, D)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    out_shape = shape if B is None else (T, B, H * D)
    return q, k, v, torch.randn(out_shape, generator=g, dtype=torch.float64)


def _run(fn, q, k, v, grad):
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    y = fn(qs, ks, vs)
    y.backward(grad)
    return y.detach(), qs.grad, ks.grad, vs.grad


def _loop_reference(query, key, value, cu, scale=None):
    """The old forward, one process: RoPE at positions restarting per document, then one causal
    SDPA call per document (attend_per_document). thd [T, h, D] or sbhd [T, 1, h, D]."""
    thd = query.dim() == 3
    if thd:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    S, B, h, d = query.shape
    cu_t = torch.tensor(cu)
    pos, _ = attn.document_positions(S, 0, cu_t, query.device)
    query, key = attn.apply_rope(query, pos, THETA), attn.apply_rope(key, pos, THETA)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    out = attn.attend_per_document(q, k, v, cu, 0, scale).permute(2, 0, 1, 3)
    return out.squeeze(1) if thd else out.reshape(S, B, h * d)


def _naive(q, k, v, allowed, scale):
    """Explicit softmax attention, q, k, v: [B, h, S, D], allowed: [S, S] bool."""
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def _close(a, b, what):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _check(got, ref, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _close(a, b, f"{what} {name}")


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts F.scaled_dot_product_attention calls made by the attention module."""
    calls = []
    real = F.scaled_dot_product_attention

    def counted(*a, **kw):
        calls.append(kw.get("attn_mask") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", counted)
    return calls


PACKED = {
    # uneven lengths with length-1 documents, first and last included
    "uneven": [0, 1, 6, 7, 8, 20, 21, 33],
    "single": [0, 33],
    "all_length_1": list(range(9)),
}


@pytest.mark.parametrize("limit", [None, 0, 40])
@pytest.mark.parametrize("case", list(PACKED))
@pytest.mark.parametrize("fmt", ["thd", "sbhd"])
def test_varlen_matches_per_document_loop(case, limit, fmt, sdpa_calls, monkeypatch):
    """Grouped documents give the per-document loop's output and q, k, v gradients: one SDPA
    call for the whole stream under the default bound (unmasked when it is one document), one
    per document with the bound 0, and several groups in between."""
    cu = PACKED[case]
    T, ndocs = cu[-1], len(cu) - 1
    q, k, v, grad = _inputs(T, seed=len(cu), B=None if fmt == "thd" else 1)
    scale = 0.3 if case == "uneven" else None  # a softmax_scale, and the default 1/sqrt(D)
    ref = _run(lambda a, b, c: _loop_reference(a, b, c, cu, scale), q, k, v, grad)
    if limit is not None:
        monkeypatch.setattr(attn, "MAX_MASK_ELEMENTS", limit)
    packed = workers.packed_params(cu)
    sdpa_calls.clear()
    got = _run(lambda a, b, c: _core(scale)(a, b, c, None, packed_seq_params=packed),
               q, k, v, grad)
    _check(got, ref, f"{case} limit={limit} {fmt}")
    if limit is None:
        assert sdpa_calls == [ndocs > 1]
    elif limit == 0:
        assert sdpa_calls == [False] * ndocs
    elif case == "uneven":
        assert 1 < len(sdpa_calls) < ndocs and any(sdpa_calls)


def test_loop_reference_is_attention():
    """The reference itself: per-document causal softmax attention after RoPE (explicit
    softmax with a dense document ∧ causal mask)."""
    cu = PACKED["uneven"]
    T = cu[-1]
    q, k, v, _ = _inputs(T, seed=5)
    pos, doc = attn.document_positions(T, 0, torch.tensor(cu), "cpu")
    rq, rk = (attn.apply_rope(t.unsqueeze(1), pos, THETA) for t in (q, k))
    allowed = (torch.arange(T)[None] <= torch.arange(T)[:, None]) & (doc[None] == doc[:, None])
    want = _naive(*(t.permute(1, 2, 0, 3) for t in (rq, rk, v.unsqueeze(1))), allowed, D ** -0.5)
    _close(_loop_reference(q, k, v, cu), want.permute(2, 0, 1, 3).squeeze(1), "loop reference")


def test_unpacked_batch_is_causal_per_sample(sdpa_calls):
    """No cu_seqlens, B > 1: causal attention per sample, positions 0..S-1, one call."""
    S, B = 10, 3
    q, k, v, grad = _inputs(S, seed=7, B=B)

    def naive(a, b, c):
        pos = torch.arange(S)
        a, b = attn.apply_rope(a, pos, THETA), attn.apply_rope(b, pos, THETA)
        allowed = torch.ones(S, S, dtype=torch.bool).tril()
        y = _naive(*(t.permute(1, 2, 0, 3) for t in (a, b, c)), allowed, D ** -0.5)
        return y.permute(2, 0, 1, 3).reshape(S, B, H * D)

    ref = _run(naive, q, k, v, grad)
    sdpa_calls.clear()
    got = _run(lambda a, b, c: _core()(a, b, c, None), q, k, v, grad)
    _check(got, ref, "unpacked")
    assert sdpa_calls == [False]


def test_plan_cached_per_cu_tensor():
    """The plan (and its mask) is built once per cu_seqlens tensor and reused by every layer;
    an in-place change of the tensor rebuilds it; freeing the tensor drops the entry."""
    cu = torch.tensor(PACKED["uneven"], dtype=torch.int32)
    p1 = attn.varlen_plan(cu, 0, 33, torch.float64, "cpu", 1 << 20)
    assert attn.varlen_plan(cu, 0, 33, torch.float64, "cpu", 1 << 20) is p1
    assert len(p1) == 1 and p1[0][3] is not None and p1[0][3].shape == (33, 33)
    assert p1[0][3].stride(0) % 16 == 0  # rows padded for the memory-efficient kernel
    assert attn.varlen_plan(cu, 0, 33, torch.float32, "cpu", 1 << 20) is not p1
    cu[1] = 2
    p2 = attn.varlen_plan(cu, 0, 33, torch.float64, "cpu", 1 << 20)
    # key 0 is now in query 1's document (0..2; it was 0..1)
    assert p2 is not p1 and p1[0][3][1, 0] == float("-inf") and p2[0][3][1, 0] == 0
    n = len(attn._PLANS)
    del cu, p1, p2
    gc.collect()
    assert len(attn._PLANS) <= n - 3


def test_group_documents_bound_and_cover():
    bounds = [0, 3, 10, 20, 21, 32]
    # rank 1 of 2 (offset 16): the document 10..20 began on rank 0, its keys start at 10
    groups = attn._group_documents(bounds, 16, 16, 1 << 20)
    assert groups == [(16, 32, 10, 3)]
    for limit in (0, 30, 100, 200):
        groups = attn._group_documents(bounds, 0, 32, limit)
        assert groups[0][0] == 0 and groups[-1][1] == 32
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert all((q1 - q0) * (q1 - k0) <= limit for q0, q1, k0, n in groups if n > 1)
    assert len(attn._group_documents(bounds, 0, 32, 0)) == 5
    with pytest.raises(ValueError, match="do not cover"):
        attn._group_documents([0, 3, 10], 0, 16, 1 << 20)


CP_PACKED = {
    "across_boundary": [0, 3, 10, 20, 21, 32],  # 10..20 spans ranks 0 and 1; a length-1 doc
    "at_boundary": [0, 1, 2, 16, 17, 32],       # boundary between documents; length-1 docs
    "single": [0, 32],                           # one document across both ranks
    "many_short": [0, 2, 5, 7, 9, 11, 14, 15, 18, 19, 22, 25, 27, 30, 32],
}
CP_LIMITS = [None, 0, 60]


def test_cp2_matches_single_process_loop():
    """CP=2 (gloo processes; K, V all-gathered, global causal and document masks, RoPE positions
    across ranks): each rank's output and q, k, v gradients are its slice of the one-process
    per-document loop's, under the default bound, per document (0) and in small groups."""
    cases, refs = [], {}
    for i, (name, cu) in enumerate(CP_PACKED.items()):
        q, k, v, grad = _inputs(cu[-1], seed=100 + i)
        cases.append((name, cu, q, k, v, grad, CP_LIMITS))
        refs[name] = _run(lambda a, b, c: _loop_reference(a, b, c, cu), q, k, v, grad)
    results = run_ranks(workers.attention_cp_worker, 2, cases)
    for rank, res in enumerate(results):
        sl = slice(rank * 16, rank * 16 + 16)
        for name in CP_PACKED:
            for limit in CP_LIMITS:
                r = res[(name, limit)]
                got = (r["out"], r["dq"], r["dk"], r["dv"])
                _check(got, tuple(t[sl] for t in refs[name]), f"{name} limit={limit} rank {rank}")
