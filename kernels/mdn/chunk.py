"""Chunkwise MDN: the autograd function and the driver shared by the torch and Triton backends.

The chunk-parallel parts (chunk_torch.chunk_prepare / chunk_output) are batched tensor ops and
differentiate by autograd; the sequential pass over chunks is `StatePass`, whose forward and
backward run as Triton kernels (backend "triton") or as the torch loops that specify them.
Where the fused chunk-local kernels run without CP, `StateOutput` (state pass + output as one
node that recomputes the per-chunk pairs in its backward) is the default instead: see
recompute_pairs_mode.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .chunk_torch import (
    chunk_output,
    chunk_prepare,
    state_pass_bwd_torch,
    state_pass_fwd_torch,
    state_pass_grads,
)
from .layout import ChunkLayout, build_layout, from_chunks, to_chunks
from .naive import l2norm

LOG_FLOOR = -1e4


class StatePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout: ChunkLayout,
                backend: str, allow_tf32: bool):
        if backend == "triton":
            from .state_pass import fits_shared_memory
            # 16-bit model: bf16 operands for the products, as FLA's GDN kernels (state stays
            # fp32). fp32 operands at K > 128 exceed shared memory: those take the torch loop.
            low = torch.bfloat16 if allow_tf32 else U.dtype
            if fits_shared_memory(Y.shape[-1], low):
                U, Y, Z, Kg, Km = (t.to(low) for t in (U, Y, Z, Kg, Km))
            else:
                backend = "torch"
        args = [t.contiguous() for t in (U, Y, Z, Kg, Km, a_end, g_end, u_end)]
        S_init, M_init = S_init.contiguous(), M_init.contiguous()
        if backend == "triton":
            from .state_pass import state_pass_fwd_triton
            W, S0s, M0s, S, M = state_pass_fwd_triton(*args, S_init, M_init, layout, allow_tf32)
        else:
            with torch.no_grad():
                W, S0s, M0s, S, M = state_pass_fwd_torch(*args, S_init, M_init, layout)
        ctx.save_for_backward(*args[1:], W, S0s, M0s)
        ctx.layout, ctx.backend, ctx.allow_tf32 = layout, backend, allow_tf32
        ctx.compute_dtype = U.dtype if U.dtype == torch.float64 else torch.float32
        return W, S0s, M0s, S, M

    @staticmethod
    def backward(ctx, dW, dS0s, dM0s, dS_fin, dM_fin):
        Y, Z, Kg, Km, a_end, g_end, u_end, W, S0s, M0s = ctx.saved_tensors
        cot = [t.contiguous() for t in (dW, dS0s, dM0s, dS_fin, dM_fin)]
        if ctx.backend == "triton":
            from .state_pass import state_pass_bwd_triton
            dWt, dS_end, dM_end, dS_i, dM_i, dgates = state_pass_bwd_triton(
                Y, Z, Kg, Km, a_end, g_end, u_end, *cot, S0s, M0s, ctx.layout, ctx.allow_tf32)
        else:
            dWt, dS_end, dM_end, dS_i, dM_i = state_pass_bwd_torch(
                Y, Z, Kg, Km, a_end, g_end, u_end, *cot, ctx.layout)
            dgates = None
        # Y, Z, Kg, Km may have been saved in bf16: gradients in the compute dtype.
        grads = state_pass_grads(W, S0s, M0s, dWt, dS_end, dM_end, dgates, ctx.compute_dtype)
        return (*grads, dS_i, dM_i, None, None, None)


def lean_operands(qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end, allow_tf32: bool,
                  operands: bool = True):
    """The lean nodes' saved operands (StateOutput, mdn_kernels.cp's CPStateOutput): the
    output's chunk quantities `loc` and the state pass's `sp` (U, Y, Z, Kg, Km in the operand
    dtype: bf16 for 16-bit models; no-ops when already so), contiguous. operands False (the
    factored passes, state_kfac): Y, Z, Kg, Km are None in sp."""
    low = torch.bfloat16 if allow_tf32 else U.dtype
    sp = [t.to(low).contiguous() if t is U or operands else None for t in (U, Y, Z, Kg, Km)]
    sp += [t.contiguous() for t in (a_end, g_end, u_end)]
    return [t.contiguous() for t in (qc, kc, et, la, g0, gam)], sp


def raw_qk_saved(loc: list, qk_raw):
    """What a node saves for q̂, k̂: `loc` (qc, kc, ...) with the raw q, k of `qk_raw` = (q, k,
    rq, rk) in qc, kc's place and the scales (rq, rk) to save after the node's own tensors;
    without qk_raw, loc as it is and (None, None) (see raw_qk)."""
    if qk_raw is None:
        return loc, (None, None)
    return [*qk_raw[:2], *loc[2:]], tuple(qk_raw[2:])


def lean_save_ctx(ctx, scale, mm_dtype, out_shape, allow_tf32, in_dtypes, fin_shape):
    """What the lean nodes' backward reads besides the saved tensors."""
    ctx.allow_tf32, ctx.scale, ctx.mm_dtype, ctx.out_shape = allow_tf32, scale, mm_dtype, out_shape
    ctx.in_dtypes, ctx.fin_shape = list(in_dtypes), fin_shape
    # unused outputs' cotangents stay None (no [N, H, K, V] zeros for an unused final pair)
    ctx.set_materialize_grads(False)


