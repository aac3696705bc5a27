"""The state pass over chunks when the sequence is split over a context-parallel group.

"allgather" (default), forward on rank r of R: the group maps [𝒯_g | ℬ_g] of this rank's
chunks (transition.py, all groups in parallel) → a tree gives the rank's [𝒯_r | ℬ_r] → one
all-gather → X_r = fold of ranks 0..r−1 (X ← 𝒯_j X + ℬ_j from X = 0; a sequence's initial
state is inside ℬ of the rank where it starts) → a scan over groups gives the pair entering
every group → the ordinary state-pass kernel runs all groups at once (the groups are its
"sequences"), producing the same per-chunk W, S0s, M0s as the serial pass.

Backward. The fold only computes a sequential composition, so nothing differentiates through 𝒯.
Let G_r be the gradient arriving at rank r's carried-in pair. The local reverse pass is linear in
the gradient arriving at the carried-out pair, so G_r = d0_r + 𝒯_rᵀ G_{r+1} (G_R = 0), where
d0_r is what the rank's own cotangents send to its carried-in pair when nothing arrives from
later ranks. Within the rank the same holds per group. So: (1) every group's reverse pass with
nothing arriving at its end (all groups at once) gives d0_g; a reverse scan with 𝒯_gᵀ gives d0_r;
(2) one all-gather of d0 (the 𝒯_j, j > r, are kept from the forward all-gather) and the fold of
ranks R−1..r+1 give G_{r+1}; (3) the reverse scan again, now from G_{r+1}, gives the gradient
arriving at every group's end, and every group's reverse pass runs again with it, which yields
every per-chunk cotangent exactly as the serial reverse pass would.

Why two reverse passes and not (1) plus a correction pass with only the arriving gradients:
the cost is the same (one group-parallel pass each), and this way the per-chunk cotangents exist
once and the chunk-parallel gradient work (state_pass_grads, autograd of chunk_prepare /
chunk_output) runs once. Step (3) is skipped when nothing arrives anywhere (last rank, one group
per sequence).

"ring" mode: no 𝒯 at all. Rank r waits for X_r from rank r−1, runs the ordinary (serial) pass
and sends its carried-out pair to rank r+1; backward mirrors it (G_{r+1} from r+1, one reverse
pass, G_r to r−1). Exact, no extra FLOPs, but the ranks' state passes run one after another.

Cost of "allgather" against the op at CP = 1 (per head, n local tokens, K = 128, V = 256): the
group recurrences (2K + V columns) are 2 state passes' FLOPs; the forward pass and both reverse
passes have the FLOPs of the serial ones but run G groups in parallel instead of one chain;
tree and scans are small (transition.py). Communication: forward all-gather of
P·H·2K·(2K + V) floats per rank, backward P·H·2K·V, independent of n.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mdn_kernels.mdn.chunk_torch import (
    state_pass_bwd_torch,
    state_pass_fwd_torch,
    state_pass_grads,
)

from .layout import host_chunk_offsets
from .transition import (
    default_group_chunks,
    group_end_grads,
    group_initial_pairs,
    group_maps,
    plan_groups,
    rank_map_from_groups,
)


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


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
        with torch.no_grad():
            if mode == "allgather":
                if group_chunks is None:
                    group_chunks = default_group_chunks(K, Y.shape[2])
                plan = _cached_plan(layout, view, group_chunks)
                maps = group_maps(args, plan, backend=backend, allow_tf32=allow_tf32)
                if r < R - 1:
                    TB = rank_map_from_groups(maps, plan, view, S_init, M_init)
                else:  # nobody reads the last rank's map (the forward folds j < r; backward
                    #     needs 𝒯_j only for j < R − 1, since G_R = 0): send zeros
                    TB = S_init.new_zeros(view.num_slots, Y.shape[1], 2 * K, 2 * K + V)
                gathered = _all_gather(TB, group) if R > 1 else [TB]
                X = TB.new_zeros(TB.shape[:-1] + (TB.shape[-1] - 2 * K,))
                for j in range(r):
                    X = compose_apply(gathered[j], X)
                # Backward needs 𝒯_j for r < j < R − 1, and every group's 𝒯_g: keep copies so
                # the wide maps can be freed.
                ctx.later_T = [m[..., :2 * K].clone() for m in gathered[r + 1:R - 1]]
                ctx.Tg = maps[..., :2 * K].clone()
                ctx.plan = plan
                # Every group's initial pair, then all groups' state passes in parallel.
                S_in, M_in = _put_carried(S_init, M_init, view, X)
                Xg = group_initial_pairs(maps, plan, _pairs(S_in, M_in))
                del maps, gathered
                W, S0s, M0s, Sg, Mg = _fwd(args, Xg[:, :, :K].contiguous(), Xg[:, :, K:].contiguous(),
                                           plan.layout, backend, allow_tf32)
                S, M = Sg[plan.last_idx], Mg[plan.last_idx]
            else:  # ring: wait for the previous rank, run the ordinary pass, hand on
                P, H = view.num_slots, Y.shape[1]
                X = S_init.new_zeros(P, H, 2 * K, V)
                if r > 0:
                    dist.recv(X, group_src=r - 1, group=group)
                S_in, M_in = _put_carried(S_init, M_init, view, X)
                W, S0s, M0s, S, M = _fwd(args, S_in, M_in, layout, backend, allow_tf32)
                if r < R - 1:
                    dist.send(_take(S, M, view.out_seq).contiguous(), group_dst=r + 1, group=group)
        ctx.save_for_backward(*args[1:], W, S0s, M0s)
        return W, S0s, M0s, S, M

    @staticmethod
    def backward(ctx, dW, dS0s, dM0s, dS_fin, dM_fin):
        Y, Z, Kg, Km, a_end, g_end, u_end, W, S0s, M0s = ctx.saved_tensors
        saved = (Y, Z, Kg, Km, a_end, g_end, u_end)
        view, group = ctx.view, ctx.group
        r, R = view.rank, view.world
        K = Y.shape[-1]
        cot = [t.contiguous() for t in (dW, dS0s, dM0s, dS_fin, dM_fin)]
        P, H, V = view.num_slots, Y.shape[1], dW.shape[-1]
        if ctx.mode == "allgather":
            plan, Tg = ctx.plan, ctx.Tg
            last, first = plan.last_idx, plan.first_idx
            # Each group's reverse pass with nothing arriving at its end except the sequence's
            # own final-state cotangent (last groups): d0_g, all groups in parallel.
            dSg = cot[3].new_zeros((plan.num_groups, H, K, V)).index_put((last,), cot[3])
            dMg = cot[4].new_zeros((plan.num_groups, H, K, V)).index_put((last,), cot[4])
            res = _bwd(saved, cot[:3] + [dSg, dMg], S0s, M0s, plan.layout, ctx.backend,
                       ctx.allow_tf32)
            d0g = _pairs(res[3], res[4])
            # What the rank's tokens send to its carried-in pair(s) with nothing from later ranks.
            _, d_seq = group_end_grads(Tg, plan, d0g, d0g.new_zeros((view.num_local, H, 2 * K, V)))
            d0 = _take(d_seq[:, :, :K], d_seq[:, :, K:], view.in_seq)
            d0s = _all_gather(d0, group) if R > 1 else [d0]
            G = d0.new_zeros(P, H, 2 * K, V)
            for j in range(R - 1, r, -1):  # G_j = d0_j + 𝒯_jᵀ G_{j+1}, G_R = 0
                G = d0s[j] if j == R - 1 else d0s[j] + ctx.later_T[j - r - 1].transpose(-1, -2) @ G
            # The gradient arriving at every group's end, then every group's reverse pass again
            # with it (skipped when nothing arrives anywhere: one group per sequence, last rank).
            G_seq = d0.new_zeros((view.num_local, H, 2 * K, V))
            if r < R - 1:
                for p, i in enumerate(view.out_seq):
                    G_seq[i] = G[p]
            if r < R - 1 or plan.num_groups > view.num_local:
                # Drop the first pass's per-chunk cotangents (as large as W and the pairs) before
                # the second pass makes them again: only d0g is needed from it.
                res = None
                Gend, _ = group_end_grads(Tg, plan, d0g, G_seq)
                res = _bwd(saved, cot[:3] + [dSg + Gend[:, :, :K], dMg + Gend[:, :, K:]],
                           S0s, M0s, plan.layout, ctx.backend, ctx.allow_tf32)
            dWt, dS_end, dM_end, dS_g, dM_g, dgates = res
            dS_i, dM_i = dS_g[first], dM_g[first]
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
        # Y, Z, Kg, Km may have been saved in bf16: gradients in the compute dtype.
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates, ctx.compute_dtype)
        dS_i, dM_i = dS_i.clone(), dM_i.clone()
        for i in view.in_seq:  # carried-in rows of S_init / M_init were not used
            if i >= 0:
                dS_i[i] = 0
                dM_i[i] = 0
        return (*grads, dS_i, dM_i) + (None,) * 9


def compose_apply(TB: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """[𝒯 | ℬ] applied to X: 𝒯 X + ℬ (per slot and head)."""
    twoK = TB.shape[-2]
    return TB[..., :twoK] @ X + TB[..., twoK:]
