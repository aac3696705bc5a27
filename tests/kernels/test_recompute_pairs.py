"""MDN_RECOMPUTE_PAIRS=1 and 2 (chunk.StateOutput, LocalPrepare's op_dtype, the state pass's
backward making the output's pair cotangents): the same numbers as the default path, bit for bit
where the kernels are the same (mode 1; fp32 under TRITON_INTERPRET=1; the bf16 state pass is
checked on the GPU, tests/gpu/test_kernels_gpu.py), and less memory (tools/mem_accounting.py's
accounting at a small shape)."""
import pytest
import torch

from mdn_kernels import mdn_chunk
from mdn_kernels.mdn import chunk
from mdn_kernels.mdn import chunk_local_fused as fused
from mdn_kernels.mdn.layout import build_layout
from mdn_kernels.mdn.testing import random_inputs, tensors_on_ctx

NAMES = ["o", "S", "M", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta", "dS0", "dM0"]


@pytest.fixture
def fused_on():
    chunk.use_fused_local(True)
    yield
    chunk.use_fused_local(None)


def _run(xs, cu, mode, monkeypatch, **kw):
    monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", str(mode))
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o, (S, M) = mdn_chunk(*xs[:7], initial_state=(xs[7], xs[8]), output_final_state=True,
                          cu_seqlens=cu, backend="triton", chunk_size=16, **kw)
    g = torch.Generator().manual_seed(3)
    cots = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in (o, S, M)]
    loss = sum((t * c).sum() for t, c in zip((o, S, M), cots))
    return [o, S, M, *torch.autograd.grad(loss, xs)]


CASES = [  # B, T, lens (None: batched), mdn_chunk options
    (2, 45, None, dict()),                                             # ragged: 45 = 2·16 + 13
    (1, 61, [5, 21, 1, 34], dict()),                                   # packed documents
    (1, 40, None, dict(p_times_alpha=False, use_qk_l2norm=False)),
]


@pytest.mark.parametrize("case", CASES, ids=["batched-ragged", "packed", "no-pta-no-norm"])
def test_recompute_pairs_matches_the_default_path(case, fused_on, monkeypatch):
    """Mode 1 runs the same kernels on the same operands: bitwise equal to mode 0. Mode 2 makes
    dS0s, dM0s in other tiles (same products, fp32 here): equal to float rounding. Initial
    states given (their gradients checked); without them, see the next test."""
    B, T, lens, opts = case
    H, K, V = 2, 16, 32
    cu = None if lens is None else torch.tensor([0] + lens).cumsum(0)
    N = B if lens is None else len(lens)
    xs = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=31, with_state=True,
                       num_states=N)
    base = _run(xs, cu, 0, monkeypatch, **opts)
    for mode in (1, 2):
        lean = _run(xs, cu, mode, monkeypatch, **opts)
        for n, a, b in zip(NAMES, lean, base):
            assert a.dtype == b.dtype and a.shape == b.shape, (mode, n)
            if mode == 1:
                assert torch.equal(a, b), f"{n}: max diff {(a - b).abs().max().item():.3e}"
            else:
                err = ((a - b).double().norm() / b.double().norm()).item()
                assert err < 1e-6, f"mode {mode}, {n}: relative difference {err:.2e}"


def test_recompute_pairs_without_initial_state_or_final_cotangent(fused_on, monkeypatch):
    """No initial pair (StateOutput runs a zero one without storing it) and only o used (the
    final pair's cotangent stays None): the same gradients as the default path."""
    xs = random_inputs(1, 40, 2, 16, 32, dtype=torch.float32, seed=5)
    res = {}
    for mode in (0, 1, 2):
        monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", str(mode))
        x = [t.detach().clone().requires_grad_() for t in xs]
        o, _ = mdn_chunk(*x, backend="triton", chunk_size=16)
        g = torch.Generator().manual_seed(1)
        res[mode] = [o.detach(), *torch.autograd.grad(o, x, torch.randn(o.shape, generator=g))]
    for a, b in zip(res[1], res[0]):
        assert torch.equal(a, b)
    for a, b in zip(res[2], res[0]):
        assert ((a - b).double().norm() / b.double().norm()).item() < 1e-6