def lean_saved(ctx):
    """The lean nodes' saved tensors as (loc, sp, the node's own rest), in lean_operands' order
    (the nodes save loc, sp, then their own)."""
    saved = list(ctx.saved_tensors)
    return saved[:6], saved[6:14], saved[14:]


def lean_cotangents(ctx, do, dS_fin, dM_fin, like: torch.Tensor, both_final: bool):
    """do (zeros when o is unused) and the final pair's cotangents: zeros for the one missing
    when the other is given, or both when `both_final` (else None, None when neither is)."""
    do = (torch.zeros(ctx.out_shape, dtype=like.dtype, device=like.device) if do is None
          else do.contiguous())
    if both_final or (dS_fin is None) != (dM_fin is None):
        zero = lambda: torch.zeros(ctx.fin_shape, dtype=torch.float32, device=like.device)  # noqa: E731
        dS_fin = zero() if dS_fin is None else dS_fin
        dM_fin = zero() if dM_fin is None else dM_fin
    if dS_fin is not None:
        dS_fin, dM_fin = dS_fin.contiguous(), dM_fin.contiguous()
    return do, dS_fin, dM_fin


class StateOutput(torch.autograd.Function):
    """StatePass (Triton) followed by the fused LocalOutput as one autograd node that keeps no
    per-chunk quantity of the state pass (the default, MDN_RECOMPUTE_PAIRS=1; 2 opt-in; see
    recompute_pairs_mode).

    Forward: W, S0s, M0s are made and used for o; S0s, M0s are dropped; saved are W (in U's place,
    save_w; else U), the state pass's other inputs (in the operand dtype) and the output's chunk
    quantities, with the raw q, k and the l2norm scales in q̂, k̂'s place (`qk_raw`, an extra
    last argument: raw_qk). Backward re-runs the state pass forward from W (only the pairs: no
    U, and two products fewer per chunk) or from U (the same kernel on the same operands); either
    way bitwise the same S0s, M0s. Then the output's and the state pass's backward, freeing every
    per-chunk [NC, H, K, V] tensor as soon as its last product is done, dWt written over dW,
    dS_end, dM_end over the output's pair cotangents (end_over_pair_grads; pair_grads_first for
    less), in segments of consecutive chunks where asked (bwd_segments: the pair-sized tensors
    for one segment at a time; the forward in segments too where a sequence is cut). Results
    are those of StatePass + LocalOutput exactly; peak memory and the memory kept between
    forward and backward drop.

    fuse_pair_grads (MDN_RECOMPUTE_PAIRS=2): the output's share of the pair cotangents
    (dS0s, dM0s [NC, H, K, V]) is made inside the state pass's backward kernel instead of being
    stored by the output's backward and read back: 2·NC·H·K·V fewer elements in memory, the
    same products and roundings (to float rounding of the product order: the tiles differ)."""

    @staticmethod
    def forward(ctx, qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init,
                layout: ChunkLayout, scale: float, mm_dtype, out_shape: tuple,
                out_dtype: torch.dtype, allow_tf32: bool, fuse_pair_grads: bool = False,
                qk_raw=None, factors=None):
        from .chunk_local_fused import chunk_bounds, output_forward
        from .state_pass import state_pass_fwd_triton
        # the factored passes' operands (state_kfac: LocalPrepare's k̂ and T in the operand
        # dtype, the row vectors fp32); Y, Z, Kg, Km are then its zero-stride stand-ins, neither
        # read nor saved
        kfac = None if factors is None else list(factors)
        loc, sp = lean_operands(qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end,
                                allow_tf32, operands=kfac is None)
        if S_init is not None:  # None: zero initial pair (not stored)
            S_init, M_init = S_init.contiguous(), M_init.contiguous()
        cs, cl = chunk_bounds(layout.dest, layout.num_chunks, layout.chunk_size)
        segs = [] if fuse_pair_grads else chunk_segments(layout, bwd_segments())
        bounds = (None, None)
        if not any(sg.head_cut for sg in segs):   # the backward alone runs in segments, if any
            W, S0s, M0s, S, M = state_pass_fwd_triton(*sp, S_init, M_init, layout, allow_tf32,
                                                      kfac=kfac)
            o = output_forward(*loc, W, S0s, M0s, cs, cl, scale, mm_dtype, out_shape, out_dtype)
            del S0s, M0s
        else:   # a sequence is cut: the forward in segments too, keeping the pairs at the cuts
            W, S, M, o, bounds = _forward_in_segments(loc, sp, S_init, M_init, cs, cl, segs,
                                                      allow_tf32, scale, mm_dtype, out_shape,
                                                      out_dtype, kfac)
        ctx.save_w = save_w()
        if ctx.save_w:  # W in U's place (same shape and dtype): U is freed with the forward
            sp[0] = W
        del W
        # the raw q, k and the l2norm scales in place of the fp32 chunks (raw_qk); mode 2's
        # fused state-pass backward reads the chunks
        loc, norms = raw_qk_saved(loc, None if fuse_pair_grads else qk_raw)
        # Every tensor through save_for_backward, none on ctx: under activation recompute
        # (non-reentrant checkpoint) saved tensors are dropped after the forward and rebuilt in
        # the backward, a tensor on ctx is not — U held on ctx stayed alive for every layer
        # (4 GiB of the 400M model at 64K tokens, session 4's peak breakdown on the H100).
        ctx.save_for_backward(*loc, *sp, S_init, M_init, cs, cl, *norms, *bounds, *(kfac or ()))
        ctx.layout, ctx.fuse_pair_grads, ctx.segs = layout, fuse_pair_grads, segs
        lean_save_ctx(ctx, scale, mm_dtype, out_shape, allow_tf32,
                      (t.dtype for t in (U, Y, Z, Kg, Km)), S.shape)
        return o, S, M

    @staticmethod
    def backward(ctx, do, dS_fin, dM_fin):
        loc, sp, rest = lean_saved(ctx)
        S_init, M_init, cs, cl, rq, rk, bS, bM = rest[:8]
        kfac = rest[8:] or None   # the factored passes' operands (state_kfac)
        norms = None if rq is None else (rq, rk)   # qc, kc are the raw q, k
        layout, segs = ctx.layout, ctx.segs
        do, dS_fin, dM_fin = lean_cotangents(ctx, do, dS_fin, dM_fin, loc[2], both_final=False)
        init_grad = S_init is not None and (ctx.needs_input_grad[14] or ctx.needs_input_grad[15])
        if len(segs) <= 1:
            g = _lean_backward(ctx, loc, sp, S_init, M_init, cs, cl, norms, do, dS_fin, dM_fin,
                               layout, init_grad, kfac=kfac)
        else:
            g = _lean_backward_in_segments(ctx, loc, sp, S_init, M_init, cs, cl, norms, do,
                                           dS_fin, dM_fin, segs, init_grad, (bS, bM), kfac=kfac)
        dsp = [t.to(dt) for t, dt in zip(g[6:11], ctx.in_dtypes)]
        return (*g[:6], *dsp, *g[11:], None, None, None, None, None, None, None, None, None)


