"""The state pass over chunks when the sequence is split over a context-parallel group.

"allgather" (default), forward on rank r of R: the group maps [𝒯_g | ℬ_g] of this rank's
chunks (transition.py, all groups in parallel) → a tree composes consecutive groups pairwise
(log2 G levels) and its roots are the rank's [𝒯_r | ℬ_r] → one all-gather → X_r = fold of
ranks 0..r−1 (X ← 𝒯_j X + ℬ_j from X = 0; a sequence's initial state is inside ℬ of the rank
where it starts) → the same tree walked top down gives the pair entering every group → the
ordinary state-pass kernel runs all groups at once (the groups are its "sequences"), producing
the same per-chunk W, S0s, M0s as the serial pass.

Backward. The fold only computes a sequential composition, so nothing differentiates through 𝒯.
Let G_r be the gradient arriving at rank r's carried-in pair. The local reverse pass is linear in
the gradient arriving at the carried-out pair, so G_r = d0_r + 𝒯_rᵀ G_{r+1} (G_R = 0), where
d0_r is what the rank's own cotangents send to its carried-in pair when nothing arrives from
later ranks. Within the rank the same holds per group. So: (1) every group's reverse pass with
nothing arriving at its end (all groups at once, `init_only`: it stores nothing per chunk and
returns only d0_g), then the tree bottom up with 𝒯ᵀ gives d0_r; (2) one all-gather of d0 (the
𝒯_j, j > r, are kept from the forward all-gather) and the fold of ranks R−1..r+1 give G_{r+1};
(3) the tree top down from G_{r+1} gives the gradient arriving at every group's end, and every
group's full reverse pass runs once with it, which yields every per-chunk cotangent exactly as
the serial reverse pass would.

Why (1) is a pass of its own and not the full pass plus a correction: the reverse pass is linear
in what arrives at a group's end, so a correction pass with only the arriving gradients is exact
too, but it must add into dWt, dS_end, dM_end and the gate reductions (read and write them all
again, and read S0s, M0s), more traffic than (1), which reads only dW, dS0s, dM0s and the four
C×K operands and writes one pair per group. (1) is skipped where nothing crosses a group
boundary and nothing goes to rank r − 1 (one group per sequence on rank 0, or nothing carried
in); the tree and the fold are skipped where they have nothing to do.

"ring" mode: no 𝒯 at all. Rank r waits for X_r from rank r−1, runs the ordinary (serial) pass
and sends its carried-out pair to rank r+1; backward mirrors it (G_{r+1} from r+1, one reverse
pass, G_r to r−1). Exact, no extra FLOPs, but the ranks' state passes run one after another.

Cost of "allgather", on paper, at the weak-scaling benchmark shape (tools/bench_cp.py: B = 1,
n = 32K tokens per rank, C = 64 → 512 chunks, H = 6, K = 128, V = 256, bf16 operands; default
groups of ⌈16K/C⌉ = 32 chunks → G = 16 groups). The op at CP = 1 runs the same chunk-parallel
work plus the serial state pass: 48 programs (V/32 column blocks × H) walking 512 chunks, once
forward and once backward: latency-bound, with ~1/3 of the H100's SMs busy.

  piece (per rank)                   work                                     parallelism
  group maps (Triton)                8·n·K·(2K+V)·H = 103 GFLOP bf16          1536 programs × 32 steps
  tree up (forward)                  (G−1)·2(2K)²(2K+V)·H = 6.0 GFLOP fp32    4 levels, batched
  all-gather (forward)               P·H·2K·(2K+V)·4 B = 3.1 MB per rank      1 collective
  tree down (pair entering groups)   (G−1)·2(2K)²V·H = 3.0 GFLOP fp32         4 levels
  forward pass, all groups           8·n·K·V·H = 52 GFLOP; ~0.8 GB moved      768 programs × 32 steps
  (1) reverse pass, init_only        52 GFLOP; ~0.7 GB (dW, dS0s, dM0s, ops)  768 × 32
  tree up_T + up_grads + down_grads  3 × 3.0 GFLOP fp32                       3 × 4 levels
  all-gather (backward)              P·H·2K·V·4 B = 1.6 MB per rank           1 collective
  (3) reverse pass, full             52 GFLOP; ~1.6 GB (+ S0s, M0s, dWt,      768 × 32
                                     dS_end, dM_end)
  (the CP = 1 serial passes: the same 52 + 52 GFLOP and ~2.4 GB, but 48 programs × 512 steps)

Host side (tools/bench_cp.py --count: aten ops and Triton launches per rank, R = 4, G = 16,
interpreted-Triton path as on the GPU): the whole op went from ~324 aten ops + 12 launches per
rank to ~132 + 28 (CP = 1: 84 + 10). The tree walks take one Triton launch per level
(transition._level_affine) instead of ~5 ops; the composed nodes' 𝒯 are kept from the forward
(no tree_up_T in backward); the agreement check in api.py runs its collective and its one
device→host copy on a side stream, so it no longer drains the GPU queue on every call. What
differs between ranks is only the folds (rank r: r − 1 products 2K×2K by 2K×V forward, R − 2 − r
backward; ~0.2 GFLOP each at the benchmark shape): the extra per-rank GPU time seen in the v5
profile is the NCCL kernels' wait for the slowest rank (profile_summary now reports it apart,
gpu_comm_ms). `bench_cp.py --profile` shows the measured breakdown.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mdn_kernels.mdn.chunk import end_over_pair_grads
from mdn_kernels.mdn.chunk_torch import (
    state_pass_bwd_torch,
    state_pass_fwd_torch,
    state_pass_grads,
)

from .kept import current as current_kept_maps
from .layout import host_chunk_offsets
from .transition import (
    default_group_chunks,
    plan_groups,
    rank_map_from_tree,
    rank_map_index,
    tree_down,
    tree_down_grads,
    tree_store,
    tree_up,
    tree_up_grads,
    _affine,
)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[R, *t.shape]: every rank's t, in rank order (one collective into one buffer)."""
    t = t.contiguous()
    R = dist.get_world_size(group)
    out = t.new_empty((R * t.shape[0],) + tuple(t.shape[1:]))   # gloo wants the ranks along dim 0
    dist.all_gather_into_tensor(out, t, group=group)
    return out.view((R,) + tuple(t.shape))


