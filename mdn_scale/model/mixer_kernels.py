"""Which kernels run the mixer's elementwise blocks (model.mixer_kernels), and the FLA calls.

Two blocks of the mixer are memory-bound elementwise code that eager PyTorch runs as many
kernels with fp32 intermediates (H100 profile of the 400M step,
benchmarks/results/model_h100_mdn_400m_v2_profile.txt): the q|k|v causal conv + SiLU and the
gated output norm RMSNorm(o)·w·σ(g). fla-core (optional dependency, import name `fla`) has fused
Triton kernels for both; benchmarks/results/conv_h100.json measured the conv at 3.2× the eager
speed with the same error against float64. The eager code in mixer.py stays the reference and the
CPU path: FLA's kernels autotune, which asks Triton's driver, so they cannot run on CPU even under
the interpreter (DESIGN §9). Only tests/model/test_mixer_kernels_fla.py runs them there, with each
autotuner pinned to one config, against the eager code (skipped where `fla` does not import).

  eager  always the eager code;
  fla    FLA's kernels (an error where they cannot run: no `fla`, no CUDA, float64);
  auto   FLA's kernels on CUDA in 16/32-bit when `fla` imports, else eager.
Under context parallelism FLA's conv runs over the halo-padded slice as one packed stream
(conv_silu_fla_padded; mdn_kernels.cp.padded_doc_offsets gives its documents), or, opt-in
(MDN_CP_CONV_HALO=state, see cp_conv_halo), over the slice alone with the previous rank's last
rows as its first document's initial state (conv_silu_fla_halo_state). MDN_CONV=eager
keeps the eager conv while the rest follows model.mixer_kernels (the benchmarks' A/B switch, as
MDN_GATES below).

The gates (MDNMixer.gates: log α, log μ, β, η from the a, b, m, e projections) have our own fused
Triton kernel pair (gate_kernels.py; eager, they are ~20 kernels forward and ~40 backward per
layer for a few hundred KB). It needs no FLA and runs on CUDA wherever the setting is not
'eager', for 16/32-bit projections and fp32 gate parameters (use_fused_gates); float64 and CPU
take the eager code, which stays the reference (the CPU tests run the kernels under
TRITON_INTERPRET=1 against it). MDN_GATES=eager keeps the eager gates while the rest follows
model.mixer_kernels (benchmarks compare the two in one run).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from mdn_kernels.mdn.layout import PerTensorCache, device_copy_of_host, host_cu_seqlens

MIXER_KERNELS = ("auto", "fla", "eager")
_FLA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def fla_import_error() -> Optional[str]:
    """None when FLA's conv and gated norm import, else why not (a real import: a present but
    broken install, e.g. without einops, must not pass)."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d  # noqa: F401
        from fla.modules.norm.fused_norm_gate import rms_norm_gated  # noqa: F401
    except Exception as e:  # ImportError, or anything FLA's import-time setup raises
        return f"{type(e).__name__}: {e}"
    return None


def check_fla_usable(choice: str, *, cuda: bool) -> None:
    """Raise ValueError naming model.mixer_kernels when 'fla' is forced where it cannot run."""
    if choice != "fla":
        return
    err = fla_import_error()
    if err is not None:
        raise ValueError("model.mixer_kernels=fla needs fla-core (`pip install fla-core`, import "
                         f"name `fla`), which does not import here ({err}); use 'auto' or 'eager'")
    if not cuda:
        raise ValueError("model.mixer_kernels=fla needs CUDA: FLA's Triton kernels cannot run on "
                         "CPU (they autotune, which needs a GPU driver); use 'auto' or 'eager'")


def use_fla_conv(choice: str, x: torch.Tensor) -> bool:
    """Whether the mixer's conv runs FLA's kernel: use_fla, unless MDN_CONV=eager."""
    env = os.environ.get("MDN_CONV", "")
    if env not in ("", "eager"):
        raise ValueError(f"MDN_CONV must be unset or 'eager', got {env!r}")
    return env != "eager" and use_fla(choice, x)


def use_fla(choice: str, x: torch.Tensor) -> bool:
    """Whether this call runs FLA's kernels for input x (see the module docstring)."""
    if choice == "eager":
        return False
    ok = x.is_cuda and x.dtype in _FLA_DTYPES and fla_import_error() is None
    if choice == "fla" and not ok:
        check_fla_usable("fla", cuda=x.is_cuda)
        raise ValueError(f"model.mixer_kernels=fla: FLA's kernels take float32/16-bit inputs, got "
                         f"{x.dtype}; use 'auto' (eager for other dtypes) or 'eager'")
    return ok


