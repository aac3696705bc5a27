"""The MDN token mixer as a Megatron-core module (DESIGN §6), with TP, SP, CP and packed documents.

Shapes: the module takes and returns Megatron's [S, B, d] (S is the local sequence: divided by
TP under sequence parallelism, by CP under context parallelism). Inside it works in the op's
[B, T, H, K] layout with the heads of this TP rank (H_l = H / TP).

TP layout: the fused in-projection is column-parallel; each TP rank's rows are, in order,
    q [H_l·K] | k [H_l·K] | v [H_l·V] | g [H_l·V] | a [H_l] | b [H_l] | m [H_l] (mdn only) | e [H_l]
    | pad (zero rows up to a multiple of model.in_proj_row_multiple, where needed)
for its own heads, so "global" weights are not a plain concatenation: sharded_state_dict() splits
the fused weight into one TP-sharded tensor per part (keys `in_proj.weight.q`, ...) and leaves the
pad out, which is what makes checkpoints layout-independent. Per-head parameters ([H_l]) and the
conv weights ([channels_l, W]) split with their heads on dim 0. The output norm weight ([V], shared
by all heads) is replicated; its gradient is summed over TP in the forward graph (see _gated_norm).
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from mdn_kernels import mdn_chunk

from . import mixer_kernels as mk
from .config import ModelConfig
from .sharding import split_sharded_tensor

# Per-head parameters ([H], DESIGN §6 names); the momentum-off mixer ("gdn") has no Mu_log,
# mu_bias and no m rows in the in-projection.
PER_HEAD_PARAMS = ("A_log", "dt_bias", "log_factor", "D_log", "Mu_log", "mu_bias")
MOMENTUM_ONLY = ("Mu_log", "mu_bias", "m")


def _profile_range(name: str):
    """A torch.profiler range (record_function) while a profiler runs (tools/bench_model.py
    --profile: forward time per part of the mixer), else a no-op context."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return _nullcontext()


def _no_init(weight: torch.Tensor) -> None:
    """Megatron init_method that leaves the weight alone (reset_parameters fills it)."""


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def in_proj_parts(cfg: ModelConfig, heads: int) -> list[tuple[str, int]]:
    """(name, rows) of the fused in-projection for `heads` heads, in the fused order."""
    K, V = cfg.head_k_dim, cfg.head_v_dim
    parts = [("q", heads * K), ("k", heads * K), ("v", heads * V), ("g", heads * V),
             ("a", heads), ("b", heads)]
    if cfg.momentum:
        parts.append(("m", heads))
    parts.append(("e", heads))
    return parts


# The in-projection's alignment rows (ModelConfig.in_proj_row_multiple): zero, read by no output,
# left out of checkpoints. The weight carries their count as `in_proj.weight.pad_rows`.
PAD = "pad"


def local_in_proj_parts(cfg: ModelConfig, heads: int) -> list[tuple[str, int]]:
    """in_proj_parts of one TP rank's `heads` heads, plus (PAD, rows) that bring the rank's row
    count up to a multiple of cfg.in_proj_row_multiple where it is not one already."""
    parts = in_proj_parts(cfg, heads)
    pad = -sum(n for _, n in parts) % cfg.in_proj_row_multiple
    return parts + [(PAD, pad)] if pad else parts