def _fwd(args, S_init, M_init, layout, backend, allow_tf32):
    if backend == "triton":
        from mdn_kernels.mdn.state_pass import state_pass_fwd_triton
        return state_pass_fwd_triton(*args, S_init, M_init, layout, allow_tf32)
    return state_pass_fwd_torch(*args, S_init, M_init, layout)


def _bwd(saved, cot, S0s, M0s, layout, backend, allow_tf32):
    """(dWt, dS_end, dM_end, dS_init, dM_init, dgates or None), as in mdn.chunk.StatePass."""
    if backend == "triton":
        from mdn_kernels.mdn.state_pass import state_pass_bwd_triton
        return state_pass_bwd_triton(*saved, *cot, S0s, M0s, layout, allow_tf32)
    return (*state_pass_bwd_torch(*saved, *cot, layout), None)


def _bwd_init_only(saved, cot, layout, backend, allow_tf32):
    """Only the initial pairs' gradient of the reverse pass, [N, H, 2K, V] (Triton: the kernel
    stores nothing per chunk; torch: the full spec, the rest dropped)."""
    if backend == "triton":
        from mdn_kernels.mdn.state_pass import state_pass_bwd_triton
        dS, dM = state_pass_bwd_triton(*saved, *cot, None, None, layout, allow_tf32,
                                       init_only=True)
    else:
        dS, dM = state_pass_bwd_torch(*saved, *cot, layout)[3:]
    return torch.cat([dS, dM], dim=-2)


def _put_carried(S, M, view, X):
    """Copy the carried pairs X [P, H, 2K, V] into the rows of the sequences they feed."""
    K = S.shape[-2]
    S, M = S.clone(), M.clone()
    for p, i in enumerate(view.in_seq):
        if i >= 0:
            S[i] = X[p, :, :K]
            M[i] = X[p, :, K:]
    return S, M


def _take(S, M, rows):
    """[S; M] of the given local sequences (-1 → zeros): [P, H, 2K, V]."""
    pair = torch.cat([S, M], dim=-2)
    out = pair.new_zeros((len(rows),) + tuple(pair.shape[1:]))
    for p, i in enumerate(rows):
        if i >= 0:
            out[p] = pair[i]
    return out


_PLANS: dict = {}


def _cached_plan(layout, view, group_chunks):
    """GroupPlan per (local sequence lengths, chunking, device): built once per shape."""
    offsets = host_chunk_offsets(view, layout.chunk_size)
    key = (tuple(offsets), layout.chunk_size, layout.total_tokens, group_chunks,
           str(layout.seq_chunk_offsets.device))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        plan = _PLANS[key] = plan_groups(layout, group_chunks, offsets)
    return plan


def _pairs(S, M):
    return torch.cat([S, M], dim=-2)


class _ViewIndex:
    """Device index tensors of a CPLocalView (built once per view and plan: a host→device copy
    waits for the stream, which would stall the queue of kernels mid-op): slots whose carried-in
    pair feeds a local sequence (in_slots → in_rows, and the tree roots of those rows), every
    slot's carried-out sequence (out_rows), and rank_map_from_tree's index."""

    def __init__(self, view, plan, device):
        idx = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        slots = [p for p, i in enumerate(view.in_seq) if i >= 0]
        self.has_in = bool(slots)
        self.in_slots = idx(slots)
        self.in_rows = idx([view.in_seq[p] for p in slots])
        self.in_roots = idx([plan.roots[view.in_seq[p]] for p in slots])
        self.out_rows = idx(list(view.out_seq))
        self.rank_map = rank_map_index(plan, view, device)