def conv_silu_fla(x: torch.Tensor, weight: torch.Tensor,
                  cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """SiLU(causal depthwise conv) by FLA's Triton kernel: mixer.causal_conv + F.silu.

    x: [B, T, C] (a strided view of the in-projection is fine: the kernel takes strides);
    weight: [C, W] in its own dtype: the kernel reads it as fp32 and returns its gradient in the
    weight's dtype from an fp32 sum, so fp32 weights under bf16 autocast keep the eager path's
    fp32 weight math and fp32 weight gradient (casting them to bf16 would round both).
    cu_seqlens: document offsets (B == 1); they must end at T: FLA writes only tokens inside
    documents (the trainer's segments always cover the stream). Output in x's dtype.
    """
    from fla.modules.causal_conv1d import causal_conv1d

    y, _ = causal_conv1d(x, weight, activation="silu", cu_seqlens=cu_seqlens,
                         chunk_indices=conv_chunk_indices(cu_seqlens))
    return y


def conv_silu_fla_padded(padded: torch.Tensor, weight: torch.Tensor,
                         padded_cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """conv_silu_fla of the last T rows of `padded`, the CP path: padded [B, T + W − 1, C] is
    mdn_kernels.cp.conv_halo's output (the previous rank's last W − 1 rows, then this rank's T);
    padded_cu_seqlens: mdn_kernels.cp.padded_doc_offsets (B == 1), or None (no documents: the
    halo is each row's preceding context, zeros on rank 0). FLA's conv runs over the whole
    padded stream, so the halo's rows get their gradient through the kernel's backward (the
    outputs of the first W − 1 rows are dropped: they belong to the previous rank). Returns
    [B, T, C], a view of the kernel's output."""
    from fla.modules.causal_conv1d import causal_conv1d

    y, _ = causal_conv1d(padded, weight, activation="silu", cu_seqlens=padded_cu_seqlens,
                         chunk_indices=conv_chunk_indices(padded_cu_seqlens))
    return y[:, weight.shape[1] - 1:]


def cp_conv_halo() -> str:
    """MDN_CP_CONV_HALO: how FLA's conv reads the previous rank's last W − 1 rows under CP.
    "padded" (default): [halo | slice] as one packed stream (conv_silu_fla_padded), the path
    measured on the GPUs since session 11. "state" (opt-in): the slice alone, those rows as the
    first document's initial state (conv_silu_fla_halo_state: no [halo | slice] copy, no sliced
    output, the halo's gradient from the kernel's dh0). It matches CP = 1 on the CPU (FLA under
    the Triton interpreter, tests/model/test_mixer_kernels_fla.py) and on two H200s (the
    whole-model CP GPU test gave the padded path's results bit for bit but for the conv weights'
    gradients, summed over other chunks of rows: fp32 rounding); the 1.3B CP = 2 step
    took 880.1 against 887.5 ms, once FLA had autotuned the kernels' initial-state variants
    (its first runs spend minutes there; BENCHMARKS.md, session 21). Not the default: the gain
    is within the calls' spread."""
    v = os.environ.get("MDN_CP_CONV_HALO", "padded")
    if v not in ("state", "padded"):
        raise ValueError(f"MDN_CP_CONV_HALO must be 'state' or 'padded', got {v!r}")
    return v


class _ConvSiluHaloState(torch.autograd.Function):
    """FLA's causal conv + SiLU over this rank's slice, the previous rank's tail as initial
    state (see conv_silu_fla_halo_state). Backward: FLA's, whose dh0 is the tail's gradient,
    sent back to the previous rank; the next rank's is added to this rank's last rows."""

    @staticmethod
    def forward(ctx, x, weight, cu_seqlens, history, group, rank, world):
        from fla.modules.causal_conv1d.ops import _has_non_standard_layout, causal_conv1d_fwd

        from mdn_kernels.cp import previous_rank_tail
        W = weight.shape[1]
        h = W - 1
        state = None
        heads = previous_rank_tail(x, h, group, rank, world)   # every rank takes part
        if history > 0:
            # FLA's state [N, D, W]: column W − j holds the j-th timestep before the document;
            # only the first document's row (every row when unpacked: one per sequence)
            N = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            state = x.new_zeros(N, x.shape[2], W)
            state[:heads.shape[0], :, W - history:] = heads[:, h - history:].transpose(1, 2)
        ctx.fallback = _has_non_standard_layout(x=x)   # as FLA's own autograd function decides
        y, _ = causal_conv1d_fwd(x=x, weight=weight, bias=None, residual=None, initial_state=state,
                                 activation="silu", cu_seqlens=cu_seqlens,
                                 chunk_indices=conv_chunk_indices(cu_seqlens),
                                 layout_fallback=ctx.fallback)
        ctx.save_for_backward(x, weight, state)
        ctx.cu_seqlens, ctx.history, ctx.h = cu_seqlens, history, h
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return y

    @staticmethod
    def backward(ctx, dy):
        from fla.modules.causal_conv1d.ops import causal_conv1d_bwd

        from mdn_kernels.cp import tail_grad_from_next
        x, weight, state = ctx.saved_tensors
        h, history, W = ctx.h, ctx.history, weight.shape[1]
        dx, dw, _, _, dh0 = causal_conv1d_bwd(
            x=x, dy=dy, dht=None, weight=weight, bias=None, residual=None, initial_state=state,
            activation="silu", cu_seqlens=ctx.cu_seqlens,
            chunk_indices=conv_chunk_indices(ctx.cu_seqlens), layout_fallback=ctx.fallback)
        d_heads = None
        if ctx.rank > 0:
            d_heads = dx.new_zeros(x.shape[0], h, x.shape[2])
            if dh0 is not None:
                d_heads[:, h - history:] = dh0[:x.shape[0], :, W - history:].transpose(1, 2)
        recv = tail_grad_from_next(d_heads, dx, h, ctx.group, ctx.rank, ctx.world)
        if recv is not None:
            dx[:, -h:] += recv
        return dx, dw, None, None, None, None, None


def conv_silu_fla_halo_state(x: torch.Tensor, weight: torch.Tensor,
                             local_cu_seqlens: Optional[torch.Tensor], history: int,
                             cp_group) -> torch.Tensor:
    """conv_silu_fla of this rank's slice x [B, T, C] under CP, without padding it: the previous
    rank's last W − 1 rows reach FLA's kernel as the initial state of the slice's first document
    (of every row when unpacked), its last `history` of them, the rest zero.
    local_cu_seqlens, history: mdn_kernels.cp.halo_state_offsets (B == 1), or None and W − 1
    (W − 1 on every rank but 0; unpacked rows continue across ranks). Every token reads the
    same taps as under conv_silu_fla_padded (the CPU tests compare both with CP = 1); the
    halo's gradient comes back through the kernel's dh0. Returns [B, T, C] in x's dtype."""
    from mdn_kernels.cp import check_cp_group
    rank, world = check_cp_group(cp_group)
    W = weight.shape[1]
    if world > 1 and x.shape[1] < W - 1:   # a rank's halo comes from its predecessor alone
        raise ValueError(f"the CP conv needs at least width − 1 = {W - 1} tokens per rank, "
                         f"got T = {x.shape[1]}")
    if not 0 <= history <= W - 1:
        raise ValueError(f"history must be in [0, {W - 1}], got {history}")
    return _ConvSiluHaloState.apply(x, weight, local_cu_seqlens, history, cp_group, rank, world)


FLA_CONV_CHUNK = 64    # the chunk of FLA's causal_conv1d (its chunk_size default) that
                       # conv_chunk_indices must count in
_CONV_CHUNKS = PerTensorCache()


def conv_chunk_indices(cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """FLA's causal_conv1d `chunk_indices` for documents `cu_seqlens` [N + 1]: [NT, 2] rows of
    (document, chunk within it) for chunks of FLA_CONV_CHUNK tokens, in cu_seqlens' dtype and
    device — what FLA's prepare_chunk_indices returns. Made on the host from the host copy of
    cu_seqlens (mdn_kernels.mdn.layout.host_cu_seqlens: no device→host copy where the offsets
    came through device_copy_of_host, as the trainer's do) and copied to the device without a
    host sync, once per cu_seqlens tensor. FLA, left to make them, runs a repeat_interleave
    on the device tensor, which reads its size back: a host sync at each micro-batch's first
    conv and again at its first conv backward (tools/bench_model.py --sync-report, session 19).
    None without documents."""
    if cu_seqlens is None:
        return None

    def build():
        host = host_cu_seqlens(cu_seqlens)
        counts = (host[1:] - host[:-1] + FLA_CONV_CHUNK - 1) // FLA_CONV_CHUNK
        doc = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        first = counts.cumsum(0) - counts            # each document's first chunk
        within = torch.arange(doc.numel()) - first[doc]
        return device_copy_of_host(torch.stack([doc, within], 1).to(cu_seqlens.dtype),
                                   cu_seqlens.device)

    return _CONV_CHUNKS.get(cu_seqlens, ("fla_conv_chunks",), build)


def gated_rmsnorm_fla(o: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of o, times weight, times sigmoid(g), by FLA's fused kernel:
    y = o · rsqrt(mean(o²) + eps) · w · σ(g) in fp32, output in o's dtype (the formula of
    mixer._gated_norm; FLA's activation "sigmoid", not its default "swish" = g·σ(g))."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(o, g.to(o.dtype), weight, None, activation="sigmoid", eps=eps)


def use_fused_gates(choice: str, x: torch.Tensor, params) -> bool:
    """Whether MDNMixer's gates run the Triton kernel pair (gate_kernels.gates_triton) for
    projection x and the per-head gate parameters ``params`` (module docstring); the output
    correction (correction_kernels.correct_q_triton) asks the same for q and D_log."""
    from .gate_kernels import INPUT_DTYPES

    if os.environ.get("MDN_GATES", "") == "eager":  # benchmarks' A/B switch (eager gates only)
        return False
    return (choice != "eager" and x.is_cuda and x.dtype in INPUT_DTYPES
            and all(p.dtype == torch.float32 for p in params))
