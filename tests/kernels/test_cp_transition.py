"""Single-process checks of the CP building blocks: the rank map [𝒯 | ℬ] (groups + tree, torch
and Triton) against the state pass it summarises, and the local views of global offsets."""
import pytest
import torch

from mdn_kernels.cp import batched_view, local_cu_seqlens, packed_view, rank_map
from mdn_kernels.cp.transition import plan_groups
from mdn_kernels.mdn.chunk_torch import chunk_prepare, state_pass_fwd_torch
from mdn_kernels.mdn.layout import build_layout
from mdn_kernels.mdn.naive import l2norm
from mdn_kernels.mdn.testing import random_inputs

ARGS = ("U", "Y", "Z", "Kg", "Km", "a_end", "g_end", "u_end")


def prepared(B, T, H, K, V, C, dtype, cu=None, seed=0):
    q, k, v, la, lm, beta, eta = random_inputs(B, T, H, K, V, dtype=dtype, seed=seed)
    layout = build_layout(B, T, cu, C, k.device)
    flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731
    kc = layout.to_chunks(l2norm(flat(k)))
    vc = layout.to_chunks(flat(v))
    gates = [layout.to_chunks(flat(g)) for g in (la, lm, beta, eta)]
    prep = chunk_prepare(kc, kc, vc, *gates, p_times_alpha=True)
    return [prep[n].contiguous() for n in ARGS], layout


def final_pair(args, layout, S0, M0):
    *_, S, M = state_pass_fwd_torch(*args, S0, M0, layout)
    return torch.cat([S, M], dim=-2)


@pytest.mark.parametrize("group_chunks", [1, 2, 3, None])
@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12),
                                               ("triton", torch.float32, 1e-5)])
def test_rank_map_is_the_state_pass(group_chunks, backend, dtype, tol):
    B, T, H, K, V, C = 2, 40, 2, 8, 16, 8           # 5 chunks per row
    args, layout = prepared(B, T, H, K, V, C, dtype)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, H, 2 * K, V, generator=g, dtype=torch.float64).to(dtype)
    S_init, M_init = torch.randn(2, B, H, K, V, generator=g, dtype=torch.float64).to(dtype)
    # A middle rank: every row continues, so X_out = 𝒯 X + ℬ with ℬ = F(0).
    TB = rank_map(args, S_init, M_init, layout, batched_view(B, T, 1, 3), backend=backend,
                  allow_tf32=False, group_chunks=group_chunks)
    want = final_pair(args, layout, X[:, :, :K].contiguous(), X[:, :, K:].contiguous())
    got = TB[..., :2 * K] @ X + TB[..., 2 * K:]
    assert ((got - want).norm() / want.norm()).item() < tol
    # Rank 0: the rows start here from their initial states: 𝒯 = 0, ℬ = F(initial state).
    TB0 = rank_map(args, S_init, M_init, layout, batched_view(B, T, 0, 3), backend=backend,
                   allow_tf32=False, group_chunks=group_chunks)
    assert TB0[..., :2 * K].abs().max().item() == 0
    want0 = final_pair(args, layout, S_init, M_init)
    assert ((TB0[..., 2 * K:] - want0).norm() / want0.norm()).item() < tol