# the op's backward segments where MDN_BWD_SEGMENTS is unset (train.op_backward_segments' default)
DEFAULT_BWD_SEGMENTS = 2


def bwd_segments() -> int:
    """MDN_BWD_SEGMENTS: StateOutput runs its backward on at most this many runs of consecutive
    chunks, one after another (chunk_segments): every per-chunk [NC, H, K, V] tensor of the
    backward (the recomputed pairs and their cotangents) exists for one segment at a time.
    Segments end at sequence boundaries where the sequences are short enough; a longer sequence
    (one long sequence, B = 1) is cut, and then the forward runs in the same segments too and
    keeps the fp32 pair at each cut (N·H·K·V·8 bytes per cut), from which the backward restarts
    the state pass. The state pass carries its fp32 state across a cut unchanged, so the results
    are those of one segment, bit for bit where the products take the same kernels. 1: no
    segments. The default, 2 (DEFAULT_BWD_SEGMENTS), halves the backward's per-chunk tensors for
    +0.2–3% of the op's time on H200s (BENCHMARKS.md, session 21)."""
    env = os.environ.get("MDN_BWD_SEGMENTS", str(DEFAULT_BWD_SEGMENTS))
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"MDN_BWD_SEGMENTS must be a positive integer, got {env!r}")
    return int(env)


class Segment(NamedTuple):
    """Chunks [c0, c1) of the sequences [n0, n1) they overlap; head_cut: sequence n0 began in
    an earlier segment; tail_cut: sequence n1 − 1 goes on in a later one."""
    c0: int
    c1: int
    n0: int
    n1: int
    layout: ChunkLayout   # over the chunk tensors sliced [c0:c1], one "sequence" per overlap
    head_cut: bool
    tail_cut: bool


