"""HF transformers model of an mdn_scale checkpoint: MDN / GDN / hybrid / Transformer.

Self-contained (torch + transformers; mdn_kernels optional): exported folders ship it as
trust_remote_code. The math is DESIGN §6 of mdn_scale, written per token for decoding:

    q, k, v = SiLU(causal depthwise conv (width W, no bias) of x W_q, x W_k, x W_v)
    log α = −exp(A_log)·softplus(x W_a + dt_bias);  log μ = max(min_log_mu, −exp(Mu_log)·softplus(x W_m + mu_bias))
    η = tanh(x W_e / τ) + 1, τ = sqrt(d / tau_factor);  β = sigmoid(x W_b)
    θ = arctan(η·exp(log_factor)):  β ← sin²θ·β;  log α ← log cos²θ + log α
    q ← q − exp(D_log)·k;  q̂, k̂ = l2-normalised q, k
    w = α k̂ᵀ S − vᵀ;  M ← μ M + η k̂ w;  S ← α S − β M;  o = K^-1/2 q̂ᵀ S
    out = W_o (RMSNorm_V(o) ⊙ sigmoid(x W_g))
GDN layers ("gdn") are the same with μ ≡ 0 and no m_proj / Mu_log / mu_bias. Attention layers:
softmax attention with RoPE (halves layout). Blocks: pre-norm RMSNorm, SwiGLU MLP, untied head.

Decoding keeps, per recurrent layer, the last W−1 pre-conv inputs and the state pair (S, M) in
fp32; per attention layer the keys and values. `generate` here is a plain recurrent loop
(greedy or sampling); it does not depend on the GenerationMixin cache API, which differs between
transformers versions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mdn import MDNConfig

try:  # the chunkwise op of mdn_scale, for long prefills
    from mdn_kernels import mdn_chunk as _mdn_chunk
except Exception:  # pragma: no cover - depends on the environment
    _mdn_chunk = None


def _l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _f32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MDNRMSNorm(nn.Module):
    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = _f32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * _f32(self.weight)).to(x.dtype)


class MDNCache:
    """Decoding state: per layer a dict. Recurrent layers: "conv" {q, k, v: [B, W−1, C]},
    "S", "M": [B, H, K, V] fp32. Attention layers: "k", "v": [B, h, T, D]."""

    def __init__(self, num_layers):
        self.layers = [dict() for _ in range(num_layers)]
        self.seen_tokens = 0

    def reorder(self, index):
        for st in self.layers:
            for key, val in list(st.items()):
                if isinstance(val, dict):
                    st[key] = {n: t.index_select(0, index) for n, t in val.items()}
                else:
                    st[key] = val.index_select(0, index)


def mdn_step_loop(q, k, v, log_alpha, log_mu, beta, eta, S, M, scale):
    """The recurrence token by token. q, k: [B, T, H, K]; v: [B, T, H, V]; gates [B, T, H];
    S, M: [B, H, K, V] fp32. Returns o [B, T, H, V] (fp32) and the new (S, M)."""
    dt = S.dtype
    q, k = _l2norm(q.to(dt)), _l2norm(k.to(dt))
    v = v.to(dt)
    alpha, mu, beta, eta = (g.to(dt) for g in (log_alpha.exp(), log_mu.exp(), beta, eta))
    outs = []
    for t in range(q.shape[1]):
        kt, a = k[:, t], alpha[:, t][..., None, None]
        w = torch.einsum("bhk,bhkv->bhv", kt * alpha[:, t][..., None], S) - v[:, t]
        M = mu[:, t][..., None, None] * M + eta[:, t][..., None, None] * kt[..., None] * w[..., None, :]
        S = a * S - beta[:, t][..., None, None] * M
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S, M


class MDNMixer(nn.Module):
    def __init__(self, config: MDNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.momentum = config.mdn_layer_types[layer_idx] == "mdn"
        d, H, K = config.hidden_size, config.num_heads, config.head_k_dim
        V = K * config.expand_v
        self.H, self.K, self.V, self.W = H, K, V, config.conv_size
        self.tau = math.sqrt(d / config.tau_factor)
        self.min_log_mu = config.min_log_mu
        self.backend = config.recurrent_backend
        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.k_proj = nn.Linear(d, H * K, bias=False)
        self.v_proj = nn.Linear(d, H * V, bias=False)
        self.g_proj = nn.Linear(d, H * V, bias=False)
        self.a_proj = nn.Linear(d, H, bias=False)
        self.b_proj = nn.Linear(d, H, bias=False)
        if self.momentum:
            self.m_proj = nn.Linear(d, H, bias=False)
        self.e_proj = nn.Linear(d, H, bias=False)
        self.o_proj = nn.Linear(H * V, d, bias=False)
        W = config.conv_size
        self.q_conv1d = nn.Conv1d(H * K, H * K, W, groups=H * K, bias=False)
        self.k_conv1d = nn.Conv1d(H * K, H * K, W, groups=H * K, bias=False)
        self.v_conv1d = nn.Conv1d(H * V, H * V, W, groups=H * V, bias=False)
        names = ["A_log", "dt_bias", "log_factor", "D_log"] + (["Mu_log", "mu_bias"] if self.momentum else [])
        for n in names:
            setattr(self, n, nn.Parameter(torch.zeros(H)))
        self.o_norm = MDNRMSNorm(V, config.norm_eps)

    def _conv(self, x, conv, prev):
        """x: [B, T, C]; prev: [B, W−1, C] or None -> (SiLU(conv), new prev)."""
        W = self.W
        if prev is None:
            prev = x.new_zeros(x.shape[0], W - 1, x.shape[2])
        xp = torch.cat([prev.to(x.dtype), x], 1)  # [B, T+W−1, C]
        w = conv.weight[:, 0, :]  # [C, W]
        T = x.shape[1]
        y = sum(xp[:, j:j + T] * w[:, j] for j in range(W))
        return F.silu(y), xp[:, -(W - 1):] if W > 1 else xp[:, :0]

    def forward(self, x, state: Optional[dict]):
        B, T, _ = x.shape
        H, K, V = self.H, self.K, self.V
        conv_prev = state.get("conv", {}) if state is not None else {}
        q, cq = self._conv(self.q_proj(x), self.q_conv1d, conv_prev.get("q"))
        k, ck = self._conv(self.k_proj(x), self.k_conv1d, conv_prev.get("k"))
        v, cv = self._conv(self.v_proj(x), self.v_conv1d, conv_prev.get("v"))
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        a, b, e = _f32(self.a_proj(x)), _f32(self.b_proj(x)), _f32(self.e_proj(x))
        log_alpha = -_f32(self.A_log).exp() * F.softplus(a + _f32(self.dt_bias))
        if self.momentum:
            m = _f32(self.m_proj(x))
            log_mu = (-_f32(self.Mu_log).exp() * F.softplus(m + _f32(self.mu_bias))).clamp(min=self.min_log_mu)
        else:
            log_mu = torch.full_like(log_alpha, float("-inf"))
        eta = torch.tanh(e / self.tau) + 1.0
        x2 = (eta * _f32(self.log_factor).exp()).pow(2)
        beta = torch.sigmoid(b) * x2 / (1.0 + x2)  # sin²θ·β with tan θ = η·exp(log_factor)
        log_alpha = log_alpha - torch.log1p(x2)  # + log cos²θ
        q = q - (_f32(self.D_log).exp()[:, None] * k).to(q.dtype)
        sdt = torch.promote_types(x.dtype, torch.float32)
        if state is not None and "S" in state:
            S, M = state["S"], state["M"]
        else:
            S = torch.zeros(B, H, K, V, dtype=sdt, device=x.device)
            M = torch.zeros_like(S)
        if _mdn_chunk is not None and self.backend == "auto" and T > 1:
            o, (S, M) = _mdn_chunk(q, k, v, log_alpha, log_mu, beta, eta, initial_state=(S, M),
                                   output_final_state=True)
        else:
            o, S, M = mdn_step_loop(q, k, v, log_alpha, log_mu, beta, eta, S, M, K ** -0.5)
        if state is not None:
            state.update(conv={"q": cq, "k": ck, "v": cv}, S=S, M=M)
        g = self.g_proj(x).view(B, T, H, V)
        o = self.o_norm(o)  # in >= fp32
        o = (_f32(o) * torch.sigmoid(_f32(g))).to(x.dtype)
        return self.o_proj(o.reshape(B, T, H * V))


def _rope(x, pos, theta):
    """x: [B, h, T, D]; pos: [T] absolute positions."""
    D = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=dt) / D))
    ang = pos.to(dt)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    xf = x.to(dt)
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class MDNAttention(nn.Module):
    def __init__(self, config: MDNConfig, layer_idx: int):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.h, self.D, self.theta = h, d // h, config.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, state: Optional[dict], offset: int):
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.h, self.D).transpose(1, 2)  # noqa: E731
        pos = torch.arange(offset, offset + T, device=x.device)
        q = _rope(split(self.q_proj(x)), pos, self.theta)
        k = _rope(split(self.k_proj(x)), pos, self.theta)
        v = split(self.v_proj(x))
        if state is not None:
            if "k" in state:
                k = torch.cat([state["k"], k], 2)
                v = torch.cat([state["v"], v], 2)
            state.update(k=k, v=v)
        Tk = k.shape[2]
        mask = torch.arange(Tk, device=x.device)[None, :] <= (torch.arange(T, device=x.device) + Tk - T)[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MDNMLP(nn.Module):
    def __init__(self, config: MDNConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MDNBlock(nn.Module):
    def __init__(self, config: MDNConfig, layer_idx: int):
        super().__init__()
        self.is_attention = config.mdn_layer_types[layer_idx] == "attention"
        self.attn_norm = MDNRMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MDNAttention(config, layer_idx) if self.is_attention else MDNMixer(config, layer_idx)
        self.mlp_norm = MDNRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MDNMLP(config)

    def forward(self, x, state, offset):
        h = self.attn_norm(x)
        h = self.attn(h, state, offset) if self.is_attention else self.attn(h, state)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class MDNPreTrainedModel(PreTrainedModel):
    config_class = MDNConfig
    base_model_prefix = "model"
    _no_split_modules = ["MDNBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        # Only used for weights missing from a checkpoint; trained values come from the file.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, MDNRMSNorm):
            module.weight.fill_(1.0)


class MDNModel(MDNPreTrainedModel):
    def __init__(self, config: MDNConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MDNBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MDNRMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids, cache: Optional[MDNCache] = None):
        x = self.embeddings(input_ids)
        offset = cache.seen_tokens if cache is not None else 0
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.layers[i] if cache is not None else None, offset)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return self.norm(x)


@dataclass
class MDNCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[MDNCache] = None


class MDNForCausalLM(MDNPreTrainedModel):
    def __init__(self, config: MDNConfig):
        super().__init__(config)
        self.model = MDNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, cache: Optional[MDNCache] = None,
                use_cache: bool = False, past_key_values=None, **kwargs):
        """input_ids [B, T] -> logits [B, T, vocab]. attention_mask must be None or all ones
        (no padding inside the recurrence). labels: next-token loss with HF's shift."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("MDNForCausalLM: padded batches (attention_mask with zeros) are not supported")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = MDNCache(self.config.num_hidden_layers)
        logits = self.lm_head(self.model(input_ids, cache))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return MDNCausalLMOutput(loss=loss, logits=logits, cache=cache)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: Optional[int] = None, attention_mask=None, **unused):
        """Prefill the prompt (chunkwise when mdn_kernels is installed), then decode one token
        at a time with the recurrent step. Returns [B, T + new] token ids."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("generate: padded prompts are not supported")
        cache = MDNCache(self.config.num_hidden_layers)
        logits = self.forward(input_ids, cache=cache).logits[:, -1]
        out = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            scores = logits.float()
            if self.config.original_vocab_size:
                scores[:, self.config.original_vocab_size:] = float("-inf")  # vocab padding
            if do_sample:
                scores = scores / max(temperature, 1e-6)
                if top_k:
                    kth = torch.topk(scores, top_k, -1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                if top_p < 1.0:
                    sp, si = torch.sort(scores, descending=True)
                    cum = sp.softmax(-1).cumsum(-1)
                    drop = cum - sp.softmax(-1) > top_p
                    scores = scores.scatter(1, si, sp.masked_fill(drop, float("-inf")))
                nxt = torch.multinomial(scores.softmax(-1), 1)
            else:
                nxt = scores.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt[:, 0] == eos_token_id
            out = torch.cat([out, nxt], 1)
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self.forward(nxt, cache=cache).logits[:, -1]
        return out


__all__ = ["MDNForCausalLM", "MDNModel", "MDNPreTrainedModel", "MDNCache", "mdn_step_loop"]