def test_recompute_pairs_uses_state_output(fused_on, monkeypatch):
    """The flag routes through StateOutput (and only with the flag, and never with a CP state
    pass, which keeps the default path)."""
    calls = []
    orig = chunk.StateOutput.apply
    monkeypatch.setattr(chunk.StateOutput, "apply",
                        staticmethod(lambda *a: calls.append(1) or orig(*a)))
    xs = random_inputs(1, 32, 1, 16, 16, dtype=torch.float32, seed=1, with_state=True)
    _run(xs, None, 0, monkeypatch)
    assert calls == []
    _run(xs, None, 1, monkeypatch)
    assert calls == [1]
    monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", "yes")
    with pytest.raises(ValueError, match="MDN_RECOMPUTE_PAIRS"):
        chunk.recompute_pairs_mode()


def test_prepare_bf16_operands_are_the_rounded_fp32_ones():
    """LocalPrepare with op_dtype=bf16 writes U, Y, Z, Kg, Km as the fp32 path's values rounded
    to bf16 (what StatePass's .to(bfloat16) made), and its backward with bf16 cotangents equals
    the fp32 path's backward given the same (bf16-valued) cotangents. Compiled Triton rounds
    fp32 → bf16 to nearest even (as torch); its CPU interpreter truncates (runtime/interpreter.py
    cast_impl passes no rounding mode), so under TRITON_INTERPRET=1 the expected values are the
    truncated ones."""
    import os

    def to_bf16(x):
        if os.environ.get("TRITON_INTERPRET") == "1":
            x = (x.contiguous().view(torch.int32) & -65536).view(torch.float32)
        return x.to(torch.bfloat16)

    B, T, H, K, V = 2, 45, 2, 16, 32
    xs = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=4)
    layout = build_layout(B, T, None, 16, torch.device("cpu"))
    args = (layout.dest, layout.num_chunks, 16, torch.float32, True, True, None)

    def run(op_dtype):
        x = [t.detach().clone().requires_grad_() for t in xs]
        extra = () if op_dtype is None else (op_dtype,)
        return fused.LocalPrepare.apply(*x, *args, *extra)[:14], x

    ref, x_ref = run(None)
    low, x_low = run(torch.bfloat16)
    for i, (a, b) in enumerate(zip(low, ref)):
        if 6 <= i <= 10:
            assert a.dtype == torch.bfloat16 and torch.equal(a, to_bf16(b.detach())), i
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), i
    g = torch.Generator().manual_seed(9)
    cots = [torch.randn(t.shape, generator=g).to(t.dtype) for t in low]
    g_low = torch.autograd.grad(low, x_low, cots)
    g_ref = torch.autograd.grad(ref, x_ref, [c.float() for c in cots])
    for a, b in zip(g_low, g_ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first", ["0", "1"])
def test_end_over_pair_grads_changes_no_result(first, fused_on, monkeypatch):
    """StateOutput with the end cotangents written over the output's pair cotangents (the
    default), with the pair cotangents made first as well (MDN_PAIR_GRADS_FIRST=1), against the
    earlier path with separate buffers (MDN_END_OVER_PAIR_GRADS=0): bitwise the same outputs and
    gradients, packed documents with initial states; bad flags are named."""
    xs = random_inputs(1, 61, 2, 16, 32, dtype=torch.float32, seed=8, with_state=True,
                       num_states=4)
    cu = torch.tensor([0, 5, 21, 1, 34]).cumsum(0)
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", first)
    over = _run(xs, cu, 1, monkeypatch)
    monkeypatch.setenv("MDN_END_OVER_PAIR_GRADS", "0")
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", "0")
    apart = _run(xs, cu, 1, monkeypatch)
    for n, a, b in zip(NAMES, over, apart):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    for name in ("MDN_END_OVER_PAIR_GRADS", "MDN_PAIR_GRADS_FIRST", "MDN_SAVE_W"):
        monkeypatch.setenv(name, "yes")
        with pytest.raises(ValueError, match=name):
            _run(xs, cu, 1, monkeypatch)
        monkeypatch.setenv(name, "0")


@pytest.mark.parametrize("mode", [1, 2])
def test_save_w_changes_no_result(mode, fused_on, monkeypatch):
    """StateOutput saving W and re-making only the pairs from it (MDN_SAVE_W=1, the default)
    against saving U and re-making W too (0): bitwise the same outputs and gradients (packed
    documents, initial states, a ragged last chunk), in mode 1 and mode 2; and a second backward
    through the same graph (retain_graph) gives the first one's gradients: W is not written."""
    xs = random_inputs(1, 61, 2, 16, 32, dtype=torch.float32, seed=12, with_state=True,
                       num_states=4)
    cu = torch.tensor([0, 5, 21, 1, 34]).cumsum(0)
    monkeypatch.setenv("MDN_SAVE_W", "1")
    saved_w = _run(xs, cu, mode, monkeypatch)
    monkeypatch.setenv("MDN_SAVE_W", "0")
    saved_u = _run(xs, cu, mode, monkeypatch)
    for n, a, b in zip(NAMES, saved_w, saved_u):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    monkeypatch.setenv("MDN_SAVE_W", "1")
    x = [t.detach().clone().requires_grad_() for t in xs]
    o, (S, M) = mdn_chunk(*x[:7], initial_state=(x[7], x[8]), output_final_state=True,
                          cu_seqlens=cu, backend="triton", chunk_size=16)
    loss = (o * o).sum() + S.sum() - M.sum()
    first = torch.autograd.grad(loss, x, retain_graph=True)
    second = torch.autograd.grad(loss, x)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("mode,first", [(0, "0"), (1, "0"), (1, "1"), (2, "0")],
                         ids=["mode0", "mode1", "mode1-pair-grads-first", "mode2"])
def test_raw_qk_changes_no_result(mode, first, fused_on, monkeypatch):
    """The nodes keeping the raw q, k and the l2norm scales (MDN_RAW_QK=1, the default: the
    backward kernels remake q̂ = q·r) against keeping the fp32 q̂, k̂ chunks (0): bitwise the
    same outputs and gradients in every mode and order (packed documents, initial states, a
    ragged last chunk). With the flag on, no fp32 [NC, H, C, K] tensor is saved for the backward
    (mode 2's fused state backward reads q̂ chunks: it keeps them); a bad flag is named."""
    xs = random_inputs(1, 61, 2, 24, 32, dtype=torch.float32, seed=14, with_state=True,
                       num_states=4)
    cu = torch.tensor([0, 5, 21, 1, 34]).cumsum(0)
    NC = build_layout(1, 61, cu, 16, torch.device("cpu")).num_chunks   # 1 + 2 + 1 + 3
    chunk_shape = (NC, 2, 16, 24)                                        # [NC, H, C, K]
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", first)
    res = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MDN_RAW_QK", flag)
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res[flag] = _run(xs, cu, mode, monkeypatch)
        res[flag + "_chunks"] = saved.count((chunk_shape, torch.float32))
    for n, a, b in zip(NAMES, res["1"], res["0"]):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    # q̂, k̂ were saved by two nodes (LocalPrepare and the output's node); in mode 2 by the
    # output's node still (Y, Z, Kg, Km are fp32 [NC, H, C, K] here too, in both runs)
    dropped = res["0_chunks"] - res["1_chunks"]
    assert dropped == (2 if mode == 2 else 4), (res["0_chunks"], res["1_chunks"])
    monkeypatch.setenv("MDN_RAW_QK", "yes")
    with pytest.raises(ValueError, match="MDN_RAW_QK"):
        _run(xs, cu, mode, monkeypatch)


@pytest.mark.parametrize("mode", [0, 1])
def test_op_reads_strided_k_and_v_as_they_are(mode, fused_on, monkeypatch):
    """The model hands the op k and v as slices of the conv output [B, T, H·(2K + V)] (and q
    contiguous): the kernels read those views with their token strides (token_rows), so the
    results are bitwise those of contiguous inputs (B = 2: the stride spans the batch too) and
    the op saves the views themselves, no contiguous copy of k or v (MDN_RAW_QK keeps k)."""
    monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", str(mode))
    B, T, H, K, V = 2, 45, 2, 16, 32
    xs = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=21)
    wide = torch.randn(B, T, H * (2 * K + V), generator=torch.Generator().manual_seed(2))
    ks, vs = slice(H * K, 2 * H * K), slice(2 * H * K, 2 * H * K + H * V)
    wide[..., ks] = xs[1].reshape(B, T, H * K)
    wide[..., vs] = xs[2].reshape(B, T, H * V)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(4))

    def run(strided):
        x = [t.detach().clone().requires_grad_() for t in xs]
        w = wide.detach().clone().requires_grad_()
        k, v = (w[..., ks].view(B, T, H, K), w[..., vs].view(B, T, H, V)) if strided else x[1:3]
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o, _ = mdn_chunk(x[0], k, v, *x[3:], backend="triton", chunk_size=16)
        leaves = [x[0], w] if strided else x[:3]
        grads = torch.autograd.grad(o, leaves + x[3:], do)
        if strided:
            dk, dv = grads[1][..., ks].reshape(B, T, H, K), grads[1][..., vs].reshape(B, T, H, V)
            grads = (grads[0], dk, dv, *grads[2:])
        storages = {t.untyped_storage().data_ptr() for t in saved
                    if t.shape in ((B * T, H, K), (B * T, H, V))}
        return [o, *grads], storages, {t.untyped_storage().data_ptr() for t in leaves}

    strided, st_saved, st_inputs = run(True)
    plain, _, _ = run(False)
    for i, (a, b) in enumerate(zip(strided, plain)):
        assert torch.equal(a, b), i
    assert st_saved == st_inputs   # q and the conv output's slices, nothing copied