def segment_bounds(offsets, n: int) -> list:
    """[(c0, c1, n0, n1)] of chunk_segments from the host chunk offsets of the sequences: at
    most n runs of consecutive chunks of about equal counts. Every sequence is first cut into
    pieces of at most ⌈NC / n⌉ chunks (a shorter sequence is one piece); a segment then takes
    pieces while it is short of its share of the chunks and the piece's middle lies within it."""
    total = offsets[-1]
    if n <= 1 or total == 0:
        return [(0, total, 0, len(offsets) - 1)]
    size = -(-total // n)
    pieces = [(q, min(q + size, offsets[i + 1]), i) for i in range(len(offsets) - 1)
              for q in range(offsets[i], offsets[i + 1], size)]
    out, p = [], 0
    while p < len(pieces):
        goal = total * (len(out) + 1) / n
        p1 = p + 1
        while (p1 < len(pieces) and pieces[p1][0] < goal
               and (pieces[p1][0] + pieces[p1][1]) / 2 <= goal):
            p1 += 1
        out.append((pieces[p][0], pieces[p1 - 1][1], pieces[p][2], pieces[p1 - 1][2] + 1))
        p = p1
    return out


def chunk_segments(layout: ChunkLayout, n: int) -> list:
    """The Segments of `layout` for n (segment_bounds), each with the layout of its overlaps
    over the sliced chunk tensors. Made once per (layout, n); from the layout's host offsets
    where it has them (one host copy of seq_chunk_offsets otherwise)."""
    whole = [Segment(0, layout.num_chunks, 0, layout.num_seqs, layout, False, False)]
    if n <= 1 or layout.num_chunks == 0:
        return whole
    cache = layout.__dict__.setdefault("_chunk_segments", {})
    segs = cache.get(n)
    if segs is None:
        off = layout.host_chunk_offsets
        if off is None:
            off = tuple(layout.seq_chunk_offsets.tolist())
        segs = [Segment(c0, c1, n0, n1, layout.sliced(n0, n1, c0, c1), c0 > off[n0], c1 < off[n1])
                for c0, c1, n0, n1 in segment_bounds(off, n)]
        segs = segs if len(segs) > 1 else whole
        cache[n] = segs
    return segs


def _segment_rows(seg: Segment, full, carried, at_head: bool):
    """The rows [n0, n1) of a per-sequence tensor pair `full` (initial pairs, or the final
    pairs' cotangents; None: zeros), with the carried pair (a [1, H, K, V] pair) in the cut
    sequence's row: the first (at_head) or the last. None, None where all would be zeros."""
    if carried is None:
        if full[0] is None:
            return None, None
        return tuple(t[seg.n0:seg.n1] for t in full)
    rows = []
    for t, c in zip(full, carried):
        r = (t[seg.n0:seg.n1] if t is not None
             else c.new_zeros((seg.n1 - seg.n0,) + tuple(c.shape[1:])))
        r = torch.cat([c, r[1:]]) if at_head else torch.cat([r[:-1], c])
        rows.append(r.contiguous())
    return tuple(rows)


def _forward_in_segments(loc, sp, S_init, M_init, cs, cl, segs, allow_tf32, scale, mm_dtype,
                         out_shape, out_dtype, kfac=None):
    """StateOutput's forward one segment after another (a sequence is cut): the state pass and
    the output on the sliced chunk tensors, the state carried across each cut in fp32 (the
    segment's final pair of the cut sequence is the next one's initial pair). Returns W (whole),
    the final pairs S, M [N, H, K, V], o, and the pairs entering the segments that begin with a
    cut [cuts, H, K, V] (saved: the backward restarts there)."""
    from .chunk_local_fused import output_forward
    from .state_pass import state_pass_fwd_triton
    W = torch.empty(sp[0].shape, dtype=_operand_dtype(sp, kfac), device=sp[0].device)
    o = torch.empty(out_shape, dtype=out_dtype, device=sp[0].device)
    S = M = None
    carried, entering = None, []
    for sg in segs:
        c0, c1 = sg.c0, sg.c1
        S_in, M_in = _segment_rows(sg, (S_init, M_init), carried, at_head=True)
        if sg.head_cut:
            entering.append((S_in[:1], M_in[:1]))
        Wk, S0s, M0s, Sk, Mk = state_pass_fwd_triton(*_rows(sp, c0, c1), S_in, M_in, sg.layout,
                                                     allow_tf32, w_out=W[c0:c1],
                                                     kfac=kfac and _rows(kfac, c0, c1))
        output_forward(*(t[c0:c1] for t in loc), Wk, S0s, M0s, cs[c0:c1], cl[c0:c1], scale,
                       mm_dtype, out_shape, out_dtype, out=o)
        del Wk, S0s, M0s
        if S is None:   # the final pairs of all N sequences, in the state pass's dtype
            S, M = (t.new_empty((segs[-1].n1,) + tuple(t.shape[1:])) for t in (Sk, Mk))
        done = sg.n1 - sg.n0 - (1 if sg.tail_cut else 0)   # the sequences that end here
        S[sg.n0:sg.n0 + done], M[sg.n0:sg.n0 + done] = Sk[:done], Mk[:done]
        carried = (Sk[done:], Mk[done:]) if sg.tail_cut else None
    bounds = tuple(torch.cat([e[i] for e in entering]) for i in (0, 1))
    return W, S, M, o, bounds


def _rows(ts, c0: int, c1: int) -> list:
    """The chunk tensors `ts` sliced to chunks [c0, c1) (None stays None)."""
    return [None if t is None else t[c0:c1] for t in ts]


def _operand_dtype(sp, kfac) -> torch.dtype:
    """The state pass's operand dtype: Y's, or k̂'s where the factors replace the operands."""
    return (sp[1] if kfac is None else kfac[0]).dtype


def _lean_backward(ctx, loc, sp, S_init, M_init, cs, cl, norms, do, dS_fin, dM_fin, layout,
                   init_grad: bool, out=None, kfac=None):
    """StateOutput's backward over the chunks of `layout` (all of them, or one segment's: the
    chunk tensors sliced to it, the raw q, k and do whole). Returns dqc, dkc, det, dla, dg0,
    dgam, dWt, dY, dZ, dKg, dKm (in the products' dtype), da, dg, du, dS_i, dM_i. out (the
    segments' path): the tensors the first eleven are written into, and (da, dg, du) the one
    [3, NC, H] tensor they come as; dS_i, dM_i are returned. kfac: the state pass's backward
    reads these factors instead of Y, Z, Kg, Km (state_kfac)."""
    from .chunk_local_fused import output_backward, output_backward_dw
    from .state_pass import state_pass_bwd_triton, state_pass_fwd_triton
    tf32, fuse = ctx.allow_tf32, ctx.fuse_pair_grads
    qc, kc, et, la, g0, gam = loc
    Y, Z, Kg, Km, a_end, g_end, u_end = sp[1:]
    o = out if out is not None else [None] * 12
    if ctx.save_w:  # the pairs alone, from the saved W
        W, S0s, M0s, S_fin, M_fin = state_pass_fwd_triton(None, *sp[1:], S_init, M_init,
                                                          layout, tf32, W=sp[0], kfac=kfac)
    else:
        W, S0s, M0s, S_fin, M_fin = state_pass_fwd_triton(*sp, S_init, M_init, layout, tf32,
                                                          kfac=kfac)
    del sp, S_fin, M_fin
    # split (pair_grads_first): dW and the output's pair cotangents first, its other
    # gradients after the state pass's backward and the products that free the end
    # cotangents: those gradients and the four pair-sized tensors are never alive together
    split = not fuse and pair_grads_first()
    if fuse:
        # dW first; the output's other gradients after the pairs' cotangents are freed
        dW = output_backward_dw(qc, kc, et, gam, cs, cl, do, ctx.scale, ctx.mm_dtype, W.dtype)
        dS0s = dM0s = None
        fuse_out = (qc, la, g0, do, cs, cl, ctx.scale, ctx.mm_dtype)
    elif split:
        dW, dS0s, dM0s = output_backward_dw(qc, kc, et, gam, cs, cl, do, ctx.scale,
                                            ctx.mm_dtype, W.dtype, pair_of=(la, g0, S0s),
                                            norms=norms, out=o[6])
        fuse_out = None
    else:
        dqc, dkc, det, dla, dg0, dgam, dW, dS0s, dM0s = output_backward(
            *loc, W, S0s, M0s, cs, cl, do, ctx.scale, ctx.mm_dtype, norms=norms, out=o[:7])
        fuse_out = None
    dWt, dS_end, dM_end, dS_i, dM_i, dgates = state_pass_bwd_triton(
        Y, Z, Kg, Km, a_end, g_end, u_end, dW, dS0s, dM0s, dS_fin, dM_fin, S0s, M0s,
        layout, tf32, dWt_out=dW, fuse_out=fuse_out, init_grad=init_grad,
        end_over_pair_grads=not fuse and end_over_pair_grads(), kfac=kfac)
    del dS0s, dM0s
    if out is not None:
        out[11].copy_(dgates)
    # state_pass_grads' products, each pair's inputs freed after its last use
    dKg = _product(W, dS_end, o[9], negate=True)
    del dS_end
    dKm = _product(W, dM_end, o[10])
    del dM_end
    if fuse or split:
        # dW (now overwritten by dWt) is not made again: only the other gradients
        dqc, dkc, det, dla, dg0, dgam, _, _, _ = output_backward(
            *loc, W, S0s, M0s, cs, cl, do, ctx.scale, ctx.mm_dtype, pair_grads=False,
            dW=dWt, norms=norms, out=o[:6] + [None])
    del W
    dY = _product(dWt, S0s, o[7])
    dZ = _product(dWt, M0s, o[8], negate=True)
    del S0s, M0s
    return (dqc, dkc, det, dla, dg0, dgam, dWt, dY, dZ, dKg, dKm, *dgates, dS_i, dM_i)


def _product(a: torch.Tensor, b: torch.Tensor, out=None, negate: bool = False) -> torch.Tensor:
    """a @ bᵀ over the last two dims, [..., m, k] × [..., n, k] → [..., m, n] (contiguous a, b),
    into `out` where given. Negated in the GEMM itself (alpha = −1, beta = 0: `out`'s contents
    are not read): the same values as negating the rounded product, bit for bit, without a
    second pass over the result."""
    if not negate:
        bt = b.transpose(-1, -2)
        return torch.matmul(a, bt, out=out) if out is not None else a @ bt
    r = out if out is not None else a.new_empty(*a.shape[:-1], b.shape[-2])
    r.view(-1, *r.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]),
                                      b.transpose(-1, -2).reshape(-1, b.shape[-1], b.shape[-2]),
                                      beta=0, alpha=-1)
    return r