@pytest.mark.parametrize("group_chunks", [1, None])
def test_rank_map_packed_documents(group_chunks):
    """Rank 1 of 3 with T = 40: global documents [0, 50) [50, 70) [70, 120) → local pieces
    [0, 10) (continued), [10, 30), [30, 40) (starts here, carried out): 𝒯 = 0, ℬ = final of the
    last piece from its own initial state. If instead the rank lies inside one document, 𝒯 ≠ 0."""
    H, K, V, C, T = 2, 8, 16, 8, 40
    view = packed_view(torch.tensor([0, 50, 70, 120]), T, 1, 3)
    assert view.cu_local.tolist() == [0, 10, 30, 40]
    assert view.in_seq == (0,) and view.out_seq == (2,)
    assert view.init_rows == (-1, 1, 2) and view.final_rows == (0, 1, -1)
    args, layout = prepared(1, T, H, K, V, C, torch.float64, cu=view.cu_local)
    g = torch.Generator().manual_seed(2)
    S_init, M_init = torch.randn(2, 3, H, K, V, generator=g, dtype=torch.float64)
    TB = rank_map(args, S_init, M_init, layout, view, backend="torch", allow_tf32=False,
                  group_chunks=group_chunks)
    assert TB[..., :2 * K].abs().max().item() == 0
    want = final_pair(args, layout, S_init, M_init)[2]
    torch.testing.assert_close(TB[0, ..., 2 * K:], want, rtol=1e-12, atol=1e-12)

    inside = packed_view(torch.tensor([0, 30, 120]), T, 1, 3)
    assert inside.cu_local.tolist() == [0, 40] and inside.continues(0)
    assert inside.init_rows == (-1,) and inside.final_rows == (-1,)


def test_local_cu_seqlens():
    cu = torch.tensor([0, 16, 20, 50, 64])       # R = 4, T = 16: a document starts at rank 1's start
    assert [local_cu_seqlens(cu, r, 16)[0].tolist() for r in range(4)] == [
        [0, 16], [0, 4, 16], [0, 16], [0, 2, 16]]
    assert [local_cu_seqlens(cu, r, 16)[1] for r in range(4)] == [False, False, True, True]
    v = packed_view(cu, 16, 1, 4)
    assert v.init_rows == (1, 2) and v.final_rows == (1, -1) and not v.continues(0)
    with pytest.raises(ValueError, match="rank"):
        local_cu_seqlens(cu, 4, 16)


def test_cp_arguments_checked_without_a_group():
    from mdn_kernels import mdn_chunk
    xs = random_inputs(1, 16, 2, 8, 8, seed=0)
    with pytest.raises(ValueError, match="cp_mode"):
        mdn_chunk(*xs, cp_mode="tree")
    with pytest.raises(ValueError, match="not initialized"):
        mdn_chunk(*xs, cp_group=object())


def test_host_chunk_offsets_match_the_layout():
    from mdn_kernels.cp.layout import host_chunk_offsets
    for view, B in ((batched_view(3, 40, 1, 2), 3), (packed_view(torch.tensor([0, 5, 61, 64, 80]), 40, 1, 2), 1)):
        layout = build_layout(B, 40, view.cu_local, 16, torch.device("cpu"))
        assert host_chunk_offsets(view, 16) == layout.seq_chunk_offsets.tolist()
        assert list(layout.host_chunk_offsets) == layout.seq_chunk_offsets.tolist()
        # plan_groups from the layout's host offsets, from given ones and from the device's
        from dataclasses import replace
        plans = [plan_groups(layout, 2), plan_groups(layout, 2, host_chunk_offsets(view, 16)),
                 plan_groups(replace(layout, host_chunk_offsets=None), 2)]
        for p in plans[1:]:
            assert torch.equal(p.g_start, plans[0].g_start) and torch.equal(p.g_len, plans[0].g_len)
            assert p.layout.host_chunk_offsets == plans[0].layout.host_chunk_offsets
            assert list(p.layout.host_chunk_offsets) == p.layout.seq_chunk_offsets.tolist()


# ---------------------------------------------------------------------------------------------
# The tree over groups (what the CP state pass runs) against the serial scans it replaces, and
# the reverse pass that stores nothing per chunk (init_only) against the torch spec.
# ---------------------------------------------------------------------------------------------

def _plans():
    """Plans with 1..7 groups per sequence, several sequences of different lengths."""
    C = 8
    out = []
    for B, T, cu, gc in ((1, 56, None, 1),       # 7 groups: odd counts at two levels
                         (2, 40, None, 2),       # 3 groups per row
                         (3, 64, None, 1),       # 8 groups per row: a full binary tree
                         (1, 96, [0, 8, 9, 40, 96], 1)):   # 1, 1, 4, 7 groups
        cu_t = None if cu is None else torch.tensor(cu)
        layout = build_layout(B, T, cu_t, C, torch.device("cpu"))
        out.append(plan_groups(layout, gc))
    return out


