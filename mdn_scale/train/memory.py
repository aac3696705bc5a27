"""Per-GPU memory of a training config, and the longest context that fits (tools/estimate_memory.py).

An itemised model of what our trainer keeps on one GPU: every term is a count of stored tensors
times their width and element size, written out below so that it can be checked by hand and
against measured peaks (tests/gpu/test_longctx_memory_gpu.py). Sizes in bytes.

Notation (per rank): d hidden size, L_s layers on the heaviest pipeline stage, H_l = H/TP heads,
K, V head dims, F_l = F/TP MLP width, Vp_l = padded vocab/TP, C chunk size, g = 4 gate
projections with momentum (3 without), T_l = micro_batch · seq_len / CP tokens per rank,
a = 2 (bf16) or 4 (fp32) activation bytes, N = segments per micro-batch (documents + rows).

Static
    parameters   4 · P_l              fp32 weights (P_l: this rank's parameters, below)
    gradients    4 · P_l              fp32 .grad
    optimizer    8 · P_l              AdamW exp_avg and exp_avg_sq, fp32; with
                 / (DP · CP)          parallel.distributed_optimizer (ZeRO-1 over dp×cp) each rank
                                      keeps its share
    autocast     2 · P_l (bf16 only)  autocast's bf16 copies of the weights, cached for the step
  P_l = L_s · (matmul params of a layer / TP + 2d + per-head params/TP + convs/TP + V)
        + Vp_l · d (embedding, first stage) + Vp_l · d + d (head and final norm, last stage);
        the heaviest stage holds both ends when PP = 1.

Activations kept for the backward, per token of one MDN layer
  around the op        d(4 + a)          norm input (fp32 residual) and output
                       (2H_lK + 2H_lV + g·H_l) · a     in_proj output (q, k, v, gates are views)
                       2 (2H_lK + H_lV) · a            conv outputs and their SiLU
                       H_l K · a                       q after the output correction
                       16 · 4 · H_l                    gate math in fp32 ([T, H] tensors)
                       H_l V (2a + 12)                 op output, gated RMSNorm (fp32 x, y, σ(g))
                       d(4 + a) + 4 F_l · a            second norm; SwiGLU fc1 (2F), act, silu
  the MDN op (kernels/mdn/chunk.py; fp32 compute dtype), per token and head
                       4 · (4K + (2K + V))             l2-normalised q, k (in and out), chunk copies
                       4 · 13 C                        C×C per chunk: decays, Γ, Γ⁻, A, (I+A)⁻¹, q kᵀ…
                       4 · (2(V + 2K) + 2K + V + 2K + V) (I+A)⁻¹ rhs and solution (U, Y, Z),
                                                       Kg, Km, W, chunk_output's e^{la}q, γq, o
                       a' · (4K + C + 2(V + 2K))       bf16 operand copies (a' = 2 when bf16, else 0):
                                                       StatePass's Y, Z, Kg, Km and the products'
                       4 · 2 K V / C                   S0s, M0s: the (S, M) pair entering each chunk
  (The pair term dominates at large K·V: 1.3B, K=256, V=512, C=64 → 16 KiB per token and head.)

Recompute (train.recompute: every layer keeps only its input)
    kept         L_s · T_l · 4d            the fp32 layer inputs
    rebuilt      one layer's activations above, during that layer's backward
  without recompute: L_s · T_l · (per-layer activations).
Backward workspace: one layer's op gradients at a time ≈ its op activations (the state pass's
  dS_end, dM_end mirror S0s, M0s; dW, dU, dY… mirror the chunk tensors).
Loss (last stage): T_l · Vp_l · (a + 4 + 4): logits (a), the fp32 copy and the softmax Megatron's
  vocab-parallel cross entropy keeps; plus T_l · d · 4 for the embedding output (first stage).
Recurrent states: 2 · 2 · N · H_l · K · V · 4 (initial and final pairs, and their gradients) per layer
  in flight (one layer).
CP (R = CP ranks; DESIGN §5): per layer kept for the backward (R − 1) · H_l · (2K)² · 4 (the later
  ranks' maps and this rank's), all layers without recompute; the all-gather buffer
  R · H_l · 2K (2K + V) · 4 once (transient).
Reserve: CUDA context, NCCL buffers and allocator slack, a constant (default 3 GiB); measured
  peaks (torch.cuda.max_memory_allocated) leave it out, so `allocated` is what to compare them with.

What this does not model: softmax-attention layers' activations beyond the projections (hybrid
stacks are estimated as if every layer were recurrent, with the attention layers' own
parameters), pipeline microbatches in flight (1F1B keeps up to PP microbatches on stage 0:
multiplied in as `in_flight`), ZeRO-1's uneven split (parameters are not cut: a share is whole
tensors, so the largest rank's share can exceed 1/(DP·CP)).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    segments: int = 0  # N: segments per micro-batch (0: one per sequence)
    distributed_optimizer: bool = False  # ZeRO-1: Adam moments sharded over dp×cp

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
        return p["matmul"] // tp + (p["other"] - replicated) // tp + replicated

    layers = sorted((local(t) for t in types), reverse=True)[:per_stage]
    ends = Vp_l * d + (Vp_l * d + d)
    if lay.pp > 1:
        ends = max(Vp_l * d, Vp_l * d + d)
    return sum(layers) + ends


def layer_activation_terms(cfg, lay: Layout) -> dict:
    """Bytes per token of one recurrent layer, split into 'around_op' and 'op'."""
    a = _act_bytes(lay.precision)
    low = 2 if lay.precision == "bf16" else 0
    d, K, V, C = cfg.hidden_size, cfg.head_k_dim, cfg.head_v_dim, cfg.chunk_size
    H_l = cfg.num_heads // lay.tp
    F_l = cfg.ffn_size // lay.tp
    g = 4 if cfg.momentum else 3
    around = (d * (4 + a) + (2 * H_l * K + 2 * H_l * V + g * H_l) * a
              + 2 * (2 * H_l * K + H_l * V) * a + H_l * K * a + 16 * 4 * H_l
              + H_l * V * (2 * a + 12) + d * (4 + a) + 4 * F_l * a)
    per_head = (4 * (4 * K + 2 * K + V) + 4 * 13 * C
                + 4 * (2 * (V + 2 * K) + 2 * K + V + 2 * K + V)
                + low * (4 * K + C + 2 * (V + 2 * K)))
    pair = 4 * 2 * K * V / C
    return {"around_op": around, "op_chunk_tensors": H_l * per_head, "op_state_pairs": H_l * pair}


def estimate(cfg, lay: Layout, *, reserve_gib: float = 3.0) -> dict:
    """Per-GPU bytes by component; 'allocated' (what max_memory_allocated measures) and 'total'."""
    for k in ("tp", "pp", "cp", "dp", "micro_batch", "seq_len"):
        if getattr(lay, k) < 1:
            raise ValueError(f"{k} must be >= 1 (got {getattr(lay, k)})")
    if (lay.micro_batch * lay.seq_len) % lay.cp:
        raise ValueError(f"micro_batch × seq_len = {lay.micro_batch * lay.seq_len} is not divisible by cp = {lay.cp}")
    if cfg.num_heads % lay.tp:
        raise ValueError(f"num_heads = {cfg.num_heads} is not divisible by tp = {lay.tp}")
    a = _act_bytes(lay.precision)
    T_l = lay.tokens_per_rank
    d, K, V = cfg.hidden_size, cfg.head_k_dim, cfg.head_v_dim
    H_l = cfg.num_heads // lay.tp
    L_s = -(-cfg.num_layers // lay.pp)
    Vp_l = cfg.padded_vocab_size(lay.tp) // lay.tp
    P_l = rank_params(cfg, lay)
    terms = layer_activation_terms(cfg, lay)
    per_layer_tok = sum(terms.values())
    op_tok = terms["op_chunk_tensors"] + terms["op_state_pairs"]
    in_flight = lay.pp  # 1F1B: stage 0 holds up to PP microbatches' activations
    N = lay.segments or lay.micro_batch
    R = lay.cp
    cp_kept = (R - 1) * H_l * (2 * K) ** 2 * 4 if R > 1 else 0
    out = {
        "parameters": 4 * P_l,
        "gradients": 4 * P_l,
        "optimizer": 8 * P_l / (lay.dp * lay.cp if lay.distributed_optimizer else 1),
        "autocast_weight_copies": 2 * P_l if lay.precision == "bf16" else 0,
    }
    if lay.recompute:
        out["activations_kept"] = in_flight * L_s * T_l * 4 * d
        out["activations_rebuilt_layer"] = T_l * per_layer_tok
        out["cp_maps_kept"] = cp_kept
    else:
        out["activations_kept"] = in_flight * L_s * T_l * per_layer_tok
        out["activations_rebuilt_layer"] = 0
        out["cp_maps_kept"] = in_flight * L_s * cp_kept
    out["backward_workspace"] = T_l * op_tok
    out["loss_logits"] = T_l * Vp_l * (a + 8) + T_l * d * 4
    out["recurrent_states"] = 2 * 2 * N * H_l * K * V * 4
    out["cp_allgather_buffer"] = R * H_l * 2 * K * (2 * K + V) * 4 if R > 1 else 0
    out = {k: int(v) for k, v in out.items()}
    allocated = sum(out.values())
    out["allocated"] = allocated
    out["reserve"] = int(reserve_gib * GIB)
    out["total"] = allocated + out["reserve"]
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
                    multiple: int = 1024, distributed_optimizer: bool = True) -> dict | None:
    """The longest seq_len (a multiple of `multiple` and of cp · chunk) that fits `card_gib` per
    GPU with micro_batch 1, over the (tp, cp) layouts of `gpus` and both recompute settings;
    None if not even `multiple` tokens fit. Memory grows with seq_len, so a bisection finds it."""
    best = None
    for tp, cp in layouts_for(gpus, cfg.num_heads, allow_tp):
        step = _lcm(multiple, cp * cfg.chunk_size)
        for rc in recompute:
            def fits(n):
                lay = Layout(tp=tp, cp=cp, seq_len=n * step, precision=precision, recompute=rc,
                             distributed_optimizer=distributed_optimizer)
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
                             distributed_optimizer=distributed_optimizer)
                best = {"seq_len": n, "tp": tp, "cp": cp, "recompute": rc,
                        "distributed_optimizer": distributed_optimizer,
                        "estimate": estimate(cfg, lay, reserve_gib=reserve_gib)}
    return best


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)