def _lean_backward_in_segments(ctx, loc, sp, S_init, M_init, cs, cl, norms, do, dS_fin, dM_fin,
                               segs, init_grad: bool, bounds, kfac=None):
    """_lean_backward one segment after another, the last first (bwd_segments), each on the
    chunk tensors sliced to its chunks and writing into slices of whole-size gradients: the
    recomputed pairs and their cotangents exist for one segment at a time. Across a cut the
    pass restarts from the saved fp32 pair (`bounds`, the forward's) and carries the fp32
    cotangent of the cut sequence's state back to the segment before."""
    dev = sp[0].device
    ck_shape = (sp[1] if kfac is None else kfac[0]).shape   # [NC, H, C, K]
    out = [torch.empty(ck_shape, dtype=torch.float32, device=dev) for _ in range(2)]
    out += [torch.empty_like(t) for t in loc[2:]]
    pdt = _operand_dtype(sp, kfac)   # the products' dtype (the operand dtype: W's)
    out += [torch.empty(sp[0].shape, dtype=pdt, device=dev)]
    out += [torch.empty(ck_shape, dtype=pdt, device=dev) for _ in range(4)]
    out += [torch.empty(3, *sp[5].shape, dtype=torch.float32, device=dev)]
    dS_i = dM_i = None
    if init_grad:
        dS_i, dM_i = torch.empty_like(S_init), torch.empty_like(M_init)
    cut = sum(sg.head_cut for sg in segs)   # the saved entering pairs, one per head cut
    carried = None
    for sg in reversed(segs):
        c0, c1, n0, n1 = sg.c0, sg.c1, sg.n0, sg.n1
        part = lambda ts: _rows(ts, c0, c1)  # noqa: E731
        entering = None
        if sg.head_cut:
            cut -= 1
            entering = (bounds[0][cut:cut + 1], bounds[1][cut:cut + 1])
        S_in, M_in = _segment_rows(sg, (S_init, M_init), entering, at_head=True)
        dS_f, dM_f = _segment_rows(sg, (dS_fin, dM_fin), carried, at_head=False)
        # the raw q, k are read whole (cs holds absolute first tokens); chunk tensors sliced
        seg_loc = list(loc[:2]) + part(loc[2:]) if norms is not None else part(loc)
        seg_out = part(out[:11]) + [out[11][:, c0:c1]]
        g = _lean_backward(ctx, seg_loc, part(sp), S_in, M_in, cs[c0:c1], cl[c0:c1],
                           None if norms is None else tuple(part(norms)), do, dS_f, dM_f,
                           sg.layout, init_grad or sg.head_cut, out=seg_out,
                           kfac=None if kfac is None else part(kfac))
        first = 1 if sg.head_cut else 0   # the cut sequence's row goes to the segment before
        carried = (g[-2][:1], g[-1][:1]) if sg.head_cut else None
        if init_grad:
            dS_i[n0 + first:n1], dM_i[n0 + first:n1] = g[-2][first:], g[-1][first:]
        del g
    return (*out[:11], *out[11], dS_i, dM_i)


