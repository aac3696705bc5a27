"""Model configuration (DESIGN §6) and its translation into Megatron's TransformerConfig.

`ModelConfig` is what the `model:` section of a YAML config holds, field for field:
`ModelConfig(**yaml["model"])`. Parallel sizes are not part of it: they come from the run's
`parallel:` section and are passed to `to_transformer_config`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MIXERS = ("mdn", "gdn", "transformer")
NORM_KERNELS = ("eager", "triton")
MLP_KERNELS = ("compiled", "eager")


@dataclass
class ModelConfig:
    """An MDN / GDN / Transformer language model.

    mixer: "mdn" (Momentum DeltaNet), "gdn" (the same layer with momentum off: μ ≡ 0, no m_proj,
        Mu_log or mu_bias), or "transformer" (softmax attention in every layer).
    hidden_size (d), num_layers, vocab_size: the usual.
    num_heads (H), head_k_dim (K), expand_v (V = expand_v·K): the recurrent mixer's heads.
    mlp_ratio: SwiGLU width = mlp_ratio·d·2/3 rounded up to ffn_multiple_of (FLA's rule, which
        gives the published 400M / 1.3B parameter counts); ffn_hidden_size overrides it.
    min_log_mu, tau_factor, conv_size: DESIGN §6 (log μ floor, η temperature τ = sqrt(d/tau_factor),
        causal depthwise conv width).
    attention_every: hybrid stacks: layer i (0-based) is softmax attention when
        (i + 1) % attention_every == 0 (so 4 gives 3 MDN : 1 attention); 0 = no attention layers.
    num_attention_heads: heads of the softmax-attention layers (their head dim is
        hidden_size // num_attention_heads); default hidden_size // 128.
    rope_theta: rotary base of the softmax-attention layers (MDN layers use no positions).
    norm_eps, init_std: RMSNorm epsilon, std of the normal init of linear weights.
    seq_len: the longest sequence the model is meant for (the softmax layers' RoPE table).
    vocab_pad_multiple: the embedding and LM head are padded to a multiple of this (and of the
        TP size) so that they split evenly across TP ranks; logits beyond vocab_size are padding.
    chunk_size, backend: passed to mdn_chunk.
    loss_chunk_tokens: compute the LM head and the cross entropy this many tokens at a time
        (mdn_scale/model/loss.py), never holding the whole sequence's logits; 0 = off (Megatron's
        output layer + vocab-parallel cross entropy over all tokens at once). Long-context
        configs turn it on: at 256K tokens per GPU the logits alone are tens of GiB.
    mixer_kernels: "auto" | "fla" | "eager": who runs the mixer's conv + SiLU and gated output
        norm (mdn_scale/model/mixer_kernels.py): FLA's fused Triton kernels or the eager PyTorch
        reference; "auto" takes FLA on CUDA when fla-core imports. "fla" where it cannot run is
        an error when the model is built.
    norm_kernel: "triton" | "eager": who runs the block RMSNorms (each layer's input_layernorm
        and pre_mlp_layernorm, the final norm): one Triton kernel each way
        (mdn_scale/model/norm_kernels.py, the default), which applies to CUDA fp32 / bf16 / fp16
        inputs with hidden_size <= 8192 (anything else, the CPU included, runs eager whatever
        this says), or the eager PyTorch rms_norm (mdn_scale/model/norm.py) everywhere. The
        kernels keep the bf16 input and an fp32 rstd where eager keeps two fp32 copies: the 1.3B
        step at 2 × 2 × 4096 tokens took 583 ms and 50.3 GiB against 641 ms and 54.3 GiB on one
        H200 (BENCHMARKS.md, session 11).
    mlp_kernel: "compiled" | "eager": how the MLP's SwiGLU runs. "compiled" (the default) takes
        Megatron-core's fused SwiGLU (megatron.core.fusions.fused_bias_swiglu, the
        TransformerConfig's bias_activation_fusion): torch.compile'd into one kernel forward and
        one backward that writes fc1's input gradient whole, keeping only fc1's output for the
        backward. Applies with CUDA (the CPU runs eager whatever this says: inductor there would
        compile C++). "eager": silu(x_glu) · x_lin in separate ops, which keep silu and the
        product too and join the two halves' gradients with a cat. The same function; bf16
        results differ by the rounding of the intermediate (the fused kernel computes in fp32).
    in_proj_row_multiple: each tensor-parallel rank's fused in-projection gets zero rows at its
        end, up to a multiple of this, that no output reads (their gradient is exactly zero, so
        they stay zero; checkpoints leave them out, so checkpoints do not depend on it or on the
        layout). cuBLAS runs its Hopper kernels only when a bf16 output row is 16-byte aligned
        (a multiple of 8 elements): the GDN mode's 1.3B in-projection (9234 rows) cost ~94 ms a
        4K step without it (BENCHMARKS.md, session 12). 1 turns it off.
    """

    mixer: str = "mdn"
    hidden_size: int = 1024
    num_layers: int = 21
    num_heads: int = 6
    head_k_dim: int = 128
    expand_v: int = 2
    mlp_ratio: float = 4.0
    ffn_hidden_size: Optional[int] = None
    ffn_multiple_of: int = 256
    vocab_size: int = 50257
    vocab_pad_multiple: int = 128
    min_log_mu: float = -2.0
    tau_factor: float = 1.0
    conv_size: int = 4
    attention_every: int = 0
    num_attention_heads: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    seq_len: int = 4096
    chunk_size: int = 64
    backend: str = "auto"
    loss_chunk_tokens: int = 0
    mixer_kernels: str = "auto"
    norm_kernel: str = "triton"
    mlp_kernel: str = "compiled"
    in_proj_row_multiple: int = 8

    def __post_init__(self):
        self.validate()

    # ---- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(field, why):
            raise ValueError(f"model.{field}: {why} (got {getattr(self, field)!r})")

        if self.mixer not in MIXERS:
            bad("mixer", f"must be one of {MIXERS}")
        for f in ("hidden_size", "num_layers", "num_heads", "head_k_dim", "expand_v", "vocab_size",
                  "vocab_pad_multiple", "conv_size", "seq_len", "chunk_size", "ffn_multiple_of",
                  "in_proj_row_multiple"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "must be a positive integer")
        if self.ffn_hidden_size is not None and (
                isinstance(self.ffn_hidden_size, bool) or not isinstance(self.ffn_hidden_size, int)
                or self.ffn_hidden_size < 1):
            bad("ffn_hidden_size", "must be a positive integer or null")
        for f in ("mlp_ratio", "tau_factor", "norm_eps", "init_std", "rope_theta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or math.isinf(v):
                bad(f, "must be a positive finite number")
        if isinstance(self.min_log_mu, bool) or not isinstance(self.min_log_mu, (int, float)) \
                or not (self.min_log_mu < 0) or math.isinf(self.min_log_mu):
            bad("min_log_mu", "must be a finite negative number (log of the smallest momentum decay)")
        if isinstance(self.attention_every, bool) or not isinstance(self.attention_every, int) \
                or self.attention_every < 0:
            bad("attention_every", "must be an integer >= 0 (0 = no softmax-attention layers)")
        if self.mixer == "transformer" and self.attention_every not in (0, 1):
            bad("attention_every", "must be 0 for mixer 'transformer' (every layer is attention)")
        if self.num_attention_heads is not None:
            n = self.num_attention_heads
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                bad("num_attention_heads", "must be a positive integer or null")
        if self.uses_attention:
            n = self.attention_heads
            if n < 1 or self.hidden_size % n:
                bad("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
            if self.attention_head_dim % 2:
                bad("num_attention_heads", "hidden_size // num_attention_heads must be even (RoPE)")
        if self.chunk_size & (self.chunk_size - 1):
            bad("chunk_size", "must be a power of two (the Triton kernels need >= 16)")
        if self.backend == "triton" and self.chunk_size < 16:
            bad("chunk_size", "must be >= 16 for backend 'triton'")
        if self.backend not in ("auto", "triton", "torch"):
            bad("backend", "must be 'auto', 'triton' or 'torch'")
        if isinstance(self.loss_chunk_tokens, bool) or not isinstance(self.loss_chunk_tokens, int) \
                or self.loss_chunk_tokens < 0:
            bad("loss_chunk_tokens", "must be an integer >= 0 (0 = off)")
        from .mixer_kernels import MIXER_KERNELS
        if self.mixer_kernels not in MIXER_KERNELS:
            bad("mixer_kernels", f"must be one of {MIXER_KERNELS}")
        if self.norm_kernel not in NORM_KERNELS:
            bad("norm_kernel", f"must be one of {NORM_KERNELS}")
        if self.mlp_kernel not in MLP_KERNELS:
            bad("mlp_kernel", f"must be one of {MLP_KERNELS}")

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def momentum(self) -> bool:
        return self.mixer == "mdn"

    @property
    def head_v_dim(self) -> int:
        return self.expand_v * self.head_k_dim

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        n = int(self.hidden_size * self.mlp_ratio * 2 / 3)
        m = self.ffn_multiple_of
        return m * ((n + m - 1) // m)

    @property
    def attention_heads(self) -> int:
        return self.num_attention_heads or max(1, self.hidden_size // 128)

    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def uses_attention(self) -> bool:
        return self.mixer == "transformer" or self.attention_every > 0

    def layer_types(self) -> list[str]:
        """Per layer (0-based): "attention" or the recurrent mixer's name ("mdn" / "gdn")."""
        if self.mixer == "transformer":
            return ["attention"] * self.num_layers
        n = self.attention_every
        return ["attention" if n and (i + 1) % n == 0 else self.mixer for i in range(self.num_layers)]

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """vocab_size rounded up to vocab_pad_multiple, the same under every TP size (so
        embedding and head shapes, their initial draws and checkpoints do not depend on the
        layout); it must split evenly over the TP ranks."""
        m = self.vocab_pad_multiple
        padded = m * ((self.vocab_size + m - 1) // m)
        if padded % tensor_parallel:
            raise ValueError(f"model.vocab_pad_multiple: the padded vocabulary ({padded}) does not "
                             f"split over tensor parallel size {tensor_parallel}")
        return padded

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Like ModelConfig(**d) but names unknown keys in a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def compiled_mlp(cfg: ModelConfig) -> bool:
    """Whether the MLP runs Megatron-core's torch.compile'd SwiGLU (model.mlp_kernel "compiled"
    and CUDA available where the model is built)."""
    return cfg.mlp_kernel == "compiled" and torch.cuda.is_available()


def check_parallel(cfg: ModelConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                   context_parallel: int = 1) -> None:
    """Raise ValueError when the model cannot be split this way (before any work starts)."""
    for name, v in (("parallel.tensor", tensor_parallel), ("parallel.pipeline", pipeline_parallel),
                    ("parallel.context", context_parallel)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cfg.mixer != "transformer" and cfg.num_heads % tensor_parallel:
        raise ValueError(f"model.num_heads={cfg.num_heads} is not divisible by "
                         f"parallel.tensor={tensor_parallel}: TP splits the mixer's heads")
    if cfg.uses_attention and cfg.attention_heads % tensor_parallel:
        raise ValueError(f"model.num_attention_heads={cfg.attention_heads} is not divisible by "
                         f"parallel.tensor={tensor_parallel}")
    if cfg.ffn_size % tensor_parallel:
        raise ValueError(f"the MLP width {cfg.ffn_size} (model.mlp_ratio / ffn_hidden_size) is not "
                         f"divisible by parallel.tensor={tensor_parallel}")
    if cfg.num_layers < pipeline_parallel:
        raise ValueError(f"model.num_layers={cfg.num_layers} < parallel.pipeline={pipeline_parallel}")


def to_transformer_config(
    cfg: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    **overrides,
):
    """Megatron's TransformerConfig for `cfg` under the given parallel sizes.

    Pre-norm RMSNorm blocks, SwiGLU MLP without biases, no dropout. Fusions that need CUDA
    kernels are off (they are not available without TransformerEngine/Apex anyway), but for
    the SwiGLU's, which torch.compile makes (model.mlp_kernel, compiled_mlp).
    use_cpu_initialization defaults to True when CUDA is absent. `overrides` go straight to
    TransformerConfig (e.g. recompute settings, bf16=True).
    """
    from megatron.core.transformer import TransformerConfig

    check_parallel(cfg, tensor_parallel, pipeline_parallel, context_parallel)
    if sequence_parallel and tensor_parallel == 1:
        raise ValueError("parallel.sequence_parallel needs parallel.tensor > 1")
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    std = cfg.init_std
    out_std = std / math.sqrt(2.0 * cfg.num_layers)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.attention_heads if cfg.uses_attention else cfg.num_heads,
        kv_channels=cfg.attention_head_dim if cfg.uses_attention else cfg.head_k_dim,
        ffn_hidden_size=cfg.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=compiled_mlp(cfg),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=std,
        # partials, not lambdas: the config stays picklable
        init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=std),
        output_layer_init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=out_std),
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # dtype of activations sent between stages
        use_cpu_initialization=use_cpu_initialization,
        # Per-layer checkpoint keys with global layer numbers (hybrid stacks mix layer types).
        hetereogenous_dist_checkpoint=True,
        cp_comm_type=None,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