def unpadded_numel(p: torch.Tensor) -> int:
    """Elements of a parameter less its alignment rows (what checkpoints and counts hold)."""
    return p.numel() - getattr(p, "pad_rows", 0) * (p.numel() // max(1, p.shape[0]))


_WARNED_ROWS: set = set()


def _warn_unaligned_rows(rows: int, heads: int, cfg: ModelConfig) -> None:
    """Log once per row count when this rank's fused in-projection has a row count that is not a
    multiple of 8: its bf16 output rows are then not 16-byte aligned and cuBLAS falls back to
    slower (SM80) kernels on Hopper for the projection's three products (BENCHMARKS.md, the
    GDN mode at 1.3B: 9234 rows, ~94 ms more per 4K step on an H200)."""
    if rows % 8 == 0 or rows in _WARNED_ROWS:
        return
    _WARNED_ROWS.add(rows)
    logging.getLogger("mdn_scale.model").warning(
        "mixer %r: the fused in-projection has %d rows per tensor-parallel rank (%d local heads), "
        "not a multiple of 8; its products run slower kernels on Hopper GPUs (model."
        "in_proj_row_multiple: 8 pads them)", cfg.mixer, rows, heads)


def per_head_param_names(cfg: ModelConfig) -> list[str]:
    return [n for n in PER_HEAD_PARAMS if cfg.momentum or n not in MOMENTUM_ONLY]


class _OneRank:
    """A process group of one, as far as MDNMixer asks (size(), rank())."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def cp_paths_at_one_rank() -> bool:
    """MDN_CP_EMULATE=1: a layer whose CP group has one rank still takes the CP code paths (the
    eager conv with its halo, the CP op with its all-gathered maps, lean node and segments as
    MDN_CP_LEAN* say), so one GPU shows what one rank of a CP run keeps: a CP = R run at
    R · T tokens holds per rank what this run holds at T tokens, apart from the optimizer's
    share and the R-sized map buffers (benchmarks/longctx_memory.py --emulate-cp)."""
    env = os.environ.get("MDN_CP_EMULATE", "0")
    if env not in ("0", "1"):
        raise ValueError(f"MDN_CP_EMULATE must be 0 or 1, got {env!r}")
    return env == "1"


def _conv_mask(T: int, W: int, cu_seqlens: Optional[torch.Tensor], token_offset: int,
               device, dtype) -> Optional[torch.Tensor]:
    """[T, W]: 1 where tap j of local token t reads its own document, else 0 (None: no
    documents)."""
    if cu_seqlens is None:
        return None
    pos = torch.arange(T, device=device) + token_offset
    cs = cu_seqlens.to(device=device, dtype=torch.long)
    doc_start = cs[torch.searchsorted(cs, pos, right=True) - 1]
    # tap j reads global position pos - (W-1) + j
    src = pos[:, None] - (W - 1) + torch.arange(W, device=device)[None, :]
    return (src >= doc_start[:, None]).to(dtype)


def _conv_terms(padded: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor], T: int):
    y = None
    for j in range(weight.shape[1]):
        term = padded[:, j:j + T] * weight[:, j]
        if mask is not None:
            term = term * mask[:, j, None]
        y = term if y is None else y + term
    return y


class _CausalConvSilu(torch.autograd.Function):
    """SiLU(causal_conv(...)) that keeps only the padded input and the document mask for the
    backward and recomputes the conv there. The composite (causal_conv, then F.silu) keeps the
    conv's output for SiLU's backward in the promoted dtype: fp32 under autocast over fp32
    weights, 4 bytes per channel and token (24 KiB per token at 1.3B), for every rebuilt layer
    that runs the eager conv (always under CP). Same forward values; the input's gradient is
    summed over the taps in fp32 and rounded once (the composite rounds each tap's share)."""

    @staticmethod
    def forward(ctx, padded, weight, mask, T: int):
        y = _conv_terms(padded, weight, mask, T)
        ctx.save_for_backward(padded, weight, mask)
        ctx.T = T
        return F.silu(y)

    @staticmethod
    def backward(ctx, dout):
        padded, weight, mask = ctx.saved_tensors
        T, W = ctx.T, weight.shape[1]
        with torch.no_grad():
            y = _conv_terms(padded, weight, mask, T)
            sig = torch.sigmoid(y)
            dy = dout * sig * (1 + y * (1 - sig))      # aten's silu_backward
            del y, sig
            dpad = torch.zeros(padded.shape, dtype=dy.dtype, device=dy.device)
            dw = torch.empty(weight.shape, dtype=dy.dtype, device=dy.device)
            for j in range(W):
                dterm = dy if mask is None else dy * mask[:, j, None]
                dpad[:, j:j + T] += dterm * weight[:, j]
                dw[:, j] = (dterm * padded[:, j:j + T]).sum(dim=(0, 1))
        return dpad.to(padded.dtype), dw.to(weight.dtype), None, None


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, *, padded: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, token_offset: int = 0) -> torch.Tensor:
    """F.silu(causal_conv(x, weight, ...)) (same arguments) as _CausalConvSilu: the eager path
    of the mixer's conv, keeping the padded input instead of the conv's output."""
    B, T, C = x.shape
    W = weight.shape[1]
    if padded is None:
        padded = F.pad(x, (0, 0, W - 1, 0))
    mask = _conv_mask(T, W, cu_seqlens, token_offset, x.device, x.dtype)
    return _CausalConvSilu.apply(padded, weight, mask, T)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, *, padded: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, token_offset: int = 0) -> torch.Tensor:
    """Depthwise causal conv, no bias: y_t = Σ_j weight[:, j] · x_{t−(W−1)+j}.

    x: [B, T, C]; weight: [C, W] (nn.Conv1d's [C, 1, W] squeezed; same tap order).
    padded: [B, T+W−1, C], x with the W−1 preceding inputs prepended (CP halo); default zeros.
    cu_seqlens: [N+1] document offsets in the (global) packed stream, B == 1: taps that reach
        back into the previous document are dropped, so each document starts afresh.
    token_offset: global position of x[:, 0] in that stream (CP rank offset).
    Returns [B, T, C].
    """
    B, T, C = x.shape
    W = weight.shape[1]
    if padded is None:
        padded = F.pad(x, (0, 0, W - 1, 0))
    return _conv_terms(padded, weight, _conv_mask(T, W, cu_seqlens, token_offset, x.device, x.dtype), T)