def _cached_view_index(view, plan, device) -> _ViewIndex:
    """Kept on the (cached) plan itself, so an entry never outlives or outruns its plan."""
    cache = plan.__dict__.setdefault("_view_index", {})
    key = (view.rank, view.world, view.in_seq, view.out_seq, str(device))
    vi = cache.get(key)
    if vi is None:
        vi = cache[key] = _ViewIndex(view, plan, device)
    return vi


def _entering_pairs(args, S_init, M_init, layout, backend, allow_tf32, view, group, group_chunks):
    """The all-gather mode's forward up to the pair entering every group (the module docstring):
    group maps → tree → all-gather → fold of the earlier ranks → tree top down.

    Returns (plan, view index, split, Xg [NG or num_local, H, 2K, V] (fp32; the pairs entering
    the groups, or the sequences where no sequence has more than one group), later_T (the later
    ranks' 𝒯 the backward needs, or None), Ts (the tree nodes' 𝒯, or None))."""
    r, R = view.rank, view.world
    if group_chunks is None:
        group_chunks = default_group_chunks(args[1].shape[-1], args[1].shape[2])
    # Under train.recompute_keep_cp_maps the recompute takes what the layer's forward made
    # (kept.py): the same shapes on every rank, so all ranks skip the all-gather together.
    kept = current_kept_maps()
    signature = (r, R, tuple(args[0].shape), tuple(args[1].shape), str(args[0].dtype),
                 tuple(S_init.shape), group_chunks)
    hit = kept.take(signature) if kept is not None else None
    if hit is not None:
        return hit
    out = _compute_entering_pairs(args, S_init, M_init, layout, backend, allow_tf32, view, group,
                                  group_chunks)
    if kept is not None:
        kept.keep(signature, out)
    return out


def _compute_entering_pairs(args, S_init, M_init, layout, backend, allow_tf32, view, group,
                            group_chunks):
    K, V = args[1].shape[-1], args[0].shape[-1]
    r, R = view.rank, view.world
    plan = _cached_plan(layout, view, group_chunks)
    vi = _cached_view_index(view, plan, args[0].device)
    P, H, NG = view.num_slots, args[1].shape[1], plan.num_groups
    split = NG > view.num_local          # some sequence has more than one group
    store = None
    if r < R - 1 or split:
        # group maps → tree (composed pairs of consecutive groups, log2 G levels)
        store = tree_up(tree_store(args, plan, backend=backend, allow_tf32=allow_tf32),
                        plan, backend)
    if r < R - 1:
        TB = rank_map_from_tree(store, plan, view, S_init, M_init, vi.rank_map)
    else:  # nobody reads the last rank's map (the forward folds j < r; backward
        #     needs 𝒯_j only for j < R − 1, since G_R = 0): send zeros
        TB = S_init.new_zeros(P, H, 2 * K, 2 * K + V)
    gathered = _all_gather(TB, group) if R > 1 else TB[None]
    X = None       # the fold of ranks 0..r−1 from a zero pair (rank 0's ℬ first)
    for j in range(r):
        X = gathered[j, ..., 2 * K:] if X is None else compose_apply(gathered[j], X)
    # Backward needs 𝒯_j for r < j < R − 1, and the 𝒯 part of every tree node:
    # keep copies so the wide maps can be freed (the composed nodes' 𝒯 are
    # (NG − num_local) 2K×2K per head: 24 MB at the benchmark shape, and keeping
    # them saves rebuilding them in backward, ~14 small ops).
    later_T = gathered[r + 1:R - 1, ..., :2 * K].clone() if r + 1 < R - 1 else None
    Ts = store[..., :2 * K].clone() if split else None
    # The pair entering every local sequence, then every group (tree top down).
    X_seq = _pairs(S_init, M_init)
    if vi.has_in and X is not None:
        X_seq[vi.in_rows] = X[vi.in_slots].to(X_seq.dtype)
    Xg = tree_down(store, plan, X_seq.to(store.dtype), backend) if split else X_seq
    return plan, vi, split, Xg, later_T, Ts


