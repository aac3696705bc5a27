"""Per-GPU memory of a training config, and the longest context that fits (tools/estimate_memory.py).

An itemised model of what our trainer keeps on one GPU: every term is a count of stored tensors
times their width and element size, written out below so that it can be checked by hand, against
the bytes autograd saves (tests/tools/test_estimate_memory.py counts them with saved-tensor
hooks on a tiny model, bf16 autocast, the Triton path under the interpreter) and against measured
peaks (tests/gpu/test_longctx_memory_gpu.py). Sizes in bytes.

Notation (per rank): d hidden size, L_s layers on the heaviest pipeline stage, H_l = H/TP heads,
K, V head dims, P_qkv = H_l(2K + V), F_l = F/TP MLP width, Vp_l = padded vocab/TP, C chunk size,
W conv width, T_l = micro_batch · seq_len / CP tokens per rank, c = model.loss_chunk_tokens,
N = segments per micro-batch (documents + rows).

Static
    parameters   4 · P_l              fp32 weights (P_l: this rank's parameters, below)
    gradients    4 · P_l              fp32 .grad (kept between steps: zero_grad(set_to_none=False))
    optimizer    8 · P_l              AdamW exp_avg and exp_avg_sq, fp32; with
                 / (DP · CP)          parallel.distributed_optimizer (ZeRO-1 over dp×cp) each rank
                                      keeps its share
  P_l = L_s · (matmul params of a layer / TP + pad_l · d + 2d + per-head params/TP + convs/TP + V)
        + Vp_l · d (embedding, first stage) + Vp_l · d + d (head and final norm, last stage);
        the heaviest stage holds both ends when PP = 1. pad_l: the in-projection's alignment
        rows on a rank (model.in_proj_row_multiple).

Saved for the backward, per token of one recurrent layer, bf16 (autocast over fp32 weights; the
residual stream is bf16 after the first layer: Megatron's bias-dropout-add casts the residual to
the layer output's dtype)
  each RMSNorm (2)     10d + 4         fp32 copy of the bf16 input, rsqrt, x·rsqrt, bf16 output
    Triton             4d + 4          the bf16 input, the fp32 rstd, bf16 output
                                       (mdn_scale/model/norm_kernels.py; model.norm_kernel)
  causal conv + SiLU   2 P_qkv + 2W    the zero-padded bf16 input copy (with the CP halo), the
                                       document mask (mixer.causal_conv_silu recomputes the conv
                                       in the backward; the composite kept its fp32 output, 4 P_qkv)
    fused (FLA)        2 P_in          FLA's CausalConv1dFunction saves its input x (and the
                                       weight): a strided view of the bf16 in-projection output,
                                       which keeps all of it, P_in = P_qkv + H_l V + (4 | 3) H_l
                                       + pad_l;
                                       its output is already the op's bf16 q|k|v (next line);
                       2 P_qkv         under CP: the halo-padded bf16 copy it runs over
                                       (mixer_kernels.conv_silu_fla_padded)
  q, k, v to bf16      2 P_qkv         the op's bf16 inputs (kept whole: k is saved by the q
                                       correction; the op reads k and v as the slices they are,
                                       token_rows, and keeps them so; MDN_RAW_QK=0, the earlier
                                       path: the op's contiguous copy of v, 2 H_l V, as well)
  gates                15 · 4 H_l      fp32 [T, H] tensors of the gate math and the op's 4 inputs
                                       (12 for GDN: no momentum gate)
    fused (Triton)     4 · 4 H_l       the op's 4 fp32 inputs, and the kernel's packed bf16 copy
                       + 2 · 4 H_l     of a | b | e | m (3 H_l for GDN; mdn_scale/model/gate_kernels.py)
  the MDN op, fused 16-bit path (kernels/mdn/chunk_local_fused.py LocalPrepare and
  kernels/mdn/chunk.py StateOutput, the default MDN_RECOMPUTE_PAIRS=1; under CP the op runs
  StatePass + LocalOutput, which keeps the pairs), per token and head:
                       2K              q̂, k̂: the raw q, k and the l2norm scales (MDN_RAW_QK=1,
                                       the default; the backward remakes q̂ = q·r): q is the
                                       correction's output, a tensor of its own; k a view of the
                                       conv output, which the kernels read with its strides and
                                       which is counted above (MDN_RAW_QK=0: the fp32 chunks,
                                       4 · 2K)
                       2 · 4K          Y, Z, Kg, Km (bf16, the state pass's operands);
                                       MDN_STATE_KFAC (by default K > 128; outside CP) their factors:
                                       k̂ and T in bf16, c_g, c_m fp32: 2K + 2C + 8
                       4 · 2C          (I + A)⁻¹ and Γ (fp32 C×C per chunk)
                       4 · 7           e^{le}, γ⁻, l2norm scales, η, log α cumsum, g0 (fp32)
                       2 V             W (bf16, kept to recompute the pairs; MDN_SAVE_W=0: U,
                                       to recompute W too) — under CP W as well
                       12 / C          (the chunk bounds, 8 bytes per chunk, are made once per
                                       micro-batch and shared by the layers: not counted)
                       CP only: 2 · 2KV / C   S0s, M0s: the pair entering each chunk (bf16)
  gated RMSNorm        18 H_l V + 4 H_l   fp32 o, rsqrt, y, y·w, σ(g); bf16 output (out_proj input)
    fused (FLA)        6 H_l V + 4 H_l    its LayerNormGatedFunction saves bf16 o, a contiguous
                                          copy of g (input_guard), the fp32 rstd; bf16 output
  SwiGLU MLP           10 F_l          bf16 fc1 output (2F), x_lin + offset, silu, product
    compiled           6 F_l           Megatron's fused SwiGLU: fc1 output (2F), product
  (1.3B, K = 256, V = 512, C = 64: the op keeps 2.7 KiB per token and head with the factors
  (the default at this K), 4.0 with the operands (MDN_STATE_KFAC=0), 4.2 with MDN_RAW_QK=0;
  under CP 12.0 KiB, 8 KiB of it the pairs.)
The fused rows apply where model.mixer_kernels runs FLA (mdn_scale/model/mixer_kernels.py), at
  any CP (MDN_CONV=eager, a benchmark switch, is not counted): Layout.fused_mixer, or by default
  'fla' → fused, 'eager' → eager, 'auto' → fused when fla-core imports in the environment
  doing the estimate (the one that trains, for the GPU tools). The fused gates row applies where
  the mixer runs its Triton gate kernels (mixer_kernels.use_fused_gates: CUDA, any setting but
  'eager'; no FLA needed): Layout.fused_gates, or by default 'eager' → eager, 'fla' → fused,
  'auto' → fused when CUDA is available where the estimate runs. The Triton norm row applies
  where model.norm_kernel is 'triton' (the default) and CUDA is available where the estimate
  runs (the kernels never run on CPU), or as Layout.triton_norm says. The compiled MLP row
  applies where model.mlp_kernel is 'compiled' (the default) and CUDA is available where the
  estimate runs, or as Layout.compiled_mlp says.
fp32 (no autocast; the op's torch path): the earlier, coarser count (not checked against the
  saved-tensor count; the eager conv and norm whatever the kernels): norms d(4 + 4), projections
  and convs as above in fp32, the op
  4(4K + 2K + V) + 4·13C + 4(2(V + 2K) + 2K + V + 2K + V) + 4·2KV/C per token and head.

Backward workspace of the op (bf16, one layer at a time), per token and head, at the peak of
StateOutput.backward (tools/mem_accounting.py lists what is alive): LocalOutput's input
gradients 4·2K + 12 + 4C + 2V + 2·2KV/C, the recomputed S0s, M0s 2·2KV/C (W is saved in U's
place and counted with the op's chunk tensors; MDN_SAVE_W=0: U saved, W recomputed, 2V more) and
the state pass's dS_end, dM_end, written over the output's pair gradients and so alive at the
first product, dKg 2K (MDN_END_OVER_PAIR_GRADS=0: their own 2·2KV/C instead, the output's pair
gradients freed before that product). With MDN_PAIR_GRADS_FIRST=1 the larger of two
moments instead: (a) the state pass's backward and its first product: S0s, M0s, the
output's dW 2V and pair gradients 2·2KV/C (dS_end, dM_end over them), dKg 2K; (b) the output's
other gradients 4·2K + 12 + 4C, made after dS_end, dM_end are freed, beside S0s, M0s, dW̃
and dKg, dKm 2·2K (MDN_SAVE_W=0: W 2V more in both); (c) the last products, dY, dZ 2·2K,
beside everything of (b) but the recomputed W (freed first). (c) can be the peak in either
order where 4KV/C is small against 6K (small heads, long chunks). In n segments of consecutive
chunks (MDN_BWD_SEGMENTS, Layout.op_backward_segments; ending at sequence boundaries, cutting
longer sequences) the whole-size gradients the segments write into, 4·2K + 12 + 4C + 2V (dW̃) +
4·2K (dY..dKm), and per segment (the largest's share of the chunks, segment_bounds over the
micro-batch's sequences taken as equal; the fp32 pairs kept at the cuts are not counted) S0s, M0s and the pair gradients
2·2·2KV/C (MDN_SAVE_W=0: W 2V; MDN_END_OVER_PAIR_GRADS=0: 2·2KV/C more), in either order. Under
CP, inside StatePass.backward: the same input gradients, the state pass's dW̃, dS_end, dM_end
2V + 2·2KV/C and state_pass_grads' fp32 dU, dY, dZ, dKg, dKm 4V + 4·4K. By then the layer's
tensors after the op (gated norm, MLP, second norm) are freed.
CP's lean node (MDN_CP_LEAN=1, Layout.cp_lean; kernels/cp/state_pass_cp.CPStateOutput) keeps no
pair (it saves W in U's place too, MDN_SAVE_W); its backward holds the output's chunk-input
gradients 4·2K + 12 + 4C and, per chunk, (MDN_SAVE_W=0: the recomputed W 2V,) dW̃ and the
output's pair gradients 2V + 2·2KV/C (dS_end, dM_end written over the latter;
MDN_END_OVER_PAIR_GRADS=0: 2·2KV/C more), the recomputed S0s, M0s 2·2KV/C, state_pass_grads'
fp32 products 4V + 4·4K + 12 and, at the end, their bf16 casts 2V + 4·2K (the node's peak).
In segments of S tokens (MDN_CP_LEAN_SEGMENT_TOKENS, Layout.cp_lean_segment_tokens) the
per-chunk part counts for a share f = S / T_l, and full-size buffers of the state pass's input
gradients (bf16 dU, dY..dKm, fp32 gate sums: 2V + 2·4K + 12), which the casts go into, are
added.

Peak: the static memory plus the largest of four moments of a step (each adds to what is kept):
  forward end   autocast's bf16 weight copies (2 · P_l, cached until autocast exits) and the
                loss's forward transients;
  loss backward the loss's backward transients;
  layer backward the last layer's tensors up to the op, its backward workspace, two [T, d] fp32
                gradients at the layer boundary; under CP the group maps and their gradients.
  MLP backward  the last layer's every tensor (its MLP's backward runs first, before anything of
                the layer is freed), fc2's input gradient T_l · 2 F_l and three [T, d] fp32
                gradients. It is the peak where the op's workspace is small (CP's lean node in
                segments): measured on one H200 standing in for a CP = 4 rank at 192K tokens
                (benchmarks/longctx_memory.py --emulate-cp), 77.2 GiB where the layer-backward
                moment alone said 67.9; what was alive, by allocation site, in BENCHMARKS.md.
Kept across layers: with train.recompute every layer keeps only its input, T_l · (4d + (L_s − 1)
  · 2d) (the first is the fp32 embedding output) and the last layer is rebuilt during the
  backward; without, every layer's saved tensors. With train.recompute_offload the inputs wait
  in host memory: T_l · 4d (the one being used) stays. Plus the final norm (its row above) and
  the loss's saved tensors.
Loss (last stage):
  Megatron's (model.loss_chunk_tokens = 0): kept T_l · Vp_l · 4 (the fp32 softmax) + 9 T_l;
    forward and backward transients T_l · Vp_l · 2 (the bf16 logits, then the bf16 gradient).
  chunked (c > 0, mdn_scale/model/loss.py): kept 12 T_l (labels, log-sum-exp); forward 2 Vp_l d
    (bf16 weight) + c · Vp_l · 6 (a chunk's bf16 and fp32 logits); backward 8 Vp_l d (bf16
    weight, fp32 dW, a chunk's bf16 dW) + c · Vp_l · 8 + 2 T_l d (dh).
Recurrent states: 2 · 2 · N · H_l · K · V · 4 (initial and final pairs) per layer in flight.
CP (R = CP ranks, all-gather mode, kernels/cp/state_pass_cp.py), per layer kept for the backward:
  the later ranks' maps, (R − 2) · H_l · (2K)² · 4 at most (rank 0), and every local group's map
  H_l (2K)² · 4 per group of G = C · ⌈16K / C⌉ tokens; the backward's group gradients (12 fp32
  [groups, H_l, K, V] tensors at most) in the layer-backward moment; the all-gather buffer
  R · H_l · 2K (2K + V) · 4 once.
Reserve: CUDA context, NCCL buffers and allocator slack, a constant (default 3 GiB); measured
  peaks (torch.cuda.max_memory_allocated) leave it out, so `allocated` is what to compare them with.

What this does not model: softmax-attention layers' activations beyond the projections (hybrid
stacks are estimated as if every layer were recurrent, with the attention layers' own
parameters), pipeline microbatches in flight (1F1B keeps up to PP microbatches on stage 0:
multiplied in as `in_flight`), ZeRO-1's uneven split (parameters are not cut: a share is whole
tensors, so the largest rank's share can exceed 1/(DP·CP)), the optimizer step's temporaries
(after the activations are freed), sequence parallelism's split of the norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GIB = 2 ** 30
MIB = 2 ** 20


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch: int = 1
    seq_len: int = 4096
    precision: str = "bf16"
    recompute: bool = False
    recompute_offload: bool = False  # train.recompute_offload: the kept inputs in host memory
    # train.recompute_keep_cp_maps: under recompute, the CP op's maps and entering pairs of every
    # layer are kept from its forward to its backward (as without recompute, plus the pairs)
    recompute_keep_cp_maps: bool = False
    segments: int = 0  # N: segments per micro-batch (0: one per sequence)
    distributed_optimizer: bool = False  # ZeRO-1: Adam moments sharded over dp×cp
    fused_mixer: Optional[bool] = None  # FLA's conv/gated norm (None: from model.mixer_kernels)
    fused_gates: Optional[bool] = None  # the Triton gate kernels (None: from model.mixer_kernels)
    triton_norm: Optional[bool] = None  # the Triton block RMSNorm (None: from model.norm_kernel)
    compiled_mlp: Optional[bool] = None  # the fused SwiGLU (None: from model.mlp_kernel)
    # CP's lean op node and its segments (None: MDN_CP_LEAN / MDN_CP_LEAN_SEGMENT_TOKENS, as the
    # op reads them; mdn_kernels.cp)
    cp_lean: Optional[bool] = None
    cp_lean_segment_tokens: Optional[int] = None
    # StateOutput's backward segments (train.op_backward_segments; None: MDN_BWD_SEGMENTS, as
    # the op reads it; mdn_kernels.mdn.chunk.bwd_segments)
    op_backward_segments: Optional[int] = None

    @property
    def tokens_per_rank(self) -> int:
        return self.micro_batch * self.seq_len // self.cp


def _act_bytes(precision: str) -> int:
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' (got {precision!r})")
    return 2 if precision == "bf16" else 4


def rank_params(cfg, lay: Layout) -> int:
    """Parameters on the heaviest rank (see the module docstring for P_l)."""
    from mdn_scale.model.stats import layer_params

    tp, d = lay.tp, cfg.hidden_size
    Vp_l = cfg.padded_vocab_size(tp) // tp
    types = cfg.layer_types()
    per_stage = -(-len(types) // lay.pp)

    def local(t):
        p = layer_params(cfg, t)
        if t == "attention":
            return p["matmul"] // tp + 2 * d
        replicated = 2 * d + cfg.head_v_dim  # the two norms, o_norm
        return (p["matmul"] // tp + _pad_rows(cfg, lay) * d + (p["other"] - replicated) // tp
                + replicated)

    layers = sorted((local(t) for t in types), reverse=True)[:per_stage]
    ends = Vp_l * d + (Vp_l * d + d)
    if lay.pp > 1:
        ends = max(Vp_l * d, Vp_l * d + d)
    return sum(layers) + ends


def _pad_rows(cfg, lay: Layout) -> int:
    """The in-projection's alignment rows on one TP rank (mixer.local_in_proj_parts)."""
    from mdn_scale.model.mixer import PAD, local_in_proj_parts

    return dict(local_in_proj_parts(cfg, cfg.num_heads // lay.tp)).get(PAD, 0)


def fused_mixer(cfg, lay: Layout) -> bool:
    """Whether the run being estimated takes FLA's fused conv and gated norm (module docstring)."""
    if lay.fused_mixer is not None:
        return bool(lay.fused_mixer)
    choice = getattr(cfg, "mixer_kernels", "eager")
    if choice == "auto":
        from mdn_scale.model.mixer_kernels import fla_import_error

        return fla_import_error() is None
    return choice == "fla"


def _cuda_only(given, cfg, field: str, value: str) -> bool:
    """A layout's explicit choice, else whether the model asks for a CUDA-only kernel
    (cfg.<field> == value) and CUDA is available where the estimate runs."""
    if given is not None:
        return bool(given)
    if getattr(cfg, field, "eager") != value:
        return False
    import torch

    return torch.cuda.is_available()


def triton_norm(cfg, lay: Layout) -> bool:
    """Whether the run being estimated takes the Triton block RMSNorm (module docstring)."""
    return _cuda_only(lay.triton_norm, cfg, "norm_kernel", "triton")


def compiled_mlp(cfg, lay: Layout) -> bool:
    """Whether the run being estimated takes Megatron's fused SwiGLU (module docstring)."""
    return _cuda_only(lay.compiled_mlp, cfg, "mlp_kernel", "compiled")


def _norm_bytes(cfg, lay: Layout) -> int:
    """Saved bytes per token of one block RMSNorm, its bf16 output included (module docstring)."""
    d = cfg.hidden_size
    if _act_bytes(lay.precision) == 4:
        return 8 * d + 4
    return 4 * d + 4 if triton_norm(cfg, lay) else 10 * d + 4


def cp_lean(lay: Layout) -> tuple[bool, int]:
    """(lean CP node, its segment in tokens or 0) of the run being estimated: the Layout's
    values, else the environment the op reads (mdn_kernels.cp.api.cp_lean,
    state_pass_cp.lean_segment_chunks)."""
    import os

    lean = lay.cp_lean if lay.cp_lean is not None else os.environ.get("MDN_CP_LEAN", "0") == "1"
    seg = lay.cp_lean_segment_tokens
    if seg is None:
        env = os.environ.get("MDN_CP_LEAN_SEGMENT_TOKENS", "0")
        seg = int(env) if env.isdigit() else 0
    return bool(lean) and lay.cp > 1, (int(seg) if lean else 0)


def op_backward_share(cfg, lay: Layout) -> float:
    """The largest share of a micro-batch's chunks that one segment of StateOutput's backward
    holds (1.0: no segments): its segments (Layout.op_backward_segments, else the environment's
    MDN_BWD_SEGMENTS, as the op reads it) cut as mdn_kernels.mdn.chunk.segment_bounds cuts the
    micro-batch's sequences (documents where Layout.segments says), taken as equal. 1.0 under
    CP (its own nodes)."""
    from mdn_kernels.mdn.chunk import bwd_segments, segment_bounds

    n = lay.op_backward_segments if lay.op_backward_segments is not None else bwd_segments()
    if lay.cp > 1 or n <= 1:
        return 1.0
    seqs = lay.segments or lay.micro_batch
    per = -(-lay.micro_batch * lay.seq_len // seqs // cfg.chunk_size)   # chunks per sequence
    bounds = segment_bounds([i * per for i in range(seqs + 1)], n)
    return max(c1 - c0 for c0, c1, _, _ in bounds) / (seqs * per)


def fused_gates(cfg, lay: Layout) -> bool:
    """Whether the run being estimated takes the Triton gate kernels (module docstring)."""
    if lay.fused_gates is not None:
        return bool(lay.fused_gates)
    choice = getattr(cfg, "mixer_kernels", "eager")
    if choice == "auto":
        import torch

        return torch.cuda.is_available()
    return choice == "fla"


def layer_activation_terms(cfg, lay: Layout) -> dict:
    """Bytes per token of one recurrent layer, saved for the backward: 'around_op' (norms,
    projections, conv, gates, gated norm, MLP; 'after_op' is the part freed before the op's
    backward runs), 'op_chunk_tensors' and 'op_state_pairs' (the op's own), and the op's
    backward workspace ('op_backward'). See the module docstring."""
    # the op's backward orders, as the op reads them from the environment
    from mdn_kernels.mdn.chunk import (end_over_pair_grads, pair_grads_first, raw_qk, save_w,
                                       state_kfac)

    a = _act_bytes(lay.precision)
    d, K, V, C, W = cfg.hidden_size, cfg.head_k_dim, cfg.head_v_dim, cfg.chunk_size, cfg.conv_size
    H_l = cfg.num_heads // lay.tp
    F_l = cfg.ffn_size // lay.tp
    P_qkv = H_l * (2 * K + V)
    fused = fused_mixer(cfg, lay)
    if lay.precision == "bf16":
        norm = _norm_bytes(cfg, lay)
        if fused_gates(cfg, lay):
            gates = 4 * 4 * H_l + 2 * (4 if cfg.momentum else 3) * H_l
        else:
            gates = (15 if cfg.momentum else 12) * 4 * H_l
        if fused and lay.cp == 1:  # FLA's conv keeps its input: a view of the whole projection
            conv = 2 * (P_qkv + H_l * V + (4 if cfg.momentum else 3) * H_l + _pad_rows(cfg, lay))
        elif fused:  # under CP it runs over (and keeps) the halo-padded copy
            conv = 2 * P_qkv
        else:  # mixer.causal_conv_silu: the padded bf16 input and the mask (the conv recomputed)
            conv = 2 * P_qkv + 2 * W
        gated_norm = (6 if fused else 18) * H_l * V + 4 * H_l
        v_copy = 0 if raw_qk() else 2 * H_l * V   # MDN_RAW_QK=0: the op keeps a copy of v
        before = norm + conv + 2 * P_qkv + v_copy + gates
        after = gated_norm + norm + (6 if compiled_mlp(cfg, lay) else 10) * F_l
        # 2V in the op's chunk terms: W (StateOutput; U with MDN_SAVE_W=0; StatePass under CP);
        # the op's q̂, k̂: the corrected q (raw_qk; k is a view of the conv output) or fp32 chunks
        qk = 2 * K if raw_qk() else 4 * 2 * K
        # the state pass's operands, or StateOutput's factors of them (MDN_STATE_KFAC=1; e^{le}
        # and γ⁻ are LocalPrepare's own, counted in 4·7)
        operands = 2 * K + 2 * C + 4 * 2 if state_kfac(K) and lay.cp == 1 else 2 * 4 * K
        chunk = H_l * (qk + operands + 4 * 2 * C + 4 * 7 + 2 * V + 12 / C)
        out_grads = 4 * 2 * K + 12 + 4 * C + 2 * V + 2 * 2 * K * V / C
        lean, seg = cp_lean(lay)
        pair = 2 * 2 * K * V / C
        # the lean nodes' dS_end, dM_end: written over the output's pair gradients, or their own
        end_pair = 0 if end_over_pair_grads() else pair
        if lean:  # CP's lean node (CPStateOutput): no pair kept; in its backward the recomputed
            #       W, S0s, M0s, the output's gradients, dS_end, dM_end and state_pass_grads'
            #       fp32 products, the per-chunk ones for one segment (a share f of the rank's
            #       tokens) when segmented, beside the full-size gradient buffers
            pairs = 0
            T_l = lay.tokens_per_rank
            f = min(1.0, seg / T_l) if seg else 1.0
            per_chunk = ((0 if save_w() else 2 * V) + (2 * V + pair) + pair + end_pair
                         + (4 * V + 4 * 4 * K + 12))
            # segmented: the full-size bf16 input-gradient buffers the segments write into;
            # whole: the bf16 casts of dW̃, dY..dKm (2V + 4·2K), made beside their fp32
            # products at the node's end (its peak)
            full = (4 * 2 * K + 12 + 4 * C) + (2 * V + 2 * 4 * K + 12) if seg else 4 * 2 * K + 12 + 4 * C
            if not seg:
                per_chunk += 2 * V + 4 * 2 * K
            backward = H_l * (full + f * per_chunk)
        elif lay.cp > 1:  # CP keeps StatePass + LocalOutput (kernels/cp/state_pass_cp.py)
            pairs = H_l * pair
            backward = H_l * (out_grads + (2 * V + pair) + (4 * V + 4 * 4 * K))
        else:           # StateOutput: the pairs are recomputed in the backward
            pairs = 0
            w = 0 if save_w() else 2 * V   # W recomputed beside the saved U, or saved in its place
            # the last products: dY, dZ beside dKg, dKm, dW̃, S0s, M0s and the output's gradients
            last = (4 * 2 * K + 12 + 4 * C) + pair + 2 * V + 4 * 2 * K
            share = op_backward_share(cfg, lay)
            if share < 1:   # whole-size gradients, written by segments; per segment a share
                backward = H_l * ((4 * 2 * K + 12 + 4 * C) + 2 * V + 4 * 2 * K
                                  + (w + 2 * pair + end_pair) * share)
            elif pair_grads_first():   # (a), (b) or (c) of the module docstring
                backward = H_l * max(w + 2 * V + pair + pair + end_pair + 2 * K,
                                     (4 * 2 * K + 12 + 4 * C) + pair + w + 2 * V + 2 * 2 * K, last)
            else:   # with dS_end, dM_end over the pair gradients, alive at the first product too
                backward = H_l * max(out_grads + w + pair + (end_pair or 2 * K), last)
    else:  # the torch path's coarser count (module docstring)
        g = 4 if cfg.momentum else 3
        before = (d * 8 + (2 * H_l * K + 2 * H_l * V + g * H_l) * a + 2 * P_qkv * a
                  + H_l * K * a + 16 * 4 * H_l)
        after = H_l * V * (2 * a + 12) + d * 8 + 4 * F_l * a
        chunk = H_l * (4 * (4 * K + 2 * K + V) + 4 * 13 * C
                       + 4 * (2 * (V + 2 * K) + 2 * K + V + 2 * K + V))
        pairs = H_l * 4 * 2 * K * V / C
        backward = chunk + pairs
    return {"around_op": before + after, "after_op": after, "op_chunk_tensors": chunk,
            "op_state_pairs": pairs, "op_backward": backward}


def _loss_terms(cfg, lay: Layout, T_l: int, Vp_l: int) -> dict:
    """The LM head + cross entropy (last stage): kept, forward and backward transients."""
    d, c = cfg.hidden_size, min(cfg.loss_chunk_tokens, T_l)
    if c > 0:
        w16 = 2 * Vp_l * d if lay.precision == "bf16" else 0
        return {"kept": 12 * T_l, "forward": w16 + c * Vp_l * 6,
                "backward": w16 + 4 * Vp_l * d + (2 * Vp_l * d if w16 else 4 * Vp_l * d)
                + c * Vp_l * 8 + T_l * d * _act_bytes(lay.precision)}
    a = _act_bytes(lay.precision)
    return {"kept": T_l * Vp_l * 4 + 9 * T_l, "forward": T_l * Vp_l * a,
            "backward": T_l * Vp_l * a + 4 * Vp_l * d}


def estimate(cfg, lay: Layout, *, reserve_gib: float = 3.0) -> dict:
    """Per-GPU bytes by component; 'allocated' (what max_memory_allocated measures: the static
    memory plus the largest moment, named in 'peak_at') and 'total' (plus the reserve)."""
    for k in ("tp", "pp", "cp", "dp", "micro_batch", "seq_len"):
        if getattr(lay, k) < 1:
            raise ValueError(f"{k} must be >= 1 (got {getattr(lay, k)})")
    if (lay.micro_batch * lay.seq_len) % lay.cp:
        raise ValueError(f"micro_batch × seq_len = {lay.micro_batch * lay.seq_len} is not divisible by cp = {lay.cp}")
    if cfg.num_heads % lay.tp:
        raise ValueError(f"num_heads = {cfg.num_heads} is not divisible by tp = {lay.tp}")
    bf16 = _act_bytes(lay.precision) == 2
    T_l = lay.tokens_per_rank
    d, K, V, C = cfg.hidden_size, cfg.head_k_dim, cfg.head_v_dim, cfg.chunk_size
    H_l = cfg.num_heads // lay.tp
    L_s = -(-cfg.num_layers // lay.pp)
    Vp_l = cfg.padded_vocab_size(lay.tp) // lay.tp
    P_l = rank_params(cfg, lay)
    terms = layer_activation_terms(cfg, lay)
    layer_tok = terms["around_op"] + terms["op_chunk_tensors"] + terms["op_state_pairs"]
    in_flight = lay.pp  # 1F1B: stage 0 holds up to PP microbatches' activations
    N = lay.segments or lay.micro_batch
    R = lay.cp
    group_tokens = C * -(-16 * K // C)  # kernels/cp/transition.default_group_chunks
    groups = -(-T_l // group_tokens)
    cp_layer = ((max(R - 2, 0) * H_l * (2 * K) ** 2 * 4 + groups * H_l * (2 * K) ** 2 * 4)
                if R > 1 else 0)
    cp_backward = 12 * groups * H_l * K * V * 4 if R > 1 else 0
    loss = _loss_terms(cfg, lay, T_l, Vp_l)
    final_norm = T_l * _norm_bytes(cfg, lay)
    out = {
        "parameters": 4 * P_l,
        "gradients": 4 * P_l,
        "optimizer": 8 * P_l / (lay.dp * lay.cp if lay.distributed_optimizer else 1),
    }
    if lay.recompute:
        inputs = T_l * (4 * d + (L_s - 1) * (2 if bf16 else 4) * d)
        if lay.recompute_offload:  # in host memory; one layer's input back on the GPU at a time
            inputs = T_l * 4 * d
        out["activations_kept"] = in_flight * inputs
        out["activations_rebuilt_layer"] = T_l * layer_tok
        out["cp_maps_kept"] = cp_layer
        kept = out["activations_kept"]
        if lay.recompute_keep_cp_maps and R > 1:  # kernels/cp/kept.py: per layer, the maps and
            entering = groups * H_l * 2 * K * V * 4  # the pair entering each group (fp32)
            out["cp_maps_kept"] = in_flight * L_s * (cp_layer + entering)
            kept += out["cp_maps_kept"]
        at_layer_backward = T_l * (layer_tok - terms["after_op"])
    else:
        out["activations_kept"] = in_flight * L_s * T_l * layer_tok
        out["activations_rebuilt_layer"] = 0
        out["cp_maps_kept"] = in_flight * L_s * cp_layer
        kept = out["activations_kept"] + out["cp_maps_kept"]
        at_layer_backward = -T_l * terms["after_op"]
    out["final_norm_and_loss_kept"] = final_norm + loss["kept"]
    out["backward_workspace"] = T_l * terms["op_backward"] + 2 * T_l * d * 4 + cp_backward
    out["mlp_backward_transient"] = T_l * (2 * (cfg.ffn_size // lay.tp) * _act_bytes(lay.precision)
                                           + 3 * d * 4)
    out["recurrent_states"] = 2 * 2 * N * H_l * K * V * 4
    out["cp_allgather_buffer"] = R * H_l * 2 * K * (2 * K + V) * 4 if R > 1 else 0
    static = out["parameters"] + out["gradients"] + out["optimizer"]
    # the layer being rebuilt makes its maps again unless they are kept (counted in `kept`)
    rebuilt_maps = lay.recompute and not (lay.recompute_keep_cp_maps and R > 1)
    common = kept + out["final_norm_and_loss_kept"]
    moments = {
        "forward_end": common + (2 * P_l if bf16 else 0) + loss["forward"],
        "loss_backward": common + loss["backward"],
        # the loss's and the final norm's saved tensors are freed by then
        "layer_backward": (kept + at_layer_backward + out["backward_workspace"]
                           + (cp_layer if rebuilt_maps else 0) + out["recurrent_states"]
                           + out["cp_allgather_buffer"]),
        # the MLP's backward in the last layer: every tensor of that layer (rebuilt under
        # recompute) is still alive, plus fc2's input gradient and three [T, d] fp32 gradients
        "mlp_backward": (kept + (T_l * layer_tok + (cp_layer if rebuilt_maps else 0)
                                 if lay.recompute else 0)
                         + out["mlp_backward_transient"] + out["recurrent_states"]
                         + out["cp_allgather_buffer"]),
    }
    out["autocast_weight_copies"] = 2 * P_l if bf16 else 0
    out["loss_forward_transient"] = loss["forward"]
    out["loss_backward_transient"] = loss["backward"]
    out = {k: int(v) for k, v in out.items()}
    peak_at = max(moments, key=moments.get)
    allocated = int(static + moments[peak_at])
    out["allocated"] = allocated
    out["reserve"] = int(reserve_gib * GIB)
    out["total"] = allocated + out["reserve"]
    out["moments"] = {k: int(static + v) for k, v in moments.items()}
    out["peak_at"] = peak_at
    out["params_on_rank"] = P_l
    out["tokens_per_rank"] = T_l
    return out


def layouts_for(gpus: int, num_heads: int, allow_tp: bool = True):
    """(tp, cp) pairs with tp · cp = gpus, tp dividing num_heads (PP = 1, DP = 1: one sequence)."""
    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp == 0 and num_heads % tp == 0 and (allow_tp or tp == 1):
            out.append((tp, gpus // tp))
    return out


def longest_context(cfg, gpus: int, card_gib: float, *, precision: str = "bf16",
                    recompute=(False, True), reserve_gib: float = 3.0, allow_tp: bool = True,
                    multiple: int = 1024, distributed_optimizer: bool = True,
                    offload: bool = False) -> dict | None:
    """The longest seq_len (a multiple of `multiple` and of cp · chunk) that fits `card_gib` per
    GPU with micro_batch 1, over the (tp, cp) layouts of `gpus` and both recompute settings;
    None if not even `multiple` tokens fit. Memory grows with seq_len, so a bisection finds it.
    offload: recompute keeps the layer inputs in host memory (train.recompute_offload)."""
    best = None
    for tp, cp in layouts_for(gpus, cfg.num_heads, allow_tp):
        step = _lcm(multiple, cp * cfg.chunk_size)
        for rc in recompute:
            def fits(n):
                lay = Layout(tp=tp, cp=cp, seq_len=n * step, precision=precision, recompute=rc,
                             recompute_offload=offload and rc, distributed_optimizer=distributed_optimizer)
                return estimate(cfg, lay, reserve_gib=reserve_gib)["total"] <= card_gib * GIB
            if not fits(1):
                continue
            lo, hi = 1, 2
            while fits(hi):
                lo, hi = hi, hi * 2
                if hi > 2 ** 24:
                    break
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            n = lo * step
            if best is None or n > best["seq_len"]:
                lay = Layout(tp=tp, cp=cp, seq_len=n, precision=precision, recompute=rc,
                             recompute_offload=offload and rc, distributed_optimizer=distributed_optimizer)
                best = {"seq_len": n, "tp": tp, "cp": cp, "recompute": rc,
                        "recompute_offload": offload and rc,
                        "distributed_optimizer": distributed_optimizer,
                        "estimate": estimate(cfg, lay, reserve_gib=reserve_gib)}
    return best


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)