def gated_rmsnorm(o: torch.Tensor, g: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of o over its last dim, times w, times sigmoid(g), in >= fp32, output in o's dtype
    (the eager reference of the fused path, mixer_kernels.gated_rmsnorm_fla)."""
    dt = _at_least_fp32(o.dtype)
    of = o.to(dt)
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.to(dt) * torch.sigmoid(g.to(dt))).to(o.dtype)


def seq_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [T, B, D] with dense strides. Why not transpose(0, 1).contiguous(): at B = 1
    (the trainer's packed stream) that is already "contiguous" yet keeps dim 1's stride T·D, so
    torch.matmul in the out-projection cannot fold [T, 1, D] into one GEMM and runs T batched
    1-row GEMMs instead (measured on an H100: 5.9 ms instead of ~0.1 ms per 400M layer)."""
    B, T, D = x.shape
    if B == 1:
        return x.contiguous().view(T, 1, D)
    return x.transpose(0, 1).contiguous()


@dataclass
class MDNMixerSubmodules:
    in_proj: Union[ModuleSpec, type] = ColumnParallelLinear
    out_proj: Union[ModuleSpec, type] = RowParallelLinear


class MDNMixer(MegatronModule):
    """Momentum DeltaNet mixer (mixer "mdn") or its momentum-off ablation (mixer "gdn").

    Built by Megatron's TransformerLayer from a ModuleSpec with params={"model_cfg": cfg}.
    forward(hidden_states [S, B, d], attention_mask (ignored: the mixer is causal),
    packed_seq_params=None, ...) -> (out [S, B, d], None).
    """

    def __init__(self, config, submodules: MDNMixerSubmodules, layer_number: int = None,
                 model_cfg: ModelConfig = None, pg_collection=None, **_unused):
        super().__init__(config)
        if model_cfg is None:
            raise ValueError("MDNMixer needs model_cfg (a ModelConfig) in its ModuleSpec params")
        self.cfg = model_cfg
        self.layer_number = layer_number
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None:
            cp_group = parallel_state.get_context_parallel_group()
        self.tp_group, self.cp_group = tp_group, cp_group
        self.tp_size = tp_group.size()
        self.tp_rank = tp_group.rank()
        cfg = model_cfg
        if cfg.num_heads % self.tp_size:
            raise ValueError(f"model.num_heads={cfg.num_heads} is not divisible by the tensor "
                             f"parallel size {self.tp_size}: TP splits the mixer's heads")
        self.heads = cfg.num_heads // self.tp_size
        self.K, self.V = cfg.head_k_dim, cfg.head_v_dim
        self.parts = local_in_proj_parts(cfg, self.heads)
        # _split_projection's pieces: q|k|v as one, then the other parts in order
        qkv_rows = sum(n for name, n in self.parts if name in ("q", "k", "v"))
        rest = [(name, n) for name, n in self.parts if name not in ("q", "k", "v")]
        self._split_layout = (["qkv"] + [name for name, _ in rest], [qkv_rows] + [n for _, n in rest])
        self.tau = math.sqrt(cfg.hidden_size / cfg.tau_factor)
        # Forced FLA where it cannot run fails here, at build time, not in the first forward.
        mk.check_fla_usable(cfg.mixer_kernels, cuda=torch.cuda.is_available())
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype

        total = sum(n for _, n in self.parts) * self.tp_size
        _warn_unaligned_rows(total // self.tp_size, self.heads, cfg)
        self.in_proj = build_module(
            submodules.in_proj, cfg.hidden_size, total, config=config,
            init_method=_no_init,  # filled TP-invariantly in reset_parameters
            gather_output=False, bias=False, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="mdn_in_proj", tp_group=tp_group)
        self.in_proj.weight.pad_rows = dict(self.parts).get(PAD, 0)
        self.out_proj = build_module(
            submodules.out_proj, cfg.num_heads * self.V, cfg.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="mdn_out_proj",
            tp_group=tp_group)

        W = cfg.conv_size
        self.q_conv_weight = nn.Parameter(torch.empty(self.heads * self.K, W, device=device, dtype=dtype))
        self.k_conv_weight = nn.Parameter(torch.empty(self.heads * self.K, W, device=device, dtype=dtype))
        self.v_conv_weight = nn.Parameter(torch.empty(self.heads * self.V, W, device=device, dtype=dtype))
        for name in per_head_param_names(cfg):
            # Gate parameters: at least fp32 (they sit inside exp/softplus). Megatron's
            # Float16Module may still cast them; the gate math below runs in >= fp32 regardless.
            setattr(self, name, nn.Parameter(torch.empty(self.heads, device=device,
                                                         dtype=_at_least_fp32(dtype))))
        self.o_norm_weight = nn.Parameter(torch.ones(self.V, device=device, dtype=dtype))

        for name in ["q_conv_weight", "k_conv_weight", "v_conv_weight"] + per_head_param_names(cfg):
            p = getattr(self, name)
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        for name in per_head_param_names(cfg):
            getattr(self, name)._no_weight_decay = True  # DESIGN §6: gates and biases, no decay
        self.reset_parameters()
        self._zero_pad_rows()  # also when Megatron skips the init (a checkpoint fills the rest)

    # ---- init ---------------------------------------------------------------------------
    def _local_heads(self, full: torch.Tensor, per_head: int) -> torch.Tensor:
        n = self.heads * per_head
        return full[self.tp_rank * n:(self.tp_rank + 1) * n]

    @torch.no_grad()
    def _zero_pad_rows(self):
        pad = self.in_proj.weight.pad_rows
        if pad:
            self.in_proj.weight[-pad:].zero_()

    @torch.no_grad()
    def reset_parameters(self):
        """DESIGN §6 init. Full (all-head) tensors are drawn from the global CPU RNG on every
        rank and sliced, so the model is the same function whatever the TP size."""
        if not self.config.perform_initialization:
            return
        cfg, H, K, V = self.cfg, self.cfg.num_heads, self.K, self.V
        full_parts = []
        for name, rows in in_proj_parts(cfg, H):
            w = torch.empty(rows, cfg.hidden_size, dtype=torch.float32)
            self.config.init_method(w)
            per_head = rows // H
            full_parts.append(self._local_heads(w, per_head))
        full_parts.append(torch.zeros(self.in_proj.weight.pad_rows, cfg.hidden_size))
        self.in_proj.weight.copy_(torch.cat(full_parts, 0))
        W = cfg.conv_size
        bound = 1.0 / math.sqrt(W)  # nn.Conv1d's default init for a depthwise conv
        for name, per_head in (("q_conv_weight", K), ("k_conv_weight", K), ("v_conv_weight", V)):
            full = torch.empty(H * per_head, W).uniform_(-bound, bound)
            getattr(self, name).copy_(self._local_heads(full, per_head))

        def log_uniform_dt():
            dt = torch.exp(torch.rand(H) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)

        def log_u(hi):  # log U(0, hi], kept finite
            return torch.log(torch.rand(H).clamp(min=1e-6) * hi)

        full = {"A_log": log_u(16.0), "dt_bias": log_uniform_dt(), "log_factor": log_u(4.0),
                "D_log": log_u(1.0)}
        if cfg.momentum:
            full["Mu_log"] = log_u(16.0)
            full["mu_bias"] = log_uniform_dt()
        for name in per_head_param_names(cfg):
            getattr(self, name).copy_(self._local_heads(full[name], 1))
        self.o_norm_weight.fill_(1.0)

    # ---- forward ------------------------------------------------------------------------
    def gates(self, a, b, m, e):
        """[B, T, H_l] projections -> (log_alpha, log_mu, beta, eta) in >= fp32, DESIGN §6.
        The eager reference and CPU path; CUDA runs gate_kernels.gates_triton (see _gates)."""
        f = lambda t: t.to(_at_least_fp32(t.dtype))  # noqa: E731
        a, b, e = f(a), f(b), f(e)
        A_log, dt_bias, log_factor = f(self.A_log), f(self.dt_bias), f(self.log_factor)
        log_alpha = -A_log.exp() * F.softplus(a + dt_bias)
        if self.cfg.momentum:
            log_mu = (-f(self.Mu_log).exp() * F.softplus(f(m) + f(self.mu_bias))).clamp(min=self.cfg.min_log_mu)
        else:
            log_mu = torch.full_like(log_alpha, float("-inf"))
        eta = torch.tanh(e / self.tau) + 1.0
        beta = torch.sigmoid(b)
        # Gate constraint θ = arctan(η·exp(log_factor)): with x = tan θ,
        # sin²θ = x²/(1+x²) and log cos²θ = −log(1+x²) (exact, no trig round trip).
        x2 = (eta * log_factor.exp()).pow(2)
        beta = beta * x2 / (1.0 + x2)
        log_alpha = log_alpha - torch.log1p(x2)
        return log_alpha, log_mu, beta, eta

    def _gates(self, a, b, m, e):
        """gates() by the fused Triton kernels where mixer_kernels.use_fused_gates says so."""
        names = per_head_param_names(self.cfg)
        params = [getattr(self, n) for n in names if n != "D_log"]
        if mk.use_fused_gates(self.cfg.mixer_kernels, a, params):
            from .gate_kernels import gates_triton

            mom = self.cfg.momentum
            return gates_triton(a, b, m if mom else None, e, self.A_log, self.dt_bias,
                                self.Mu_log if mom else None, self.mu_bias if mom else None,
                                self.log_factor, tau=self.tau, min_log_mu=self.cfg.min_log_mu)
        return self.gates(a, b, m, e)

    def correct_q(self, q, k):
        """(q − exp(D_log)·k per head, k) for q, k [B, T, H_l, K]: the output correction (DESIGN
        §6), before the op's l2 norm. The eager reference and CPU path; CUDA runs
        correction_kernels.correct_q_triton (see _correct_q)."""
        return q - (self.D_log.exp()[:, None] * k).to(q.dtype), k

    def _correct_q(self, q, k):
        """correct_q by the fused Triton kernels where the gates run theirs (the same switch:
        mixer_kernels.use_fused_gates), with k passed through them so that its gradient is
        made in one pass."""
        if (os.environ.get("MDN_CORRECTION", "") != "eager"   # benchmarks' A/B switch
                and mk.use_fused_gates(self.cfg.mixer_kernels, q, [self.D_log])):
            from .correction_kernels import correct_q_triton
            return correct_q_triton(q, k, self.D_log)
        return self.correct_q(q, k)

    @contextmanager
    def without_context_parallel(self):
        """Run this layer as if CP were off (the whole sequence on this rank): the reference of
        the CP startup check (mdn_scale/train/cp_check.py). The layer asks its CP group only for
        size() and rank(), so a group of one stands in."""
        saved = self.cp_group
        self.cp_group = _OneRank()
        try:
            yield
        finally:
            self.cp_group = saved

    def _cp_paths(self) -> bool:
        """Whether this layer runs the CP code paths: a CP group of several ranks, or one real
        group of one under MDN_CP_EMULATE=1 (not the stand-in of without_context_parallel)."""
        if self.cp_group.size() > 1:
            return True
        return not isinstance(self.cp_group, _OneRank) and cp_paths_at_one_rank()

    def _split_projection(self, proj):
        """{"qkv", "g", "a", "b", ("m",) "e"(, PAD)}: views of the in-projection's output [B, T, P]
        along its last dim, q|k|v as one piece (the conv's input). One split, so the backward
        joins the parts' gradients with one cat; a slice for q|k|v beside a split of the rest
        cost a zero-filled full-size gradient, a copy into it and an add (11.3 ms of the 1.3B 4K
        step on an H200, BENCHMARKS.md session 23)."""
        names, rows = self._split_layout
        return dict(zip(names, torch.split(proj, rows, -1)))

    def _conv_qkv(self, qkv, cu_seqlens):
        """SiLU of one depthwise conv over the adjacent q|k|v columns of the projection (one CP
        halo exchange instead of three). qkv: [B, T, 2·H_l·K + H_l·V]."""
        weight = torch.cat([self.q_conv_weight, self.k_conv_weight, self.v_conv_weight], 0)
        # qkv is the in-projection's output dtype (the autocast dtype under autocast); FLA's
        # kernel takes the weights as they are (fp32): see mixer_kernels.conv_silu_fla.
        fla = mk.use_fla_conv(self.cfg.mixer_kernels, qkv)
        if not self._cp_paths():
            if fla:
                return mk.conv_silu_fla(qkv, weight, cu_seqlens)
            return causal_conv_silu(qkv, weight, cu_seqlens=cu_seqlens)
        from mdn_kernels.cp import conv_halo, halo_state_offsets, padded_doc_offsets  # DESIGN §5
        W, T = weight.shape[1], qkv.shape[1]
        # Slices are equal and in rank order, so this rank's first token is rank·T in the stream.
        offset = self.cp_group.rank() * T
        if fla and mk.cp_conv_halo() == "state":
            # opt-in: the previous rank's last rows as the first document's initial state
            if cu_seqlens is None:
                cu, history = None, (W - 1 if offset > 0 else 0)
            else:
                cu, history = halo_state_offsets(cu_seqlens, T, W, offset)
            return mk.conv_silu_fla_halo_state(qkv, weight, cu, history, self.cp_group)
        padded = conv_halo(qkv, W, self.cp_group)
        if fla:
            # One packed stream [halo | slice] whose documents are the global ones cut to it:
            # taps into the halo stay inside their token's document, as the eager mask keeps them.
            cu = None if cu_seqlens is None else padded_doc_offsets(cu_seqlens, T, W, offset)
            return mk.conv_silu_fla_padded(padded, weight, cu)
        return causal_conv_silu(qkv, weight, padded=padded, cu_seqlens=cu_seqlens, token_offset=offset)

    def _gated_norm(self, o, g):
        # o_norm_weight is replicated across TP but each rank only sees its own heads: summing
        # its gradient over TP (identity forward) gives every rank the full, identical gradient.
        w = self.o_norm_weight
        if self.tp_size > 1:
            w = copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        if mk.use_fla(self.cfg.mixer_kernels, o):
            # One kernel each way, fp32 inside; saves o, a contiguous g and the rstd instead of
            # the eager path's five fp32 [T, H, V] tensors (mdn_scale/train/memory.py).
            return mk.gated_rmsnorm_fla(o, g, w, self.config.layernorm_epsilon)
        return gated_rmsnorm(o, g, w, self.config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask=None, inference_context=None,
                packed_seq_params=None, **_unused):
        if inference_context is not None:
            raise NotImplementedError("MDNMixer: Megatron inference contexts are not supported; "
                                      "decode with the exported HF model")
        rf = _profile_range
        with rf("mdn.in_proj"):
            proj, _ = self.in_proj(hidden_states)  # [S, B, P_local] (SP: gathered over TP)
        proj = proj.transpose(0, 1)  # [B, S, P]
        B, T, _ = proj.shape
        pieces = self._split_projection(proj)
        cu_seqlens = None
        if packed_seq_params is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
            if B != 1:
                raise ValueError(f"packed_seq_params needs micro-batch size 1, got B={B}")
        H, K, V = self.heads, self.K, self.V
        with rf("mdn.conv_silu"):
            qkv = self._conv_qkv(pieces["qkv"], cu_seqlens)
        # Under autocast the eager conv (fp32 weights) promotes to fp32 (FLA's returns the input
        # dtype, so this is a no-op there); hand the op 16-bit q, k, v as
        # a 16-bit layer would, so it takes its 16-bit path (fused local kernels, bf16 per-chunk
        # operands and pairs, fp32 state) instead of an fp32 op whose matmuls autocast re-casts.
        dev = qkv.device.type
        autocast_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if autocast_dtype is not None:
            qkv = qkv.to(autocast_dtype)
        q, k, v = torch.split(qkv, [H * K, H * K, H * V], -1)
        q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V)
        with rf("mdn.gates"):
            log_alpha, log_mu, beta, eta = self._gates(pieces["a"], pieces["b"], pieces.get("m"), pieces["e"])
            q, k = self._correct_q(q, k)  # output correction, before the l2 norm
        cp_group = self.cp_group if self._cp_paths() else None
        # The op picks its own precision from its inputs' dtypes (DESIGN §9): no autocast inside.
        with torch.autocast(dev, enabled=False) if autocast_dtype is not None else _nullcontext(), \
                rf("mdn.op"):
            o, _ = mdn_chunk(q, k, v, log_alpha, log_mu, beta, eta, cu_seqlens=cu_seqlens,
                             use_qk_l2norm=True, cp_group=cp_group, backend=self.cfg.backend,
                             chunk_size=self.cfg.chunk_size)
        with rf("mdn.gated_norm"):
            o = self._gated_norm(o, pieces["g"].reshape(B, T, H, V))
        with rf("mdn.out_proj"):
            out, bias = self.out_proj(seq_first(o.reshape(B, T, H * V)))
        return out, bias

    # ---- checkpoint layout --------------------------------------------------------------
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, tp_group=None):
        """Every tensor with its TP split: per-head params and convs on dim 0 with their heads,
        the fused in-projection as one dim-0-sharded tensor per part (the pad left out), o_norm
        replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = tp_group if tp_group is not None else self.tp_group
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        axis_map = {n: 0 for n in own if n != "o_norm_weight"}
        sd = make_sharded_tensors_for_checkpoint(own, prefix, axis_map, sharded_offsets,
                                                 tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets,
                                                 metadata, tp_group=tp_group))
        key = f"{prefix}in_proj.weight"
        sd[key] = split_sharded_tensor(sd[key], [r for _, r in self.parts], [n for n, _ in self.parts],
                                       skip=(PAD,))
        return sd
