"""The MDN recurrence as a plain token loop (DESIGN.md §3): the reference every path must match.

Slow and simple on purpose. Works in any dtype; tests run it in float64.
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (the eps keeps a zero vector at zero)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def mdn_recurrent_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_mu: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    p_times_alpha: bool = True,
):
    """Token-by-token MDN.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_alpha, log_mu, beta, eta: [B, T, H].
        initial_state: (S0, M0), each [N, H, K, V] (N = B, or the number of sequences when
            cu_seqlens is given); None means zeros.
        cu_seqlens: [N + 1] int offsets of packed sequences (requires B == 1); the state is
            reset to the sequence's initial state at each start.
    Returns:
        o: [B, T, H, V] in the dtype of v (computed in the dtype of the inputs' promotion);
        final: (S, M), each [N, H, K, V], or None.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dt = torch.promote_types(q.dtype, torch.float32) if q.dtype != torch.float64 else torch.float64
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cs = cu_seqlens.tolist()
        bounds = [(0, cs[i], cs[i + 1]) for i in range(len(cs) - 1)]
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    alpha, mu = log_alpha.to(dt).exp(), log_mu.to(dt).exp()
    beta, eta = beta.to(dt), eta.to(dt)
    o = torch.zeros(B, T, H, V, dtype=dt, device=v.device)
    finals_s, finals_m = [], []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            S = q.new_zeros(H, K, V)
            M = q.new_zeros(H, K, V)
        else:
            S = initial_state[0][n].to(dt)
            M = initial_state[1][n].to(dt)
        for t in range(start, end):
            kt = k[b, t]  # [H, K]
            a = alpha[b, t][:, None, None]
            p = kt * alpha[b, t][:, None] if p_times_alpha else kt
            w = torch.einsum("hk,hkv->hv", p, S) - v[b, t]  # [H, V]
            M = mu[b, t][:, None, None] * M + eta[b, t][:, None, None] * kt[:, :, None] * w[:, None, :]
            S = a * S - beta[b, t][:, None, None] * M
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        finals_s.append(S)
        finals_m.append(M)
    final = (torch.stack(finals_s), torch.stack(finals_m)) if output_final_state else None
    return o.to(v.dtype) if v.dtype != dt else o, final


def gated_delta_rule_reference(q, k, v, log_alpha, beta, *, scale=None, initial_state=None,
                               use_qk_l2norm=True):
    """Plain gated delta rule (GDN), token loop: S_t = α_t (I − β_t k kᵀ) S_{t−1} + β_t k v_tᵀ.

    For the μ ≡ 0 check: MDN with μ = 0 and p_times_alpha is GDN with step size β·η.
    q, k: [B, T, H, K]; v: [B, T, H, V]; log_alpha, beta: [B, T, H]; state [B, H, K, V].
    """
    B, T, H, K = k.shape
    if scale is None:
        scale = K ** -0.5
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    S = initial_state.clone() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    o = torch.zeros_like(v)
    for t in range(T):
        kt, a, bt = k[:, t], log_alpha[:, t].exp(), beta[:, t]
        S = a[..., None, None] * S
        pred = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + bt[..., None, None] * kt[..., None] * (v[:, t] - pred)[..., None, :]
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S