def state_kfac(K: int) -> bool:
    """MDN_STATE_KFAC: whether StateOutput's state passes (the forward, the backward's recompute
    of the pairs and the reverse pass) read their four C×K operands as factors (k̂, T and four
    row vectors per chunk: the kfac of state_pass_fwd_triton and state_pass_bwd_triton), 1
    operand tile per chunk in place of 4; the products round at other points (bf16-size
    differences, the same size as the default's against float64 on the H200). StateOutput then
    keeps k̂ and T in the operand dtype and c_g, c_m (fp32) from the forward to the backward
    instead of Y, Z, Kg, Km: 2K + 2C + 8 bytes per token and head in place of 8K (bf16;
    mdn_scale.train.memory counts it). CP's passes (mdn_kernels.cp) always read the operands.

    LocalPrepare then stores k̂ and T instead of making Y, Z, Kg, Km (its kfac).

    "auto" (default): factored where the key block is 256 or more (K > 128), as measured on two
    H200s (plans s22n, s22m, s22q): the op's fwd+bwd −4.0% at B = 8 × 4K, K = 256 (peak −7.7%);
    the 1.3B model's step 0 to −2% at its MFU shape (within the runs' spread; peak 47.8 →
    46.4 GiB) and −4 to −5% at one 16K sequence; at K = 128 the op was 5.7% slower (11% at
    one 32K sequence) for 8.5% less peak. "1" everywhere (the lean path), "0" never."""
    flag = os.environ.get("MDN_STATE_KFAC", "auto")
    if flag not in ("0", "1", "auto"):
        raise ValueError(f"MDN_STATE_KFAC must be 0, 1 or auto, got {flag!r}")
    return K > 128 if flag == "auto" else flag == "1"


def end_over_pair_grads() -> bool:
    """MDN_END_OVER_PAIR_GRADS: "1" (default) the lean nodes' state-pass backward writes the
    end cotangents dS_end, dM_end over the output's pair cotangents dS0s, dM0s (read first,
    chunk by chunk: state_pass_bwd_triton's end_over_pair_grads), so two [NC, H, K, V] tensors
    fewer are alive at the backward's peak; "0" separate buffers (the earlier path, kept to
    compare against). Results are the same either way, bit for bit."""
    return _flag("MDN_END_OVER_PAIR_GRADS", "1")


def save_w() -> bool:
    """MDN_SAVE_W: "1" (default) StateOutput saves the state pass's W instead of its input U
    (the same shape and dtype) and its backward re-makes only the pairs from W
    (state_pass_fwd_triton's W): one [NC, H, C, V] tensor fewer at the backward's peak (the
    recomputed W was one beside the saved U), and the recompute skips the two products that
    make W. "0": U saved, W re-made (the earlier path, kept to compare against). Results are
    the same either way, bit for bit: W is stored in the operand dtype the pairs' products
    take."""
    return _flag("MDN_SAVE_W", "1")


def pair_grads_first() -> bool:
    """MDN_PAIR_GRADS_FIRST: "1" StateOutput's backward makes dW and the output's pair
    cotangents first (output_backward_dw) and the output's other gradients after the state
    pass's backward has used and freed the pair-sized cotangents: less memory at the op's peak
    (with MDN_END_OVER_PAIR_GRADS on the H200: 1.50× FLA's GDN instead of 1.64× at K = 256,
    1.37× instead of 1.57× at K = 128) for ~4% more op time (+4.2% at K = 256: the product QKᵀ
    is made twice). "0" (default): one output backward. Results are the default's, bit for
    bit."""
    return _flag("MDN_PAIR_GRADS_FIRST", "0")