def _end_grads(saved, cot, plan, vi, view, group, later_T, Ts, backend, allow_tf32, d0g=None):
    """The all-gather mode's backward steps (1)–(3) (the module docstring): the cotangents
    arriving at every group's end (dSg, dMg [NG or num_local, H, K, V], contiguous), for the one
    full reverse pass. cot: (dW, dS0s, dM0s, dS_fin, dM_fin) of the local sequences. d0g: step
    (1)'s result [NG, H, 2K, V] made by the caller (the segmented lean node; cot's first three
    are then not read)."""
    r, R = view.rank, view.world
    K = saved[0].shape[-1]
    P, H, V = view.num_slots, saved[0].shape[1], cot[3].shape[-1]
    NG = plan.num_groups
    split = NG > view.num_local
    # The sequences' own final-state cotangents enter at their last groups.
    if split:
        dSg = cot[3].new_zeros((NG, H, K, V)).index_put((plan.last_idx,), cot[3])
        dMg = cot[4].new_zeros((NG, H, K, V)).index_put((plan.last_idx,), cot[4])
    else:
        dSg, dMg = cot[3], cot[4]
    # (1) What every group's own cotangents send to its initial pair when nothing
    # arrives at its end (d0_g): a reverse pass that stores nothing per chunk, then the
    # tree bottom up gives every node's D, the sequences' at the roots. Needed to pass
    # gradients between groups (split) and to send this rank's d0 to rank r − 1.
    send = r > 0 and vi.has_in
    if split or send:
        if d0g is None:
            d0g = _bwd_init_only(saved, list(cot[:3]) + [dSg, dMg], plan.layout, backend,
                                 allow_tf32)
        Ds = tree_up_grads(Ts, plan, d0g, backend) if split else d0g
    # (2) One all-gather of d0 (zeros where nothing is carried in), the fold of ranks
    # R−1..r+1 gives G_{r+1}, the gradient arriving at the carried-out pairs.
    Gend = None
    if R > 1:
        d0 = cot[3].new_zeros(P, H, 2 * K, V)
        if send:
            d0[vi.in_slots] = Ds[vi.in_roots].to(d0.dtype)
        d0s = _all_gather(d0, group)
        if r < R - 1:
            G = d0s[R - 1]   # G_j = d0_j + 𝒯_jᵀ G_{j+1}, G_R = 0
            for j in range(R - 2, r, -1):
                G = _affine(later_T[j - r - 1].transpose(-1, -2), G, d0s[j])
            G_seq = d0.new_zeros((view.num_local, H, 2 * K, V))
            G_seq[vi.out_rows] = G
            Gend = G_seq
    # (3) The gradient arriving at every group's end (the tree top down); the caller runs the
    # one full reverse pass with it: every per-chunk cotangent as the serial pass makes it.
    if split:
        if Gend is None:
            Gend = cot[3].new_zeros((view.num_local, H, 2 * K, V))
        Gend = tree_down_grads(Ts, Ds, plan, Gend.to(Ds.dtype), backend)
    if Gend is not None:
        dSg, dMg = dSg + Gend[:, :, :K], dMg + Gend[:, :, K:]
    return dSg.contiguous(), dMg.contiguous()


def _local_init_grads(dS_g, dM_g, plan, vi, split):
    """The gradient of the local initial pairs from the groups' (first groups of each
    sequence; zero on the rows of carried-in sequences, whose S_init rows were not used)."""
    dS_i, dM_i = (dS_g[plan.first_idx], dM_g[plan.first_idx]) if split else (dS_g, dM_g)
    if vi.has_in:
        dS_i, dM_i = dS_i.index_fill(0, vi.in_rows, 0), dM_i.index_fill(0, vi.in_rows, 0)
    return dS_i, dM_i


