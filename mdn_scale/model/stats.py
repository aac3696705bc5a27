"""Parameter counts and FLOPs per token of a ModelConfig (what tools/model_stats.py prints).

FLOP convention: a multiply-add is 2 FLOPs; training = 3 × forward (backward ≈ 2 × forward).
Per token, forward:
  dense matmuls   2 · (parameters in matmuls: projections, MLP, LM head; not the embedding lookup)
  conv            2 · W · (2HK + HV)                     (depthwise, width W)
  recurrence      10 · H · K · V                          (token-loop form of DESIGN §3:
                  w = pᵀS: 2KV; M ← μM + η k w: 3KV; S ← αS − βM: 3KV; o = qᵀS: 2KV)
  chunkwise extra 2 · H · C · (2K + V)                    (the chunk form's intra-chunk C×C
                  products (q kᵀ, k kᵀ, and the C×C times C×V solve/apply), averaged per token;
                  an estimate of what the chunk kernels add over the token loop)
  softmax attn    4 · d · (S + 1) / 2                     (scores + weighted values, causal mean
                  context over a sequence of S tokens)
"""
from __future__ import annotations

from .config import ModelConfig


def layer_params(cfg: ModelConfig, layer_type: str) -> dict:
    d, F = cfg.hidden_size, cfg.ffn_size
    norms = 2 * d
    mlp = 3 * d * F
    if layer_type == "attention":
        hd = cfg.attention_head_dim * cfg.attention_heads
        mixer_mm = d * 3 * hd + hd * d
        return dict(matmul=mixer_mm + mlp, other=norms, total=mixer_mm + mlp + norms)
    H, K, V, W = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.conv_size
    gates = 4 if cfg.momentum else 3  # a, b, (m,) e
    per_head = 6 if cfg.momentum else 4  # A_log, dt_bias, log_factor, D_log, (Mu_log, mu_bias)
    in_proj = d * (2 * H * K + 2 * H * V + gates * H)
    out_proj = H * V * d
    other = W * (2 * H * K + H * V) + per_head * H + V + norms
    mm = in_proj + out_proj + mlp
    return dict(matmul=mm, other=other, total=mm + other)


def model_stats(cfg: ModelConfig, seq_len: int | None = None, tensor_parallel: int = 1) -> dict:
    """Parameter counts (total and by part) and forward / training FLOPs per token."""
    S = seq_len or cfg.seq_len
    d = cfg.hidden_size
    Vp = cfg.padded_vocab_size(tensor_parallel)
    types = cfg.layer_types()
    layers = [layer_params(cfg, t) for t in types]
    emb, head = Vp * d, Vp * d
    total = emb + head + d + sum(x["total"] for x in layers)
    H, K, V, W, C = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.conv_size, cfg.chunk_size
    n_rec = sum(t != "attention" for t in types)
    n_att = len(types) - n_rec
    f_dense = 2 * (sum(x["matmul"] for x in layers) + head)
    f_conv = n_rec * 2 * W * (2 * H * K + H * V)
    f_rec = n_rec * 10 * H * K * V
    f_chunk = n_rec * 2 * H * C * (2 * K + V)
    f_att = n_att * 4 * d * (S + 1) / 2
    fwd = f_dense + f_conv + f_rec + f_chunk + f_att
    return dict(
        layer_types=types,
        params_total=total,
        params_embedding=emb,
        params_lm_head=head,
        params_non_embedding=total - emb,
        params_per_layer={t: layer_params(cfg, t)["total"] for t in sorted(set(types))},
        padded_vocab_size=Vp,
        ffn_hidden_size=cfg.ffn_size,
        seq_len=S,
        flops_per_token_forward=dict(dense_matmul=f_dense, conv=f_conv, recurrence=f_rec,
                                     chunkwise_extra=f_chunk, softmax_attention=f_att, total=fwd),
        flops_per_token_train=3 * fwd,
    )