def raw_qk() -> bool:
    """MDN_RAW_QK: "1" (default) the fused path's nodes (LocalPrepare, StateOutput, LocalOutput,
    CP's lean node) keep the op's raw q, k [B·T, H, K] and the l2norm scales rq, rk [NC, H, C]
    for the backward instead of the fp32 chunks q̂, k̂ [NC, H, C, K]: their backward kernels
    remake q̂ = q·rq, k̂ = k·rk, the product LocalPrepare's forward made, so every result is
    bitwise the same. Saves 8K bytes per token and head; the kernels read q, k with their
    strides (chunk_local_fused.token_rows), so in the model, where k is a slice of the conv
    output it keeps anyway, the corrected q (2K bytes in bf16) is the only tensor kept for them
    (mdn_scale/train/memory.py); LocalPrepare likewise keeps v as given (a view where it can),
    not a contiguous copy. "0": the fp32 chunks and the copy of v are kept (the earlier path,
    kept to compare against)."""
    return _flag("MDN_RAW_QK", "1")


def _flag(name: str, default: str) -> bool:
    flag = os.environ.get(name, default)
    if flag not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {flag!r}")
    return flag == "1"


def recompute_pairs_mode() -> int:
    """MDN_RECOMPUTE_PAIRS: 1 (default) the lean path (StateOutput, bf16 state-pass operands
    written by LocalPrepare): the per-chunk pairs are recomputed in the backward instead of kept;
    0 the earlier path, StatePass + LocalOutput (kept selectable to compare against); 2 the lean
    path with the output's pair cotangents fused into the state pass's backward (opt-in: it hit
    an illegal shared-memory access on the H100, BENCHMARKS.md). Modes 1 and 2 apply with the
    fused chunk-local kernels, the Triton state pass and no CP; everything else runs mode 0's
    path whatever the flag. MDN_FUSE_VARIANT picks mode 2's kernel variant
    (state_pass.FUSE_VARIANTS). Mode 1 was checked on the H100 against mode 0 (same o, dq, dv and
    gate gradients, dk to 1.1e-5) with 23% less peak memory and 5% less time."""
    mode = os.environ.get("MDN_RECOMPUTE_PAIRS", "1")
    if mode not in ("0", "1", "2"):
        raise ValueError(f"MDN_RECOMPUTE_PAIRS must be 0, 1 or 2, got {mode!r}")
    return int(mode)


def _local_prepare(q, k, v, log_alpha, log_mu, beta, eta, dest, num_chunks: int, chunk_size: int,
                   cdt: torch.dtype, use_qk_l2norm: bool, p_times_alpha: bool, mm_dtype):
    """Token layout [B, T, H, ·] → normalised chunks and chunk_prepare's quantities."""
    B, T = k.shape[:2]

    def chunks(x):
        return to_chunks(x.reshape(B * T, *x.shape[2:]).to(cdt), dest, num_chunks, chunk_size)

    if use_qk_l2norm:
        q, k = l2norm(q.to(cdt)), l2norm(k.to(cdt))
    # A finite floor keeps differences of log-cumsums finite when a gate is exactly 0 (μ ≡ 0 is
    # the GDN mode); e^-1e4 underflows to exactly 0 in fp32 and fp64, so the result is unchanged.
    log_alpha, log_mu = log_alpha.clamp(min=LOG_FLOOR), log_mu.clamp(min=LOG_FLOOR)
    qc, kc, vc, la, lm, bt, et = (chunks(x) for x in (q, k, v, log_alpha, log_mu, beta, eta))
    prep = chunk_prepare(qc, kc, vc, la, lm, bt, et, p_times_alpha=p_times_alpha, mm_dtype=mm_dtype)
    return (qc, kc, et, prep["la"], prep["g0"], prep["gam"], prep["U"], prep["Y"], prep["Z"],
            prep["Kg"], prep["Km"], prep["a_end"], prep["g_end"], prep["u_end"])


def _local_output(qc, kc, et, la, g0, gam, W, S0s, M0s, dest, scale: float, mm_dtype,
                  out_shape: tuple, out_dtype: torch.dtype):
    o = chunk_output(qc, kc, et, la, g0, gam, W, S0s, M0s, scale, mm_dtype=mm_dtype)
    return from_chunks(o, dest).view(out_shape).to(out_dtype)


_COMPILED: dict = {}
_FUSED_LOCAL: bool | None = None


def use_fused_local(flag: bool | None) -> None:
    """Route the chunk-parallel parts (_local_prepare / _local_output) through the fused Triton
    kernels of chunk_local_fused.py (True), the torch ops (False), or the environment variable
    MDN_FUSED_LOCAL (None, the default): "1" on, "0" off, unset = on for 16-bit inputs (the
    path checked on the H100 at real shapes, benchmarks/results/fused_local_h100.json), off for
    fp32 ones. Applies to backend "triton" with an fp32 compute dtype and chunk 16/32/64 only;
    anything else keeps the torch ops."""
    global _FUSED_LOCAL
    _FUSED_LOCAL = flag


def fused_local_enabled(backend: str, cdt: torch.dtype, chunk_size: int,
                        low_precision: bool = False) -> bool:
    """Whether this call runs the fused chunk-local kernels (see use_fused_local).

    Under CP too (session 5 had switched them off there; session 6 withdrew that): the 16-bit
    whole-model CP step gave wrong gradients on some lent H100 machines with the torch
    chunk-local ops as well; session 7 found the cause in two other kernels compiled with
    Hopper's wgmma (mdn_kernels.mdn.wgmma).
    """
    flag = _FUSED_LOCAL
    if flag is None:
        env = os.environ.get("MDN_FUSED_LOCAL")
        flag = low_precision if env is None else env == "1"
    return (bool(flag) and backend == "triton" and cdt == torch.float32
            and chunk_size in (16, 32, 64))