class CPStatePass(torch.autograd.Function):
    """Drop-in for mdn.chunk.StatePass (same inputs and outputs) across a CP group.

    S_init, M_init [num_local, H, K, V]: initial pairs of the sequences that start on this rank;
    rows of carried-in sequences are replaced by the carried pair (and get zero gradient).
    Returns W, S0s, M0s and the local final pairs [num_local, H, K, V]."""

    @staticmethod
    def forward(ctx, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, backend,
                allow_tf32, view, group, mode, group_chunks):
        K, V, dt = Y.shape[-1], U.shape[-1], U.dtype
        if backend == "triton":  # the operand precision of mdn.chunk.StatePass, for the same numbers
            from mdn_kernels.mdn.state_pass import fits_shared_memory
            low = torch.bfloat16 if allow_tf32 else U.dtype
            if fits_shared_memory(K, low):
                U, Y, Z, Kg, Km = (t.to(low) for t in (U, Y, Z, Kg, Km))
            else:
                backend = "torch"
        args = [t.contiguous() for t in (U, Y, Z, Kg, Km, a_end, g_end, u_end)]
        S_init, M_init = S_init.contiguous(), M_init.contiguous()
        r, R = view.rank, view.world
        ctx.layout, ctx.backend, ctx.allow_tf32 = layout, backend, allow_tf32
        ctx.view, ctx.group, ctx.mode = view, group, mode
        ctx.compute_dtype = dt if dt == torch.float64 else torch.float32
        later_T = Ts = None   # the allgather mode's kept 𝒯 parts (see below)
        with torch.no_grad():
            if mode == "allgather":
                plan, vi, split, Xg, later_T, Ts = _entering_pairs(
                    args, S_init, M_init, layout, backend, allow_tf32, view, group, group_chunks)
                ctx.plan, ctx.vi = plan, vi
                W, S0s, M0s, Sg, Mg = _fwd(args, Xg[:, :, :K].contiguous(), Xg[:, :, K:].contiguous(),
                                           plan.layout, backend, allow_tf32)
                S, M = (Sg[plan.last_idx], Mg[plan.last_idx]) if split else (Sg, Mg)
            else:  # ring: wait for the previous rank, run the ordinary pass, hand on
                P, H = view.num_slots, Y.shape[1]
                X = S_init.new_zeros(P, H, 2 * K, V)
                if r > 0:
                    dist.recv(X, group_src=r - 1, group=group)
                S_in, M_in = _put_carried(S_init, M_init, view, X)
                W, S0s, M0s, S, M = _fwd(args, S_in, M_in, layout, backend, allow_tf32)
                if r < R - 1:
                    dist.send(_take(S, M, view.out_seq).contiguous(), group_dst=r + 1, group=group)
        # Every tensor the backward needs goes through save_for_backward, none on ctx: under
        # activation recompute (non-reentrant checkpoint) only saved tensors are dropped after
        # the forward and rebuilt, a tensor on ctx would stay alive for every layer.
        ctx.save_for_backward(*args[1:], W, S0s, M0s, later_T, Ts)
        return W, S0s, M0s, S, M

    @staticmethod
    def backward(ctx, dW, dS0s, dM0s, dS_fin, dM_fin):
        Y, Z, Kg, Km, a_end, g_end, u_end, W, S0s, M0s, later_T, Ts = ctx.saved_tensors
        saved = (Y, Z, Kg, Km, a_end, g_end, u_end)
        view, group = ctx.view, ctx.group
        r, R = view.rank, view.world
        K = Y.shape[-1]
        cot = [t.contiguous() for t in (dW, dS0s, dM0s, dS_fin, dM_fin)]
        P, H, V = view.num_slots, Y.shape[1], dW.shape[-1]
        if ctx.mode == "allgather":
            plan, vi = ctx.plan, ctx.vi
            dSg, dMg = _end_grads(saved, cot, plan, vi, view, group, later_T, Ts, ctx.backend,
                                  ctx.allow_tf32)
            dWt, dS_end, dM_end, dS_g, dM_g, dgates = _bwd(
                saved, cot[:3] + [dSg, dMg], S0s, M0s, plan.layout, ctx.backend, ctx.allow_tf32)
            dS_i, dM_i = _local_init_grads(dS_g, dM_g, plan, vi, plan.num_groups > view.num_local)
        else:  # ring
            G = cot[3].new_zeros(P, H, 2 * K, V)  # state cotangents: fp32 (W may be bf16)
            if r < R - 1:
                dist.recv(G, group_src=r + 1, group=group)
            dS_f, dM_f = cot[3].clone(), cot[4].clone()
            for p, i in enumerate(view.out_seq):
                dS_f[i] += G[p, :, :K]
                dM_f[i] += G[p, :, K:]
            dWt, dS_end, dM_end, dS_i, dM_i, dgates = _bwd(
                saved, cot[:3] + [dS_f, dM_f], S0s, M0s, ctx.layout, ctx.backend, ctx.allow_tf32)
            if r > 0:
                dist.send(_take(dS_i, dM_i, view.in_seq).contiguous(), group_dst=r - 1, group=group)
            dS_i, dM_i = dS_i.clone(), dM_i.clone()
            for i in view.in_seq:  # carried-in rows of S_init / M_init were not used
                if i >= 0:
                    dS_i[i] = 0
                    dM_i[i] = 0
        # Y, Z, Kg, Km may have been saved in bf16: gradients in the compute dtype.
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates, ctx.compute_dtype)
        return (*grads, dS_i, dM_i) + (None,) * 9