@pytest.mark.parametrize("first", ["0", "1"], ids=["default-order", "pair-grads-first"])
@pytest.mark.parametrize("case", ["batched", "packed", "one-sequence"])
def test_bwd_segments_change_no_result(case, first, fused_on, monkeypatch):
    """StateOutput in segments (MDN_BWD_SEGMENTS) against one segment: bitwise the same
    outputs and gradients, the initial states' included (a ragged last chunk; packed documents
    of 1, 2, 1 and 3 chunks; one sequence of 7 chunks), in both orders, with segments of whole
    sequences and with sequences cut (the forward then in segments too, the state carried
    across each cut). The backward runs once per segment, the forward in segments exactly where
    a sequence is cut. A bad value is named."""
    B, T, cu, num_states = {"batched": (3, 45, None, None),
                            "packed": (1, 61, torch.tensor([0, 5, 21, 1, 34]).cumsum(0), 4),
                            "one-sequence": (1, 100, None, None)}[case]
    xs = random_inputs(B, T, 2, 24, 32, dtype=torch.float32, seed=15, with_state=True,
                       num_states=num_states)
    layout = build_layout(B, T, cu, 16, torch.device("cpu"))
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", first)
    calls, fwd_calls = [], []
    real, real_fwd = chunk._lean_backward, chunk._forward_in_segments

    def spy(*args, **kw):
        calls.append(args[11].num_chunks)   # the layout of the call's chunks
        return real(*args, **kw)

    def spy_fwd(*args, **kw):
        fwd_calls.append(len(args[6]))      # the segments
        return real_fwd(*args, **kw)
    monkeypatch.setattr(chunk, "_lean_backward", spy)
    monkeypatch.setattr(chunk, "_forward_in_segments", spy_fwd)
    res, cut = {}, {}
    for n in (1, 2, 3, 9):
        monkeypatch.setenv("MDN_BWD_SEGMENTS", str(n))
        calls.clear()
        fwd_calls.clear()
        segs = chunk.chunk_segments(layout, n)
        cut[n] = any(sg.head_cut for sg in segs)
        res[n] = _run(xs, cu, 1, monkeypatch)
        assert len(calls) == len(segs) and sum(calls) == layout.num_chunks, (n, calls)
        assert fwd_calls == ([len(segs)] if cut[n] else []), (n, fwd_calls)
    # which runs cut a sequence: none of 1 segment; the 7-chunk sequence always
    assert not cut[1] and cut[9] and (case != "one-sequence" or cut[2])
    for n in (2, 3, 9):
        assert len(chunk.chunk_segments(layout, n)) > 1
        for name, a, b in zip(NAMES, res[n], res[1]):
            assert a.dtype == b.dtype and torch.equal(a, b), (n, name)
    for bad in ("0", "two"):
        monkeypatch.setenv("MDN_BWD_SEGMENTS", bad)
        with pytest.raises(ValueError, match="MDN_BWD_SEGMENTS"):
            _run(xs, cu, 1, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_negated_products_in_the_gemm_are_the_negated_products(dtype):
    """chunk._product: a @ bᵀ, and with negate the GEMM's alpha = −1 (beta = 0), bitwise the
    negation of the rounded product; into an `out` whose contents (NaN here) are not read."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 2, 16, 24, generator=g).to(dtype)
    b = torch.randn(3, 2, 8, 24, generator=g).to(dtype)
    ref = a @ b.transpose(-1, -2)
    assert torch.equal(chunk._product(a, b), ref)
    assert torch.equal(chunk._product(a, b, negate=True), ref.neg())
    for negate in (False, True):
        out = torch.full((3, 2, 16, 8), float("nan"), dtype=dtype)
        assert chunk._product(a, b, out=out, negate=negate) is out
        assert torch.equal(out, ref.neg() if negate else ref)


def test_chunk_segments_cover_the_chunks_once():
    """chunk.chunk_segments: at most n runs of consecutive chunks of about equal counts, ending
    at sequence boundaries where the sequences are short enough and cutting longer ones (the
    cut flags say which); the same from the layout's host offsets and from a host copy of its
    device offsets; each segment's layout is its overlaps, clipped to it."""
    from dataclasses import replace

    cu = torch.tensor([0, 5, 21, 1, 34, 16, 16]).cumsum(0)      # chunks 1, 2, 1, 3, 1, 1 (C = 16)
    lay = build_layout(1, int(cu[-1]), cu, 16, torch.device("cpu"))
    assert lay.host_chunk_offsets == (0, 1, 3, 4, 7, 8, 9)
    assert chunk.chunk_segments(lay, 1) == [(0, 9, 0, 6, lay, False, False)]
    bounds = lambda segs: [tuple(s[:4]) + tuple(s[5:]) for s in segs]  # noqa: E731
    # whole sequences (no sequence is longer than a segment's share)
    assert bounds(chunk.chunk_segments(lay, 2)) == [(0, 4, 0, 3, False, False),
                                                    (4, 9, 3, 6, False, False)]
    assert bounds(chunk.chunk_segments(lay, 3)) == [(0, 3, 0, 2, False, False),
                                                    (3, 7, 2, 4, False, False),
                                                    (7, 9, 4, 6, False, False)]
    # six segments of ≤ 2 chunks: the 3-chunk sequence is cut after its second chunk
    assert bounds(chunk.chunk_segments(lay, 6)) == [
        (0, 1, 0, 1, False, False), (1, 3, 1, 2, False, False), (3, 4, 2, 3, False, False),
        (4, 6, 3, 4, False, True), (6, 8, 3, 5, True, False), (8, 9, 5, 6, False, False)]
    one = build_layout(1, 100, None, 16, torch.device("cpu"))      # one sequence of 7 chunks
    assert bounds(chunk.chunk_segments(one, 3)) == [(0, 3, 0, 1, False, True),
                                                    (3, 6, 0, 1, True, True),
                                                    (6, 7, 0, 1, True, False)]
    for layout, N in ((lay, 6), (one, 1)):
        for n in (2, 3, 4, 6, 50):
            segs = chunk.chunk_segments(layout, n)
            no_host = chunk.chunk_segments(replace(layout, host_chunk_offsets=None), n)
            assert bounds(segs) == bounds(no_host) and 1 < len(segs) <= n
            assert [s.c0 for s in segs[1:]] == [s.c1 for s in segs[:-1]]
            assert (segs[0].c0, segs[-1].c1, segs[0].n0, segs[-1].n1) == (0, layout.num_chunks, 0, N)
            for s, nxt in zip(segs, segs[1:]):   # a cut joins the same sequence on both sides
                assert s.tail_cut == nxt.head_cut and (not s.tail_cut or s.n1 - 1 == nxt.n0)
            for s in segs:
                sl = s.layout
                assert (sl.num_seqs, sl.num_chunks) == (s.n1 - s.n0, s.c1 - s.c0)
                assert sl.seq_chunk_offsets.tolist() == list(sl.host_chunk_offsets)
                full = layout.host_chunk_offsets[s.n0:s.n1 + 1]
                assert sl.host_chunk_offsets == tuple(min(max(x, s.c0), s.c1) - s.c0 for x in full)
                assert min(b - a for a, b in zip(sl.host_chunk_offsets, sl.host_chunk_offsets[1:])) > 0


def _accounting(monkeypatch):
    """tools/mem_accounting.py as a module, every Triton launch a no-op (the allocations are the
    GPU run's; the kernels only fill them)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "mem_accounting.py")
    spec = importlib.util.spec_from_file_location("mem_accounting", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for cls in mod.launch_classes():
        monkeypatch.setattr(cls, "__getitem__", mod._no_launch)
    return mod


def test_memory_accounting_recompute_pairs_saves_memory(monkeypatch):
    """tools/mem_accounting.py on the bf16 fused path at a small shape: the flag keeps less for
    backward and peaks lower (the accounting stubs the kernels, so bf16 is fine on CPU)."""
    mod = _accounting(monkeypatch)
    shape = (1, 4096, 2, 64, 128)
    res = {}
    # the modes like for like: each keeping the fp32 q̂, k̂ chunks (mode 2's fused state backward
    # reads them, so it keeps them whatever MDN_RAW_QK says)
    monkeypatch.setenv("MDN_RAW_QK", "0")
    # one segment: mode 2 (fused pair cotangents) has none, and two segments cut this one
    # sequence, keeping the pair at the cut (the segments' tests below cover that)
    monkeypatch.setenv("MDN_BWD_SEGMENTS", "1")
    for flag in ("0", "1", "2"):
        monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", flag)
        r = mod.account(*shape, torch.bfloat16, verbose=False)
        res[flag] = (r["held_bytes"], max(r["peak_fwd"], r["peak_bwd"]))
    assert res["1"][0] < 0.85 * res["0"][0] and res["2"][0] == res["1"][0]
    assert res["2"][1] < res["1"][1] < 0.85 * res["0"][1]
    # the raw q, k kept instead (the default; they are the op's inputs here, not counted): mode 1
    # keeps and peaks lower by exactly the two fp32 chunks
    monkeypatch.setenv("MDN_RAW_QK", "1")
    qk_chunks = 2 * shape[0] * shape[1] * shape[2] * shape[3] * 4
    monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", "1")
    r = mod.account(*shape, torch.bfloat16, verbose=False)
    assert (r["held_bytes"], max(r["peak_fwd"], r["peak_bwd"])) == (res["1"][0] - qk_chunks,
                                                                     res["1"][1] - qk_chunks)
    monkeypatch.setenv("MDN_RAW_QK", "0")
    pair = shape[0] * shape[1] // 64 * shape[2] * shape[3] * shape[4] * 2   # [NC, H, K, V] bf16
    # with the pair cotangents made first as well: the same four pair-sized tensors at the peak
    # as mode 2's (which fuses them into the state backward)
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", "1")
    first = mod.account(*shape, torch.bfloat16, verbose=False)["peak_bwd"]
    assert res["2"][1] <= first < res["1"][1]
    # with separate end-cotangent buffers (the earlier path) the peak holds two pairs more
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", "0")
    monkeypatch.setenv("MDN_END_OVER_PAIR_GRADS", "0")
    r = mod.account(*shape, torch.bfloat16, verbose=False)
    assert r["peak_bwd"] - res["1"][1] > pair


@pytest.mark.parametrize("flags", [("1", "0", "1"), ("1", "1", "1"), ("0", "0", "1"),
                                   ("1", "0", "0"), ("1", "1", "0")],
                         ids=["end-over", "end-over-pair-grads-first", "separate",
                              "end-over-w-remade", "end-over-pair-grads-first-w-remade"])
def test_estimator_op_backward_matches_the_accounting(flags, monkeypatch):
    """The estimator's op backward workspace (mdn_scale/train/memory.py, StateOutput at CP = 1)
    against tools/mem_accounting.py at the bench head shape (K = 128, V = 256, where the op's own
    backward is the peak): the backward's peak above what the forward keeps and o, per token,
    within 4 bytes of the estimate in each order (MDN_END_OVER_PAIR_GRADS,
    MDN_PAIR_GRADS_FIRST, MDN_SAVE_W): the estimate leaves out the state pass's fp32 gate sums per value
    block, 3·(V/BV)·4/C bytes per token and head (3 of the measured 3.4 in the earlier order,
    where they are alive at the peak)."""
    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import Layout, layer_activation_terms

    monkeypatch.setenv("MDN_END_OVER_PAIR_GRADS", flags[0])
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", flags[1])
    monkeypatch.setenv("MDN_SAVE_W", flags[2])
    monkeypatch.setenv("MDN_BWD_SEGMENTS", "1")   # one segment; the next test covers segments
    mod = _accounting(monkeypatch)
    B, T, H, K, V = 1, 4096, 2, 128, 256
    r = mod.account(B, T, H, K, V, torch.bfloat16, verbose=False)
    measured = (r["peak_bwd"] - r["held_bytes"] - B * T * H * V * 2) / (B * T)
    mc = ModelConfig(hidden_size=256, num_layers=2, num_heads=H, head_k_dim=K, expand_v=2,
                     vocab_size=300, chunk_size=64)
    t = layer_activation_terms(mc, Layout(precision="bf16", seq_len=T, fused_mixer=True,
                                          fused_gates=True))
    assert 0 <= measured - t["op_backward"] < 4, (measured, t["op_backward"])


@pytest.mark.parametrize("flags,segs,B,T", [
    (("1", "0", "1"), 2, 2, 2048), (("1", "1", "1"), 4, 4, 1024), (("1", "0", "1"), 3, 4, 1024),
    (("0", "0", "1"), 2, 2, 2048), (("1", "0", "0"), 2, 2, 2048), (("0", "1", "0"), 3, 4, 1024),
    (("1", "0", "1"), 2, 1, 4096), (("1", "1", "1"), 3, 1, 4096), (("1", "0", "1"), 3, 2, 2048)],
    ids=["end-over-2", "pair-grads-first-4", "end-over-3-of-4", "separate-2", "w-remade-2",
         "separate-first-w-remade-3-of-4", "one-sequence-cut-2", "one-sequence-cut-3-first",
         "two-sequences-cut-3"])
def test_estimator_op_backward_in_segments_matches_the_accounting(flags, segs, B, T, monkeypatch):
    """The same with StateOutput's backward in segments (MDN_BWD_SEGMENTS,
    Layout.op_backward_segments from the environment), B equal sequences, in each order:
    whole sequences (3 segments of 4 sequences: 2, 1, 1) and sequences cut (one sequence in 2
    or 3 segments, two in 3). Where a sequence is cut the estimate leaves out the segments'
    fp32 [N, H, K, V] rows of initial pairs and final cotangents, at most 8 of them; and the
    segments' estimate is below one segment's (the accounting's peak too)."""
    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import Layout, layer_activation_terms

    monkeypatch.setenv("MDN_END_OVER_PAIR_GRADS", flags[0])
    monkeypatch.setenv("MDN_PAIR_GRADS_FIRST", flags[1])
    monkeypatch.setenv("MDN_SAVE_W", flags[2])
    mod = _accounting(monkeypatch)
    H, K, V = 2, 128, 256
    mc = ModelConfig(hidden_size=256, num_layers=2, num_heads=H, head_k_dim=K, expand_v=2,
                     vocab_size=300, chunk_size=64)
    lay = Layout(precision="bf16", seq_len=T, micro_batch=B, fused_mixer=True, fused_gates=True)
    res = {}
    for n in (1, segs):
        monkeypatch.setenv("MDN_BWD_SEGMENTS", str(n))
        r = mod.account(B, T, H, K, V, torch.bfloat16, verbose=False)
        measured = (r["peak_bwd"] - r["held_bytes"] - B * T * H * V * 2) / (B * T)
        res[n] = (measured, layer_activation_terms(mc, lay)["op_backward"], r["peak_bwd"])
    measured, estimate, _ = res[segs]
    rows = 8 * H * K * V * 4 / (B * T) if segs > B else 0   # the cuts' per-segment rows
    assert 0 <= measured - estimate < 4 + rows, (measured, estimate, rows)
    assert res[segs][1] < res[1][1] and res[segs][2] < res[1][2]


def test_memory_accounting_cp_lean_segments_save_memory(monkeypatch):
    """tools/mem_accounting.py --cp at the 1.3B head shape (K = 256, V = 512): the CP op at one
    rank (what MDN_CP_EMULATE=1 runs) peaks lower with the lean node than with the default node
    (no pair kept), and lower again in segments (one segment's per-chunk tensors at a time); the
    estimator's op terms plus the CP group maps and gradients that memory.estimate adds for
    every CP node are within 3% of each, o left out of the peaks (the model's estimate counts it
    with the gated norm that keeps it). Measured in session 14: +2.3%, +0.9%, −1.0% (session 15,
    the raw q, k kept instead of the fp32 q̂, k̂: +2.4%, +0.9%, −1.1%); before
    the estimate counted the unsegmented lean node's last casts (its peak: the bf16 input
    gradients made beside their fp32 products), −10.9% there. The accounting is exact (no
    randomness): the margin covers only the estimate's own slack, +2.3% at most here."""
    import torch.distributed as dist

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import Layout, layer_activation_terms

    mod = _accounting(monkeypatch)
    B, T, H, K, V, C, seg = 1, 16384, 1, 256, 512, 64, 4096
    mc = ModelConfig(hidden_size=256, num_layers=2, num_heads=H, head_k_dim=K, expand_v=2, vocab_size=300,
                     chunk_size=C)
    peaks, est = {}, {}
    for name, env in (("default", {}), ("lean", {"MDN_CP_LEAN": "1"}),
                      ("lean_seg", {"MDN_CP_LEAN": "1", "MDN_CP_LEAN_SEGMENT_TOKENS": str(seg)})):
        for k in ("MDN_CP_LEAN", "MDN_CP_LEAN_SEGMENT_TOKENS"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        r = mod.account(B, T, H, K, V, torch.bfloat16, verbose=False, cp=True)
        # o: the model's estimate counts it with the gated norm that keeps it; the model's q is
        # the correction's output, which the op keeps for its backward (MDN_RAW_QK) and the
        # estimate counts: the accounting's q is an input, which it does not count
        peaks[name] = max(r["peak_fwd"], r["peak_bwd"]) - B * T * H * V * 2 + B * T * H * K * 2
        t = layer_activation_terms(mc, Layout(cp=2, seq_len=2 * T, fused_mixer=True, fused_gates=True,
                                              cp_lean=bool(env), cp_lean_segment_tokens=seg if "_seg" in name else 0))
        # memory.estimate's CP group gradients, which it counts for every CP node
        groups = -(-T // (C * -(-16 * K // C)))
        est[name] = (T * (t["op_chunk_tensors"] + t["op_state_pairs"] + t["op_backward"])
                     + 12 * groups * H * K * V * 4 + groups * H * (2 * K) ** 2 * 4)
    assert not dist.is_initialized()   # the accounting's own one-rank group is gone
    assert peaks["lean_seg"] < 0.6 * peaks["lean"] and peaks["lean"] < 0.95 * peaks["default"]
    for name in peaks:
        assert abs(est[name] / peaks[name] - 1) < 0.03, (name, est[name], peaks[name])


def test_recompute_pairs_keeps_no_tensor_on_ctx(fused_on, monkeypatch):
    """StateOutput saves every tensor through save_for_backward (activation recompute drops and
    rebuilds only those: U held on ctx stayed alive across every checkpointed layer, 4 GiB of
    the 400M model at 64K tokens on the H100), so its backward can also run twice."""
    monkeypatch.setenv("MDN_RECOMPUTE_PAIRS", "1")
    xs = [x.requires_grad_() for x in random_inputs(1, 32, 1, 16, 16, dtype=torch.float32, seed=2)]
    o, _ = mdn_chunk(*xs, backend="triton", chunk_size=16)
    assert tensors_on_ctx(o) == []
    names, stack, seen = set(), [o.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is not None and id(n) not in seen:
            seen.add(id(n))
            names.add(type(n).__name__)
            stack += [f for f, _ in n.next_functions]
    assert "StateOutputBackward" in names, names  # the mode-1 Function is among those checked
    first = torch.autograd.grad(o.sum(), xs, retain_graph=True)
    second = torch.autograd.grad(o.sum(), xs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _distinct_fuse_variants():
    """One FUSE_VARIANTS name per kernel code path (num_warps does not change the interpreter's
    results)."""
    from mdn_kernels.mdn.state_pass import FUSE_VARIANTS
    seen = {}
    for name, (fv, _, bv_div) in sorted(FUSE_VARIANTS.items()):
        seen.setdefault((fv, bv_div), name)
    return sorted(seen.values())


@pytest.mark.parametrize("variant", _distinct_fuse_variants())
def test_fuse_variants_match_the_default_path(variant, fused_on, monkeypatch):
    """Every way of forming the fused pair cotangents (state_pass.FUSE_VARIANTS, picked by
    MDN_FUSE_VARIANT for a GPU triage): the same numbers as mode 0 to float rounding, with an
    initial pair, packed documents and a value block split in two (V = 32, halfbv: BV = 16)."""
    xs = random_inputs(1, 61, 2, 16, 32, dtype=torch.float32, seed=31, with_state=True,
                       num_states=4)
    cu = torch.tensor([0, 5, 21, 1, 34]).cumsum(0)
    base = _run(xs, cu, 0, monkeypatch)
    monkeypatch.setenv("MDN_FUSE_VARIANT", variant)
    got = _run(xs, cu, 2, monkeypatch)
    for n, a, b in zip(NAMES, got, base):
        err = ((a - b).double().norm() / b.double().norm()).item()
        assert err < 1e-6, f"{variant}, {n}: relative difference {err:.2e}"


def test_fuse_variant_name_is_checked(monkeypatch):
    from mdn_kernels.mdn import state_pass
    monkeypatch.setenv("MDN_FUSE_VARIANT", "nope")
    with pytest.raises(ValueError, match="fuse variant"):
        state_pass.fuse_variant()
    assert state_pass.fuse_variant("trans-w4") == "trans-w4"
    monkeypatch.delenv("MDN_FUSE_VARIANT")
    assert state_pass.fuse_variant() == state_pass.DEFAULT_FUSE_VARIANT
