"""`mdn_chunk`: the public MDN op (DESIGN §8). Validates inputs, then dispatches."""
from __future__ import annotations

import torch

from .chunk import chunk_mdn
from .layout import host_cu_seqlens

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")


def _check_shape(name: str, t, expected: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(t.shape)}")


def check_cu_seqlens(cu_seqlens, B: int, total: int, what: str, end_rule: str) -> int:
    """Packed-sequence offsets [N + 1]: integer, from 0 to `total`, strictly increasing, B == 1.
    Returns N. `what` and `end_rule` word the errors (local or global offsets)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N + 1] of {what}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need B == 1, got B={B}")
    cs = host_cu_seqlens(cu_seqlens)  # one device-to-host copy per cu tensor, not per call
    if int(cs[0]) != 0 or int(cs[-1]) != total:
        raise ValueError(f"cu_seqlens {end_rule}, got {int(cs[0])}..{int(cs[-1])}")
    if bool((cs[1:] <= cs[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (no empty sequences)")
    return cu_seqlens.numel() - 1


def check_initial_state(initial_state, shape: tuple, what: str, device) -> None:
    """initial_state: None or a pair (S0, M0) of `shape` on `device`."""
    if initial_state is None:
        return
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
        raise ValueError("initial_state must be a pair (S0, M0), each [N, H, K, V]")
    for name, s in zip(("initial_state[0] (S0)", "initial_state[1] (M0)"), initial_state):
        _check_shape(name, s, shape, what)
        if s.device != device:
            raise ValueError(f"{name} is on {s.device} but k is on {device}")


def validate_inputs(q, k, v, log_alpha, log_mu, beta, eta, initial_state, cu_seqlens, backend):
    """Raise ValueError naming the first bad argument; return the resolved backend."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a 4-D tensor [B, T, H, K], got "
                         f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    B, T, H, K = k.shape
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    V = v.shape[-1]
    _check_shape("q", q, (B, T, H, K), "[B, T, H, K]")
    for name, g in (("log_alpha", log_alpha), ("log_mu", log_mu), ("beta", beta), ("eta", eta)):
        _check_shape(name, g, (B, T, H), "[B, T, H]")
    for name, t in (("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha), ("log_mu", log_mu),
                    ("beta", beta), ("eta", eta)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    if K < 1 or V < 1 or T < 1:
        raise ValueError(f"T, K and V must be positive, got T={T}, K={K}, V={V}")
    N = B if cu_seqlens is None else check_cu_seqlens(
        cu_seqlens, B, T, "sequence offsets", f"must start at 0 and end at T={T}")
    check_initial_state(initial_state, (N, H, K, V), "[N, H, K, V]", k.device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if k.is_cuda else "torch"
    return backend


def mdn_chunk(
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
    cp_group=None,
    backend: str = "auto",
    chunk_size: int = 64,
    cp_mode: str = "allgather",
):
    """Momentum DeltaNet, chunkwise (DESIGN §3–4).

    Args:
        q, k: [B, T, H, K] queries and keys (l2-normalised inside when use_qk_l2norm).
        v: [B, T, H, V] values.
        log_alpha, log_mu: [B, T, H] log decay of the state and of the momentum (≤ 0).
        beta, eta: [B, T, H] step sizes of the state update and of the momentum input.
        scale: output scale; default K ** -0.5.
        initial_state: (S0, M0), each [N, H, K, V], fp32 (N = B, or the number of packed
            sequences); default zeros.
        output_final_state: also return the final pair (S, M), each [N, H, K, V] fp32.
        cu_seqlens: [N + 1] offsets of packed sequences (B must be 1); each starts afresh from
            its own initial state.
        p_times_alpha: w_t reads the state at α_t k_t (default) instead of k_t.
        cp_group: context-parallel process group, or None. With a group, each rank passes its
            contiguous slice of T tokens (rank order) of every sequence and gets the matching
            slice of the CP = 1 result; cu_seqlens are then GLOBAL offsets (same on every rank)
            and the initial/final state conventions are those of mdn_kernels.cp.api.
        backend: "triton" (CUDA tensors), "torch" (anywhere) or "auto".
        chunk_size: tokens per chunk (64; a power of two ≥ 16 for Triton).
        cp_mode: "allgather" (default) or "ring": how the state crosses ranks under cp_group.
    Returns:
        o: [B, T, H, V] in v's dtype; final: (S, M) or None.
    """
    if cp_mode not in ("allgather", "ring"):
        raise ValueError(f"cp_mode must be 'allgather' or 'ring', got {cp_mode!r}")
    if cp_group is not None:
        from mdn_kernels.cp.api import mdn_chunk_cp
        return mdn_chunk_cp(q, k, v, log_alpha, log_mu, beta, eta, scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                            p_times_alpha=p_times_alpha, cp_group=cp_group, cp_mode=cp_mode,
                            backend=backend, chunk_size=chunk_size)
    backend = validate_inputs(q, k, v, log_alpha, log_mu, beta, eta, initial_state, cu_seqlens,
                              backend)
    if backend == "triton" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the triton backend, got {chunk_size}")
    if scale is None:
        scale = k.shape[-1] ** -0.5
    return chunk_mdn(q, k, v, log_alpha, log_mu, beta, eta, scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state,
                     cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                     p_times_alpha=p_times_alpha, backend=backend, chunk_size=chunk_size)