def compose_apply(TB: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """[𝒯 | ℬ] applied to X: 𝒯 X + ℬ (per slot and head; one batched product with the add)."""
    twoK = TB.shape[-2]
    return _affine(TB[..., :twoK], X, TB[..., twoK:])


def lean_segment_chunks(chunk_size: int) -> int:
    """MDN_CP_LEAN_SEGMENT_TOKENS (with MDN_CP_LEAN=1): the lean node runs its state pass and
    output in segments of whole groups of about this many tokens (at least one group each), one
    after another, so its per-chunk tensors (the pairs, W, their gradients) exist for one
    segment at a time. 0 (the default): all groups at once."""
    env = os.environ.get("MDN_CP_LEAN_SEGMENT_TOKENS", "0")
    if not env.isdigit():
        raise ValueError(f"MDN_CP_LEAN_SEGMENT_TOKENS must be a non-negative integer, got {env!r}")
    return int(env) // chunk_size


def _segments(plan, seg_chunks: int) -> list:
    """[(g0, g1, c0, c1, layout)]: consecutive groups [g0, g1) covering chunks [c0, c1), at most
    seg_chunks chunks unless one group is longer, and the ChunkLayout of those groups over the
    sliced chunk tensors. Built once per plan (one host copy of the group starts). seg_chunks 0:
    one segment of every group and chunk (plan.layout itself; no host copy)."""
    if not seg_chunks:
        return [(0, plan.num_groups, 0, plan.layout.num_chunks, plan.layout)]
    cache = plan.__dict__.setdefault("_segments", {})
    segs = cache.get(seg_chunks)
    if segs is None:
        starts, lens = plan.g_start.tolist(), plan.g_len.tolist()
        segs, g0 = [], 0
        while g0 < len(starts):
            g1, n = g0 + 1, lens[g0]
            while g1 < len(starts) and n + lens[g1] <= seg_chunks:
                n, g1 = n + lens[g1], g1 + 1
            c0, c1 = starts[g0], starts[g1 - 1] + lens[g1 - 1]
            segs.append((g0, g1, c0, c1, plan.layout.sliced(g0, g1, c0, c1)))
            g0 = g1
        cache[seg_chunks] = segs
    return segs


def _segmented_backward(ctx, loc, sp, S_in, M_in, cs, cl, later_T, Ts, do, dS_fin, dM_fin, segs,
                        norms=None):
    """CPStateOutput's backward one segment of groups at a time (lean_segment_chunks): the same
    steps and kernels as the unsegmented backward, on slices of the chunk tensors. Pass 1 (where
    step (1) is needed) recomputes each segment's pairs, runs the output's backward (its chunk
    gradients kept) and the reverse pass that only returns the groups' d0; then the tree and
    the all-gather (_end_grads) give the gradient arriving at every group's end; pass 2
    recomputes each segment again and runs the full reverse pass with it. Costs a second
    recompute of the state pass and of the output's backward; every per-chunk pair-sized
    tensor lives for one segment."""
    from mdn_kernels.mdn.chunk_local_fused import output_backward
    from mdn_kernels.mdn.state_pass import state_pass_bwd_triton, state_pass_fwd_triton
    plan, vi, view, tf32 = ctx.plan, ctx.vi, ctx.view, ctx.allow_tf32
    ops = sp[1:]   # Y, Z, Kg, Km, a_end, g_end, u_end
    K, H, V = ops[0].shape[-1], ops[0].shape[1], sp[0].shape[-1]
    NG = plan.num_groups
    split = NG > view.num_local
    need_d0 = split or (view.rank > 0 and vi.has_in)

    def pairs_of(seg):
        g0, g1, c0, c1, lay = seg
        if ctx.save_w:   # sp[0] is the forward's W: the pairs alone
            _, S0s, M0s, _, _ = state_pass_fwd_triton(None, *(t[c0:c1] for t in ops), S_in[g0:g1],
                                                      M_in[g0:g1], lay, tf32, W=sp[0][c0:c1])
            return sp[0][c0:c1], S0s, M0s
        W, S0s, M0s, _, _ = state_pass_fwd_triton(*(t[c0:c1] for t in sp), S_in[g0:g1],
                                                  M_in[g0:g1], lay, tf32)
        return W, S0s, M0s

    def out_grads(seg, W, S0s, M0s):
        c0, c1 = seg[2], seg[3]
        if norms is None:
            qk, seg_norms = (t[c0:c1] for t in loc[:2]), None
        else:   # the raw q, k whole (cs holds absolute first tokens), the scales sliced
            qk, seg_norms = loc[:2], tuple(t[c0:c1] for t in norms)
        return output_backward(*qk, *(t[c0:c1] for t in loc[2:]), W, S0s, M0s, cs[c0:c1],
                               cl[c0:c1], do, ctx.scale, ctx.mm_dtype, norms=seg_norms)

    # dqc .. dgam (dqc, dkc in the chunks' shape and fp32 also where loc holds the raw q, k)
    local = [loc[2].new_empty(loc[5].shape[:3] + (K,)) for _ in range(2)]
    local += [torch.empty_like(t) for t in loc[2:]]
    d0g = None
    if need_d0:
        if split:
            own_S = dS_fin.new_zeros((NG, H, K, V)).index_put((plan.last_idx,), dS_fin)
            own_M = dM_fin.new_zeros((NG, H, K, V)).index_put((plan.last_idx,), dM_fin)
        else:
            own_S, own_M = dS_fin, dM_fin
        d0g = dS_fin.new_empty((NG, H, 2 * K, V))
        for seg in segs:
            g0, g1, c0, c1, lay = seg
            W, S0s, M0s = pairs_of(seg)
            g = out_grads(seg, W, S0s, M0s)
            del W, S0s, M0s
            for full, part in zip(local, g[:6]):
                full[c0:c1] = part
            dS, dM = state_pass_bwd_triton(*(t[c0:c1] for t in ops), *g[6:],
                                           own_S[g0:g1].contiguous(), own_M[g0:g1].contiguous(),
                                           None, None, lay, tf32, init_only=True)
            d0g[g0:g1] = torch.cat([dS, dM], dim=-2)
            del g
    dSg, dMg = _end_grads(ops, [None, None, None, dS_fin, dM_fin], plan, vi, view, ctx.group,
                          later_T, Ts, "triton", tf32, d0g=d0g)
    in_dt = ctx.in_dtypes
    grads = [torch.empty(sp[i].shape, dtype=in_dt[i], device=sp[i].device) for i in range(5)]
    grads += [torch.empty(sp[i].shape, dtype=torch.float32, device=sp[i].device) for i in (5, 6, 7)]
    dS_g, dM_g = dS_fin.new_empty((NG, H, K, V)), dM_fin.new_empty((NG, H, K, V))
    for seg in segs:
        g0, g1, c0, c1, lay = seg
        W, S0s, M0s = pairs_of(seg)
        g = out_grads(seg, W, S0s, M0s)
        if not need_d0:
            for full, part in zip(local, g[:6]):
                full[c0:c1] = part
        dW, dS0s, dM0s = g[6:]
        del g
        dWt, dS_end, dM_end, dSi, dMi, dgates = state_pass_bwd_triton(
            *(t[c0:c1] for t in ops), dW, dS0s, dM0s, dSg[g0:g1], dMg[g0:g1], S0s, M0s, lay, tf32,
            dWt_out=dW, end_over_pair_grads=end_over_pair_grads())
        del dS0s, dM0s
        dS_g[g0:g1], dM_g[g0:g1] = dSi, dMi
        part = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates, torch.float32)
        for full, p in zip(grads, part):
            full[c0:c1] = p
        del W, S0s, M0s, dWt, dS_end, dM_end, part
    dS_i, dM_i = _local_init_grads(dS_g, dM_g, plan, vi, split)
    return local, grads, dS_i, dM_i