def test_tree_structure():
    for plan in _plans():
        # every composed node is made once; each root covers its sequence's groups in order
        assert plan.num_nodes == 2 * plan.num_groups - len(plan.groups_of_seq)
        cover = {g: [g] for g in range(plan.num_groups)}
        for left, right, a, b in plan.levels:
            assert b - a == left.numel() == right.numel()
            for i, (l, r) in enumerate(zip(left.tolist(), right.tolist())):
                assert cover[l][-1] + 1 == cover[r][0]
                cover[a + i] = cover[l] + cover[r]
        for s, groups in enumerate(plan.groups_of_seq):
            assert cover[plan.roots[s]] == groups
            assert plan.root_idx[s].item() == plan.roots[s]
        assert len(plan.levels) == max((len(g) - 1).bit_length() for g in plan.groups_of_seq)


def _random_maps(NG, H, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(2 * K, dtype=torch.float64)
    T = 0.9 * eye + 0.3 * torch.randn(NG, H, 2 * K, 2 * K, generator=g, dtype=torch.float64) / K ** 0.5
    B = torch.randn(NG, H, 2 * K, V, generator=g, dtype=torch.float64)
    return torch.cat([T, B], dim=-1)


@pytest.mark.parametrize("i", range(4))
def test_tree_equals_serial_scans(i):
    from mdn_kernels.cp.transition import (group_end_grads, group_initial_pairs, tree_down,
                                           tree_down_grads, tree_up, tree_up_grads, tree_up_T)
    plan = _plans()[i]
    H, K, V = 2, 3, 5
    NG, N = plan.num_groups, len(plan.groups_of_seq)
    maps = _random_maps(NG, H, K, V, seed=i)
    g = torch.Generator().manual_seed(10 + i)
    X_seq = torch.randn(N, H, 2 * K, V, generator=g, dtype=torch.float64)
    d0g = torch.randn(NG, H, 2 * K, V, generator=g, dtype=torch.float64)
    G_seq = torch.randn(N, H, 2 * K, V, generator=g, dtype=torch.float64)

    store = torch.empty((plan.num_nodes,) + tuple(maps.shape[1:]), dtype=torch.float64)
    store[:NG] = maps
    tree_up(store, plan)
    # forward: the pair entering every group; the roots are the sequences' whole maps
    want = group_initial_pairs(maps, plan, X_seq)
    torch.testing.assert_close(tree_down(store, plan, X_seq), want, rtol=1e-12, atol=1e-12)
    X_end = group_initial_pairs(maps, plan, X_seq)[plan.last_idx]
    last = maps[plan.last_idx]
    X_end = last[..., :2 * K] @ X_end + last[..., 2 * K:]
    root = store[plan.root_idx]
    torch.testing.assert_close(root[..., :2 * K] @ X_seq + root[..., 2 * K:], X_end,
                               rtol=1e-12, atol=1e-12)
    # backward: gradient arriving at every group's end, and into every sequence's initial pair
    Tg = maps[..., :2 * K].contiguous()
    Ts = tree_up_T(Tg, plan)
    torch.testing.assert_close(Ts, store[..., :2 * K], rtol=1e-12, atol=1e-12)
    Ds = tree_up_grads(Ts, plan, d0g)
    Gend_want, Gseq_want = group_end_grads(Tg, plan, d0g, G_seq)
    torch.testing.assert_close(tree_down_grads(Ts, Ds, plan, G_seq), Gend_want,
                               rtol=1e-12, atol=1e-12)
    Tr = Ts[plan.root_idx]
    torch.testing.assert_close(Ds[plan.root_idx] + Tr.transpose(-1, -2) @ G_seq, Gseq_want,
                               rtol=1e-12, atol=1e-12)
    _, d_zero = group_end_grads(Tg, plan, d0g, torch.zeros_like(G_seq))
    torch.testing.assert_close(Ds[plan.root_idx], d_zero, rtol=1e-12, atol=1e-12)


def _reverse_pass_case(cu, seed: int):
    """The state pass's operands (args, layout), a forward from a random initial pair (S0s,
    M0s) and random cotangents (dW, dS0s, dM0s, dS_fin, dM_fin): C = 16, batched or packed."""
    from mdn_kernels.mdn.state_pass import state_pass_fwd_triton
    B, T, H, K, V, C = (2, 40, 2, 16, 32, 16) if cu is None else (1, 64, 2, 16, 32, 16)
    cu_t = None if cu is None else torch.tensor(cu)
    args, layout = prepared(B, T, H, K, V, C, torch.float32, cu=cu_t, seed=seed)
    N, NC = layout.num_seqs, layout.num_chunks
    g = torch.Generator().manual_seed(seed + 1)
    S0, M0 = torch.randn(2, N, H, K, V, generator=g)
    _, S0s, M0s, _, _ = state_pass_fwd_triton(*args, S0, M0, layout)
    dW = torch.randn(NC, H, C, V, generator=g)
    dS0s, dM0s = torch.randn(2, NC, H, K, V, generator=g)
    dS_fin, dM_fin = torch.randn(2, N, H, K, V, generator=g)
    return args, layout, S0s, M0s, (dW, dS0s, dM0s, dS_fin, dM_fin)


@pytest.mark.parametrize("cu", [None, [0, 9, 40, 64]])
def test_state_pass_bwd_init_only(cu):
    """The Triton reverse pass with init_only (no per-chunk stores, S0s/M0s not read) gives the
    initial pairs' gradient of the torch spec and of the full kernel (interpreter on CPU)."""
    from mdn_kernels.mdn.chunk_torch import state_pass_bwd_torch
    from mdn_kernels.mdn.state_pass import state_pass_bwd_triton
    args, layout, S0s, M0s, cot = _reverse_pass_case(cu, seed=3)
    dS, dM = state_pass_bwd_triton(*args[1:], *cot, None, None, layout, init_only=True)
    full = state_pass_bwd_triton(*args[1:], *cot, S0s, M0s, layout)
    spec = state_pass_bwd_torch(*args[1:], *cot, layout)
    for got, f, want in ((dS, full[3], spec[3]), (dM, full[4], spec[4])):
        assert torch.equal(got, f)
        assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("cu", [None, [0, 9, 40, 64]])
def test_state_pass_bwd_end_over_pair_grads(cu):
    """end_over_pair_grads: the reverse pass writes dS_end, dM_end into the buffers of dS0s,
    dM0s (the lean nodes' peak drops by two pair-sized tensors) with the values, gate sums and
    initial-pair gradients of the separate-buffer pass, bit for bit (interpreter on CPU)."""
    from mdn_kernels.mdn.state_pass import state_pass_bwd_triton
    args, layout, S0s, M0s, (dW, dS0s, dM0s, dS_fin, dM_fin) = _reverse_pass_case(cu, seed=5)
    want = state_pass_bwd_triton(*args[1:], dW, dS0s, dM0s, dS_fin, dM_fin, S0s, M0s, layout)
    assert not torch.equal(want[1], dS0s)    # the end cotangents differ from the pair grads
    a, b = dS0s.clone(), dM0s.clone()
    got = state_pass_bwd_triton(*args[1:], dW, a, b, dS_fin, dM_fin, S0s, M0s, layout,
                                end_over_pair_grads=True)
    assert got[1] is a and got[2] is b
    for x, y in [*zip(got[:5], want[:5]), *zip(got[5], want[5])]:
        assert x.dtype == y.dtype and torch.equal(x, y)
    with pytest.raises(ValueError, match="end_over_pair_grads: dS0s"):
        state_pass_bwd_triton(*args[1:], dW, a[:, :1], b, dS_fin, dM_fin, S0s, M0s, layout,
                              end_over_pair_grads=True)
    with pytest.raises(ValueError, match="init_only"):
        state_pass_bwd_triton(*args[1:], dW, a, b, dS_fin, dM_fin, None, None, layout,
                              init_only=True, end_over_pair_grads=True)


@pytest.mark.parametrize("i", range(4))
def test_tree_walks_triton_equal_torch(i):
    """The Triton walks (one launch per level, TRITON_INTERPRET=1 on CPU) against the torch
    walks, fp32, on the same plans (odd counts, several sequences, packed)."""
    from mdn_kernels.cp.transition import tree_down, tree_down_grads, tree_up, tree_up_grads
    plan = _plans()[i]
    H, K, V = 2, 8, 24          # 2K = 16 and 2K + V = 40: partial column blocks
    NG, N = plan.num_groups, len(plan.groups_of_seq)
    maps = _random_maps(NG, H, K, V, seed=i).float()
    g = torch.Generator().manual_seed(20 + i)
    X_seq = torch.randn(N, H, 2 * K, V, generator=g)
    d0g = torch.randn(NG, H, 2 * K, V, generator=g)
    G_seq = torch.randn(N, H, 2 * K, V, generator=g)
    store = torch.empty((plan.num_nodes,) + tuple(maps.shape[1:]))
    store[:NG] = maps
    want = tree_up(store.clone(), plan)
    got = tree_up(store.clone(), plan, "triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree_down(want, plan, X_seq, "triton"),
                               tree_down(want, plan, X_seq), rtol=1e-5, atol=1e-5)
    Ts = want[..., :2 * K].contiguous()
    Ds = tree_up_grads(Ts, plan, d0g)
    torch.testing.assert_close(tree_up_grads(Ts, plan, d0g, "triton"), Ds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree_down_grads(Ts, Ds, plan, G_seq, "triton"),
                               tree_down_grads(Ts, Ds, plan, G_seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_group_maps_above_the_kernels_k_take_the_torch_path(dtype, tol, monkeypatch):
    """Above GROUP_MAP_KERNEL_MAX_K (the Triton group-map kernel faulted on the H100 at K = 256
    before it was compiled without wgmma; the limit is 256 since session 9) the triton backend computes the maps with batched torch products in fp32, casting each
    step's operands as gathered: fp32 maps equal to the float64 spec on the same (rounded)
    operands, written into the fp32 store; at or below it the kernel still runs."""
    from mdn_kernels.cp import transition as tr

    args64, layout = prepared(1, 64, 2, 16, 32, 8, torch.float64, seed=4)   # 8 chunks
    plan = plan_groups(layout, 3)
    low = [t.to(dtype) if i < 5 else t.float() for i, t in enumerate(args64)]
    want = tr.group_maps_torch(*[t.double() for t in low], plan.g_start, plan.g_len)
    calls = []
    monkeypatch.setattr(tr, "group_maps_triton", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(tr, "GROUP_MAP_KERNEL_MAX_K", 8)          # K = 16 > 8: the torch path
    out = torch.empty(plan.num_groups, 2, 32, 64, dtype=torch.float32)
    got = tr.group_maps(low, plan, backend="triton", allow_tf32=False, out=out)
    assert not calls and got is out and got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    monkeypatch.setattr(tr, "GROUP_MAP_KERNEL_MAX_K", 16)         # K = 16: the kernel
    tr.group_maps(low, plan, backend="triton", allow_tf32=False, out=out)
    assert calls == [1]
    # MDN_CP_GROUP_MAP_MAX_K moves the limit either way; bad values name the variable
    monkeypatch.setenv("MDN_CP_GROUP_MAP_MAX_K", "8")
    tr.group_maps(low, plan, backend="triton", allow_tf32=False, out=out)
    assert calls == [1]
    monkeypatch.setattr(tr, "GROUP_MAP_KERNEL_MAX_K", 8)
    monkeypatch.setenv("MDN_CP_GROUP_MAP_MAX_K", "256")
    tr.group_maps(low, plan, backend="triton", allow_tf32=False, out=out)
    assert calls == [1, 1]
    monkeypatch.setenv("MDN_CP_GROUP_MAP_MAX_K", "big")
    with pytest.raises(ValueError, match="MDN_CP_GROUP_MAP_MAX_K"):
        tr.group_maps(low, plan, backend="triton", allow_tf32=False, out=out)


@pytest.mark.parametrize("K", [16, 32])
def test_group_map_kernel_bf16_operands(K):
    """The Triton group-map kernel with bf16 operands (16-bit models, allow_tf32) against the
    float64 spec on the same rounded operands. The kernel also rounds its running map to bf16
    for each product, so the bound is bf16-sized (measured 3.7e-3 at K = 16). Needs the
    interpreter's bf16 dot fixed (mdn_kernels.mdn.testing.patch_interpreter_bf16_dot,
    tests/conftest.py): unfixed, the maps came out at 1e10."""
    from mdn_kernels.cp.transition import group_maps_torch, group_maps_triton
    args64, layout = prepared(1, 8 * 16, 2, K, 2 * K, 16, torch.float64, seed=3)   # 8 chunks
    plan = plan_groups(layout, 2)
    low = [t.to(torch.bfloat16).contiguous() if i < 5 else t.float().contiguous()
           for i, t in enumerate(args64)]
    want = group_maps_torch(*[t.double() for t in low], plan.g_start, plan.g_len)
    got = group_maps_triton(*low, plan.g_start, plan.g_len, True)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all() and err <= 1e-2, err


@pytest.mark.parametrize("low,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_group_map_kernel_at_the_1p3b_head_size(low, tol):
    """The Triton group-map kernel at K = 256, C = 64 (the 1.3B model's heads, where it faulted
    on the H100 in session 4 under wgmma; the default there since session 9): its indexing and
    masks are right under the interpreter (fp32 measured 1e-7, bf16 3e-3)."""
    from mdn_kernels.cp.transition import group_maps_torch, group_maps_triton
    args64, layout = prepared(1, 3 * 64, 1, 256, 32, 64, torch.float64, seed=3)   # 3 chunks
    plan = plan_groups(layout, 2)
    a = [t.to(low).contiguous() if i < 5 else t.float().contiguous() for i, t in enumerate(args64)]
    want = group_maps_torch(*[t.double() for t in a], plan.g_start, plan.g_len)
    got = group_maps_triton(*a, plan.g_start, plan.g_len, low == torch.bfloat16)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all() and err <= tol, err


def test_lean_segments_cut_whole_groups(monkeypatch):
    """state_pass_cp._segments: consecutive whole groups of at most seg_chunks chunks (a longer
    group alone), their chunk ranges and a layout over the sliced chunks whose offsets start at
    0; cached per plan. MDN_CP_LEAN_SEGMENT_TOKENS is read in tokens and checked."""
    from mdn_kernels.cp import state_pass_cp as spc
    _, layout = prepared(1, 9 * 8, 1, 8, 8, 8, torch.float64, cu=torch.tensor([0, 40, 72]))
    plan = plan_groups(layout, 2)          # sequences of 5 and 4 chunks → groups 2,2,1 | 2,2
    segs = spc._segments(plan, 3)
    assert [(g0, g1, c0, c1) for g0, g1, c0, c1, _ in segs] == [(0, 1, 0, 2), (1, 3, 2, 5),
                                                               (3, 4, 5, 7), (4, 5, 7, 9)]
    assert [lay.seq_chunk_offsets.tolist() for *_, lay in segs] == [[0, 2], [0, 2, 3], [0, 2], [0, 2]]
    assert [lay.num_seqs for *_, lay in segs] == [1, 2, 1, 1]
    assert spc._segments(plan, 3) is segs
    assert [(s[0], s[1]) for s in spc._segments(plan, 1)] == [(i, i + 1) for i in range(5)]
    assert len(spc._segments(plan, 100)) == 1
    monkeypatch.setenv("MDN_CP_LEAN_SEGMENT_TOKENS", "200")
    assert spc.lean_segment_chunks(64) == 3
    monkeypatch.setenv("MDN_CP_LEAN_SEGMENT_TOKENS", "2k")
    with pytest.raises(ValueError, match="MDN_CP_LEAN_SEGMENT_TOKENS"):
        spc.lean_segment_chunks(64)
