"""The state pass over chunks when the sequence is split over a context-parallel group.

Forward, rank r of R ("allgather"): this rank's [𝒯_r | ℬ_r] (transition.rank_map) → one
all-gather → X_r = fold of ranks 0..r−1 (X ← 𝒯_j X + ℬ_j from X = 0; a sequence's initial state
is inside ℬ of the rank where it starts) → the ordinary local state pass from X_r.

Backward. The fold only computes a sequential composition, so nothing differentiates through 𝒯.
Let G_r be the gradient arriving at rank r's carried-in pair. The local reverse pass is linear in
the gradient at the carried-out pair, so G_r = d0_r + 𝒯_rᵀ G_{r+1} (G_R = 0), where d0_r is
what the rank's own outputs send to its carried-in pair when nothing arrives from later ranks.
So: reverse pass with the incoming gradients (d0_r) → one all-gather of d0 (the 𝒯_j, j > r, are
kept from the forward all-gather) → G_{r+1} = fold of ranks R−1..r+1 → the reverse pass again
with G_{r+1} added at the carried-out pair, which gives every local gradient.

Why run the reverse pass twice instead of a second pass with only G_{r+1} and adding: the cost
is the same (one sequential reverse pass), and this way the per-chunk cotangents exist once and
the chunk-parallel gradient work (state_pass_grads, autograd of chunk_prepare / chunk_output)
runs once. The last rank never receives anything and runs it once.

"ring" mode: no 𝒯 at all. Rank r waits for X_r from rank r−1, runs its state pass and sends its
carried-out pair to rank r+1; backward mirrors it (G_{r+1} from r+1, one reverse pass, G_r to
r−1). Exact, no extra FLOPs, but the ranks' state passes run one after another.

Extra work of "allgather" against the op at CP = 1 (per head, n local tokens, fp32):
forward, the group recurrences 8·n·K·(2K+V) plus the tree (transition.py); backward, one more
reverse state pass, 8·n·K·V. Communication: forward all-gather of P·H·2K·(2K+V) floats per rank,
backward P·H·2K·V, independent of n.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mdn_kernels.mdn.chunk_torch import (
    state_pass_bwd_torch,
    state_pass_fwd_torch,
    state_pass_grads,
)

from .transition import rank_map


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _fwd(args, S_init, M_init, layout, backend, allow_tf32):
    if backend == "triton":
        from mdn_kernels.mdn.state_pass import state_pass_fwd_triton
        return state_pass_fwd_triton(*args, S_init, M_init, layout, allow_tf32)
    return state_pass_fwd_torch(*args, S_init, M_init, layout)


def _bwd(saved, cot, layout, backend, allow_tf32):
    if backend == "triton":
        from mdn_kernels.mdn.state_pass import state_pass_bwd_triton
        return state_pass_bwd_triton(*saved, *cot, layout, allow_tf32)
    return state_pass_bwd_torch(*saved, *cot, layout)


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


class CPStatePass(torch.autograd.Function):
    """Drop-in for mdn.chunk.StatePass (same inputs and outputs) across a CP group.

    S_init, M_init [num_local, H, K, V]: initial pairs of the sequences that start on this rank;
    rows of carried-in sequences are replaced by the carried pair (and get zero gradient).
    Returns W, S0s, M0s and the local final pairs [num_local, H, K, V]."""

    @staticmethod
    def forward(ctx, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, backend,
                allow_tf32, view, group, mode, group_chunks):
        args = [t.contiguous() for t in (U, Y, Z, Kg, Km, a_end, g_end, u_end)]
        S_init, M_init = S_init.contiguous(), M_init.contiguous()
        r, R = view.rank, view.world
        K = Y.shape[-1]
        with torch.no_grad():
            if mode == "allgather":
                if r < R - 1:
                    TB = rank_map(args, S_init, M_init, layout, view, backend=backend,
                                  allow_tf32=allow_tf32, group_chunks=group_chunks)
                else:  # nobody reads the last rank's map (forward folds j < r, backward j ≤ R−2
                    #     needs 𝒯_{j+1}ᵀ G_{j+2} only where G_{j+2} ≠ 0): send zeros
                    TB = U.new_zeros(view.num_slots, Y.shape[1], 2 * K, 2 * K + U.shape[-1])
                maps = _all_gather(TB, group) if R > 1 else [TB]
                X = TB.new_zeros(TB.shape[:-1] + (TB.shape[-1] - 2 * K,))
                for j in range(r):
                    X = compose_apply(maps[j], X)
                # Backward needs 𝒯_j for r < j < R − 1 (G_R = 0 makes 𝒯_{R−1} unused); keep
                # copies so the gathered maps can be freed.
                ctx.later_T = [m[..., :2 * K].clone() for m in maps[r + 1:R - 1]]
            else:  # ring
                P, H, V = view.num_slots, Y.shape[1], U.shape[-1]
                X = U.new_zeros(P, H, 2 * K, V)
                if r > 0:
                    dist.recv(X, group_src=r - 1, group=group)
            S_in, M_in = _put_carried(S_init, M_init, view, X)
            W, S0s, M0s, S, M = _fwd(args, S_in, M_in, layout, backend, allow_tf32)
            if mode == "ring" and r < R - 1:
                dist.send(_take(S, M, view.out_seq).contiguous(), group_dst=r + 1, group=group)
        ctx.save_for_backward(*args[1:], W, S0s, M0s)
        ctx.layout, ctx.backend, ctx.allow_tf32 = layout, backend, allow_tf32
        ctx.view, ctx.group, ctx.mode = view, group, mode
        return W, S0s, M0s, S, M

    @staticmethod
    def backward(ctx, dW, dS0s, dM0s, dS_fin, dM_fin):
        Y, Z, Kg, Km, a_end, g_end, u_end, W, S0s, M0s = ctx.saved_tensors
        saved = (Y, Z, Kg, Km, a_end, g_end, u_end)
        view, group, layout = ctx.view, ctx.group, ctx.layout
        r, R = view.rank, view.world
        K = Y.shape[-1]
        cot = [t.contiguous() for t in (dW, dS0s, dM0s, dS_fin, dM_fin)]
        P, H, V = view.num_slots, Y.shape[1], dW.shape[-1]
        if ctx.mode == "allgather":
            res = _bwd(saved, cot, layout, ctx.backend, ctx.allow_tf32)
            d0 = _take(res[3], res[4], view.in_seq)
            d0s = _all_gather(d0, group) if R > 1 else [d0]
            G = d0.new_zeros(P, H, 2 * K, V)
            for j in range(R - 1, r, -1):  # G_j = d0_j + 𝒯_jᵀ G_{j+1}, G_R = 0
                G = d0s[j] if j == R - 1 else d0s[j] + ctx.later_T[j - r - 1].transpose(-1, -2) @ G
            has_incoming = r < R - 1
        else:  # ring
            G = dW.new_zeros(P, H, 2 * K, V)
            has_incoming = r < R - 1
            if has_incoming:
                dist.recv(G, group_src=r + 1, group=group)
            res = None
        if res is None or has_incoming:
            dS_fin, dM_fin = cot[3].clone(), cot[4].clone()
            for p, i in enumerate(view.out_seq):
                dS_fin[i] += G[p, :, :K]
                dM_fin[i] += G[p, :, K:]
            res = _bwd(saved, cot[:3] + [dS_fin, dM_fin], layout, ctx.backend, ctx.allow_tf32)
        dWt, dS_end, dM_end, dS_i, dM_i = res
        if ctx.mode == "ring" and r > 0:
            dist.send(_take(dS_i, dM_i, view.in_seq).contiguous(), group_dst=r - 1, group=group)
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end)
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