class CPStateOutput(torch.autograd.Function):
    """The lean node (mdn.chunk.StateOutput) across a CP group, all-gather mode: the CP state pass
    (the pairs entering every group, as CPStatePass) and the fused output kernel in one node that
    keeps no per-chunk pair. Saved: the state pass's operands (W in U's place: MDN_SAVE_W, as
    mdn.chunk.StateOutput), the output's chunk quantities (the raw q, k and the l2norm scales in
    q̂, k̂'s place where `qk_raw` is given: MDN_RAW_QK) and the small pairs entering the groups
    [NG, H, 2K, V]; the backward re-runs the groups' state pass from those (bitwise the same S0s,
    M0s, and W where it is re-made), then the output's backward, the CP backward steps (1)–(3) and
    the one full reverse pass. Results equal CPStatePass + LocalOutput's; the pairs' memory between
    forward and backward is gone (8 KiB per token and head at K = 256, V = 512, C = 64 in bf16).

    Opt-in (MDN_CP_LEAN=1, mdn_kernels.cp.api; parallel.cp_lean in the trainer): on GPUs since
    session 10, in segments, against float64 at K = 128 and 256 and in 1.3B runs up to 256K
    tokens per rank (BENCHMARKS.md). Triton backend, fused
    chunk-local kernels, S_init / M_init always given (zeros where no initial state)."""

    @staticmethod
    def forward(ctx, qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init,
                layout, scale: float, mm_dtype, out_shape: tuple, out_dtype: torch.dtype,
                allow_tf32: bool, qk_raw, view, group, group_chunks):
        from mdn_kernels.mdn.chunk import lean_operands, lean_save_ctx, raw_qk_saved, save_w
        from mdn_kernels.mdn.chunk_local_fused import chunk_bounds, output_forward
        from mdn_kernels.mdn.state_pass import state_pass_fwd_triton
        K = Y.shape[-1]
        loc, sp = lean_operands(qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end,
                                allow_tf32)
        cs, cl = chunk_bounds(layout.dest, layout.num_chunks, layout.chunk_size)
        seg_chunks = lean_segment_chunks(layout.chunk_size)
        with torch.no_grad():
            plan, vi, split, Xg, later_T, Ts = _entering_pairs(
                sp, S_init.contiguous(), M_init.contiguous(), layout, "triton", allow_tf32, view,
                group, group_chunks)
            S_in, M_in = Xg[:, :, :K].contiguous(), Xg[:, :, K:].contiguous()
            # one segment of every group unless segmented (slices of the whole are views)
            o = torch.empty(out_shape, dtype=out_dtype, device=qc.device)
            Sg, Mg = torch.empty_like(S_in), torch.empty_like(M_in)
            # MDN_SAVE_W: every segment's W into one buffer, saved in U's place (as StateOutput)
            ctx.save_w = save_w()
            W_all = (torch.empty(sp[0].shape, dtype=sp[1].dtype, device=qc.device) if ctx.save_w
                     else None)
            for g0, g1, c0, c1, lay in _segments(plan, seg_chunks):
                W, S0s, M0s, Sg[g0:g1], Mg[g0:g1] = state_pass_fwd_triton(
                    *(t[c0:c1] for t in sp), S_in[g0:g1], M_in[g0:g1], lay, allow_tf32,
                    w_out=None if W_all is None else W_all[c0:c1])
                output_forward(*(t[c0:c1] for t in loc), W, S0s, M0s, cs[c0:c1], cl[c0:c1],
                               scale, mm_dtype, out_shape, out_dtype, out=o)
                del W, S0s, M0s
            S, M = (Sg[plan.last_idx], Mg[plan.last_idx]) if split else (Sg, Mg)
            if W_all is not None:
                sp[0] = W_all
        loc, norms = raw_qk_saved(loc, qk_raw)   # the raw q, k and the scales, where given
        # every tensor through save_for_backward (activation recompute drops only those)
        ctx.save_for_backward(*loc, *sp, S_in, M_in, cs, cl, later_T, Ts, *norms)
        ctx.plan, ctx.vi, ctx.view, ctx.group = plan, vi, view, group
        ctx.segs = _segments(plan, seg_chunks) if seg_chunks else None
        lean_save_ctx(ctx, scale, mm_dtype, out_shape, allow_tf32,
                      (t.dtype for t in (U, Y, Z, Kg, Km)), S.shape)
        return o, S, M

    @staticmethod
    def backward(ctx, do, dS_fin, dM_fin):
        from mdn_kernels.mdn.chunk import lean_cotangents, lean_saved
        from mdn_kernels.mdn.chunk_local_fused import output_backward
        from mdn_kernels.mdn.state_pass import state_pass_bwd_triton, state_pass_fwd_triton
        loc, sp, (S_in, M_in, cs, cl, later_T, Ts, rq, rk) = lean_saved(ctx)
        norms = None if rq is None else (rq, rk)   # loc[:2] are the raw q, k
        plan, vi, view, tf32 = ctx.plan, ctx.vi, ctx.view, ctx.allow_tf32
        # the CP backward always reads the final pairs' cotangents
        do, dS_fin, dM_fin = lean_cotangents(ctx, do, dS_fin, dM_fin, loc[2], both_final=True)
        if ctx.segs is not None:
            local, grads, dS_i, dM_i = _segmented_backward(
                ctx, loc, sp, S_in, M_in, cs, cl, later_T, Ts, do, dS_fin, dM_fin, ctx.segs,
                norms)
            return (*local, *grads, dS_i, dM_i) + (None,) * 10
        if ctx.save_w:   # the pairs alone, from the saved W
            W, S0s, M0s, _, _ = state_pass_fwd_triton(None, *sp[1:], S_in, M_in, plan.layout,
                                                      tf32, W=sp[0])
        else:
            W, S0s, M0s, _, _ = state_pass_fwd_triton(*sp, S_in, M_in, plan.layout, tf32)
        dqc, dkc, det, dla, dg0, dgam, dW, dS0s, dM0s = output_backward(
            *loc, W, S0s, M0s, cs, cl, do, ctx.scale, ctx.mm_dtype, norms=norms)
        ops = sp[1:]   # Y, Z, Kg, Km, a_end, g_end, u_end
        dSg, dMg = _end_grads(ops, [dW, dS0s, dM0s, dS_fin, dM_fin], plan, vi, view, ctx.group,
                              later_T, Ts, "triton", tf32)
        dWt, dS_end, dM_end, dS_g, dM_g, dgates = state_pass_bwd_triton(
            *ops, dW, dS0s, dM0s, dSg, dMg, S0s, M0s, plan.layout, tf32, dWt_out=dW,
            end_over_pair_grads=end_over_pair_grads())
        del dS0s, dM0s
        dS_i, dM_i = _local_init_grads(dS_g, dM_g, plan, vi, plan.num_groups > view.num_local)
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates, torch.float32)
        dsp = [g.to(dt) for g, dt in zip(grads[:5], ctx.in_dtypes)] + list(grads[5:])
        return (dqc, dkc, det, dla, dg0, dgam, *dsp, dS_i, dM_i) + (None,) * 10
