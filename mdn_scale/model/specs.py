"""Megatron-core ModuleSpecs: MDN / GDN layers, softmax-attention layers, hybrid stacks.

Every layer is Megatron's TransformerLayer (pre-norm RMSNorm → mixer → residual; RMSNorm →
SwiGLU MLP → residual); only the self-attention slot differs: our MDNMixer (momentum on or off),
or Megatron's SelfAttention with our SDPA core attention.
"""
from __future__ import annotations

import functools
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron.core import parallel_state

from .attention import SDPACoreAttention
from .config import ModelConfig
from .init import keyed_cpu_rng
from .mixer import MDNMixer, MDNMixerSubmodules
from .norm import RMSNorm


class SeededTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer, its weights drawn from the CPU RNG seeded by (the run's seed,
    the global layer number). Why: Megatron's CPU init draws every layer from one RNG stream, so a
    pipeline stage that does not build the layers before its own draws other weights than PP = 1
    would (the trainer's PP = 2 losses differed from one GPU's from step 1, H100, 2026-11-27).
    Keyed per layer, the model is the same function under any TP / PP / VP layout."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, vp_stage=None,
                 pg_collection=None, **kwargs):
        pp_group = getattr(pg_collection, "pp", None) if pg_collection is not None else None
        pp_rank = (pp_group.rank() if pp_group is not None
                   else parallel_state.get_pipeline_model_parallel_rank())
        global_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        with keyed_cpu_rng("decoder.layer", global_number):
            super().__init__(config, submodules, layer_number, *args, vp_stage=vp_stage,
                             pg_collection=pg_collection, **kwargs)


def norm_spec(cfg: ModelConfig) -> ModuleSpec:
    """The block RMSNorm (input_layernorm, pre_mlp_layernorm, final norm), its kernel from
    model.norm_kernel (a spec param: Megatron builds norms from the TransformerConfig alone)."""
    return ModuleSpec(module=RMSNorm, params={"kernel": cfg.norm_kernel})


def mlp_spec() -> ModuleSpec:
    """SwiGLU MLP (gated_linear_unit + silu come from the TransformerConfig)."""
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


def mdn_mixer_spec(cfg: ModelConfig) -> ModuleSpec:
    """The recurrent mixer; cfg.mixer "gdn" gives the same layer with momentum off."""
    return ModuleSpec(module=MDNMixer, params={"model_cfg": cfg},
                      submodules=MDNMixerSubmodules(in_proj=ColumnParallelLinear,
                                                    out_proj=RowParallelLinear))


def attention_spec(cfg: ModelConfig) -> ModuleSpec:
    """Megatron SelfAttention, causal, with RoPE + SDPA in our core attention."""
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=functools.partial(SDPACoreAttention, rope_theta=cfg.rope_theta),
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def layer_spec(cfg: ModelConfig, layer_type: str) -> ModuleSpec:
    """One block; layer_type is "mdn", "gdn" or "attention" (see ModelConfig.layer_types)."""
    if layer_type == "attention":
        mixer = attention_spec(cfg)
    elif layer_type in ("mdn", "gdn"):
        mixer = mdn_mixer_spec(cfg)
    else:
        raise ValueError(f"unknown layer type {layer_type!r}")
    return ModuleSpec(
        module=SeededTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm_spec(cfg),
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_spec(cfg),
            mlp=mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def stage_layer_ids(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> list[int]:
    """Global (0-based) ids of the layers Megatron builds on this pipeline stage."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + n))


def block_spec(cfg: ModelConfig, config, vp_stage: Optional[int] = None,
               pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Per-layer specs of this pipeline stage (hybrid stacks mix layer types) + final RMSNorm."""
    types = cfg.layer_types()
    specs = [layer_spec(cfg, types[i]) for i in stage_layer_ids(config, vp_stage, pp_rank)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm_spec(cfg))