def _maybe_compiled(fn, device: torch.device):
    """torch.compile the chunk-parallel parts on CUDA (fuses the elementwise work between the
    matmuls); MDN_COMPILE=0 turns it off. On CPU they run eagerly (CI, references)."""
    if device.type != "cuda" or os.environ.get("MDN_COMPILE", "1") == "0":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def chunk_mdn(q, k, v, log_alpha, log_mu, beta, eta, *, scale, initial_state, output_final_state,
              cu_seqlens, use_qk_l2norm, p_times_alpha, backend, chunk_size=64, state_pass=None,
              state_output=None):
    """Chunkwise MDN on validated inputs (see mdn_kernels.mdn_chunk for shapes).

    `state_pass` replaces `StatePass.apply` (same arguments and results): context parallelism
    (mdn_kernels.cp) plugs its cross-rank version in here and reuses everything else.
    `state_output` (with `state_pass`) replaces `StateOutput.apply` where the lean path applies
    (its arguments up to out_dtype, allow_tf32; a zero initial pair is passed as zeros): CP's
    opt-in lean node.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    low_precision = v.dtype in (torch.bfloat16, torch.float16)
    # 16-bit models: bf16 operands for the big products on GPU (fp32 accumulation), like FLA.
    mm_dtype = torch.bfloat16 if (low_precision and k.is_cuda and
                                  os.environ.get("MDN_LOWP_MM", "1") != "0") else None
    layout = build_layout(B, T, cu_seqlens, chunk_size, k.device)
    fused = fused_local_enabled(backend, cdt, chunk_size, low_precision)
    lean = False
    recompute = recompute_pairs_mode()
    if fused and (state_pass is None or state_output is not None) and recompute:
        from .state_pass import fits_shared_memory
        op_dtype = torch.bfloat16 if low_precision else cdt   # StatePass's operand dtype
        lean = fits_shared_memory(K, op_dtype, chunk_size)
    if fused:
        from .chunk_local_fused import LocalOutput, LocalPrepare
        local_prepare, local_output = LocalPrepare.apply, LocalOutput.apply
    else:
        local_prepare = _maybe_compiled(_local_prepare, k.device)
        local_output = _maybe_compiled(_local_output, k.device)
    raw = fused and raw_qk()
    if raw:   # LocalPrepare and the later nodes keep the very same q, k (a copy only where the
        #       kernels cannot read x's strides: token_rows)
        from .chunk_local_fused import token_rows
        q_rows, k_rows = token_rows(q), token_rows(k)
        q, k = q_rows.view(B, T, H, K), k_rows.view(B, T, H, K)
    prep_args = (q, k, v, log_alpha, log_mu, beta, eta, layout.dest, layout.num_chunks,
                 chunk_size, cdt, use_qk_l2norm, p_times_alpha, mm_dtype)
    # the state passes on factored operands (state_kfac): StateOutput's own passes only
    kfac = lean and state_output is None and recompute == 1 and state_kfac(K)
    if fused:
        prep_args += (op_dtype if lean else None, raw, kfac)
    (qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end, *norms) = local_prepare(
        *prep_args)
    # LocalPrepare's factors for it: k̂, T, e^{le}, γ⁻, c_g, c_m
    factors = tuple(norms[2:]) if kfac else None
    norms = norms[:2]
    # q, k [B·T, H, K] and rq, rk: what the nodes after LocalPrepare save instead of qc, kc
    qk_raw = (q_rows.detach(), k_rows.detach(), *norms) if raw else None
    N = layout.num_seqs
    if initial_state is None:
        if lean and state_output is None:  # StateOutput runs a zero initial pair without storing one
            S_init = M_init = None
        else:
            S_init = k.new_zeros(N, H, K, V, dtype=cdt)
            M_init = k.new_zeros(N, H, K, V, dtype=cdt)
    else:
        S_init, M_init = (s.to(cdt) for s in initial_state)
    if lean and state_output is not None:
        o, S, M = state_output(qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end,
                               S_init, M_init, layout, scale, mm_dtype, (B, T, H, V), v.dtype,
                               low_precision, qk_raw)
        return o, ((S, M) if output_final_state else None)
    if lean:
        o, S, M = StateOutput.apply(qc, kc, et, la, g0, gam, U, Y, Z, Kg, Km, a_end, g_end, u_end,
                                    S_init, M_init, layout, scale, mm_dtype, (B, T, H, V), v.dtype,
                                    low_precision, recompute == 2, qk_raw, factors)
        return o, ((S, M) if output_final_state else None)
    W, S0s, M0s, S, M = (state_pass or StatePass.apply)(
        U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, backend, low_precision)
    out_args = (qc, kc, et, la, g0, gam, W, S0s, M0s, layout.dest, scale, mm_dtype,
                (B, T, H, V), v.dtype)
    o = local_output(*out_args, qk_raw) if fused else local_output(*out_args)
    return o, ((S, M) if output_final_state else None)
