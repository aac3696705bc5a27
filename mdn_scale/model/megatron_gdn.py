"""Megatron-core's own GatedDeltaNet layer (FLA kernels) as a benchmark peer (tools/bench_model.py).

A bench-only stack, not a `model.mixer` value: the trainer, checkpoints and converters do not
know it. It is built from megatron-core 0.16.1's `GatedDeltaNet` and its spec helper
`get_gated_delta_net_module_spec`, in the same blocks as ours (our pre-norm RMSNorm, SwiGLU MLP,
final norm, untied head) with the sizes of a ModelConfig: hidden size, H heads of key dim K and
value dim V = expand_v·K, conv width. Differences from our "gdn" mixer, all Megatron's: two gate
rows per head in the fused in-projection (ours three), a SiLU output gate (ours sigmoid), no
output correction (D) or gate constraint.

Megatron's spec helpers only take TransformerEngine backends; `LocalBackend` answers their
questions with local (non-TE) layers: a plain column-parallel in-projection (the input norm stays
in the block, not fused into it) and our RMSNorm for the output norm.

Megatron's GatedDeltaNet refuses packed sequences and has no context parallelism (a TODO in
0.16.1). The trainer's step feeds every model one packed stream per microbatch ([S, 1, d] with
cu_seqlens); `PackedGatedDeltaNet` turns a stream of equal-length sequences (the benchmark's
synthetic data: cu_seqlens = 0, L, 2L, ...) back into a batch [L, n, d] around Megatron's forward.
It needs GPUs (its parameters are created on the current CUDA device) and `fla`.
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.ssm.gated_delta_net import GatedDeltaNet
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .config import ModelConfig
from .norm import RMSNorm
from .specs import mlp_spec, stage_layer_ids


def transformer_config_overrides(cfg: ModelConfig) -> dict:
    """TransformerConfig fields Megatron's GatedDeltaNet reads (sizes of `cfg`'s mixer)."""
    return dict(linear_conv_kernel_dim=cfg.conv_size, linear_key_head_dim=cfg.head_k_dim,
                linear_value_head_dim=cfg.head_v_dim, linear_num_key_heads=cfg.num_heads,
                linear_num_value_heads=cfg.num_heads)


class LocalBackend(LocalSpecProvider):
    """Local layers for Megatron's GDN spec helper (which asks for TE's fused norm+linear)."""

    def column_parallel_layer_norm_linear(self):
        return ColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return RMSNorm


class PackedGatedDeltaNet(GatedDeltaNet):
    """GatedDeltaNet that accepts a packed stream of equal-length sequences (see module doc)."""

    def forward(self, hidden_states, attention_mask=None, *args, packed_seq_params=None, **kwargs):
        if packed_seq_params is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if self.config.context_parallel_size > 1:
            raise NotImplementedError("Megatron's GatedDeltaNet has no context parallelism (0.16.1)")
        S, B, d = hidden_states.shape
        L = int(packed_seq_params.max_seqlen_q)
        if self.config.sequence_parallel and S * self.sp_size != L:
            raise NotImplementedError("megatron_gdn under sequence parallelism: micro_batch must be 1")
        if self.config.sequence_parallel or S == L:  # one sequence: nothing to unpack
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if B != 1 or S % L:
            raise ValueError(f"PackedGatedDeltaNet: a stream of {S} tokens is not n sequences of {L}")
        n = S // L  # equal lengths assumed: cu_seqlens = 0, L, 2L, ... (the benchmark's data)
        x = hidden_states.reshape(n, L, d).transpose(0, 1).contiguous()  # [L, n, d]
        out, bias = super().forward(x, attention_mask, *args, **kwargs)
        return out.transpose(0, 1).reshape(S, B, -1), bias


def mixer_spec(config) -> ModuleSpec:
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_gated_delta_net_module_spec,
    )

    spec = get_gated_delta_net_module_spec(config, backend=LocalBackend())
    return ModuleSpec(module=PackedGatedDeltaNet, params=dict(spec.params),
                      submodules=spec.submodules, metainfo=dict(spec.metainfo))


def block_spec(cfg: ModelConfig, config, vp_stage: Optional[int] = None,
               pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Every layer a Megatron GDN block; same signature as specs.block_spec (build_model's
    block_spec_fn)."""
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,  # not fused into the in-projection (LocalBackend)
            self_attention=mixer_spec(config),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return TransformerBlockSubmodules(
        layer_specs=[layer for _ in stage_layer_ids(config, vp_stage, pp_rank)], layer_norm=RMSNorm)
