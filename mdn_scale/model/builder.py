"""build_model: a Megatron-core GPTModel with MDN / GDN / hybrid / Transformer layers."""
from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from .config import ModelConfig, to_transformer_config
from .specs import block_spec


class MDNGPTModel(GPTModel):
    """GPTModel whose loss (forward with labels) can run chunked over the sequence
    (`loss_chunk_tokens` > 0: mdn_scale/model/loss.py), so the [T, vocab] logits never exist at
    once. Everything else, the logits path (no labels) included, is GPTModel's."""

    def __init__(self, *args, loss_chunk_tokens: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        cfg = self.config
        if cfg.perform_initialization and cfg.use_cpu_initialization:
            # The embedding and the LM head live on the first and last stage: drawn from the
            # RNG stream they would get there, they would differ between PP layouts (the decoder
            # layers are keyed in specs.SeededTransformerLayer), so they are redrawn keyed too.
            from .init import reinit_vocab_parallel
            if self.pre_process:
                reinit_vocab_parallel(self.embedding.word_embeddings.weight, self.vocab_size,
                                      "embedding", cfg.init_method, cfg.params_dtype)
            if self.post_process:
                reinit_vocab_parallel(self.output_layer.weight, self.vocab_size, "output_layer",
                                      cfg.init_method, cfg.params_dtype)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        chunked = (self.loss_chunk_tokens > 0 and labels is not None and self.post_process
                   and self.config.mtp_num_layers is None and not kwargs.get("mtp_in_postprocess")
                   and not self.share_embeddings_and_output_weights
                   and (kwargs.get("inference_context") is None or self.training))
        if not chunked:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        from .loss import chunked_lm_loss

        return chunked_lm_loss(hidden_states, self.output_layer, labels, self.loss_chunk_tokens)


def build_model(cfg: ModelConfig, *, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None,
                config=None, vp_stage: Optional[int] = None, block_spec_fn=None,
                **config_overrides) -> GPTModel:
    """The model of this rank's pipeline stage. parallel_state must be initialised by the caller
    (its TP/PP/CP sizes are used). `config`: a TransformerConfig to use instead of deriving one
    (then config_overrides must be empty). pre_process / post_process (embedding / final norm,
    LM head and loss on this stage) default to whether this is the first / last pipeline stage; config_overrides go to to_transformer_config
    (e.g. sequence_parallel=True, params_dtype=torch.bfloat16, bf16=True). block_spec_fn: a
    replacement for specs.block_spec with its signature (a benchmark peer's layers, e.g.
    megatron_gdn.block_spec).

    No positional embedding at the model level (MDN needs none; softmax-attention layers apply
    RoPE in their core attention). Untied LM head. Forward is GPTModel's:
    model(input_ids [B, S], position_ids [B, S] (unused), attention_mask=None, labels=[B, S],
    packed_seq_params=None) -> per-token loss [B, S] (logits [B, S, padded vocab / TP] without labels).
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_model: call megatron.core.parallel_state.initialize_model_parallel first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if config is None:
        config = to_transformer_config(cfg, tensor_parallel=tp, pipeline_parallel=pp,
                                       context_parallel=cp, **config_overrides)
    elif config_overrides:
        raise ValueError("pass either config or config_overrides, not both")
    if (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
            config.context_parallel_size) != (tp, pp, cp):
        raise ValueError(f"TransformerConfig parallel sizes {(config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size)} "
                         f"differ from parallel_state's (tp, pp, cp) = {(tp, pp, cp)}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    spec = (block_spec_fn or block_spec)(cfg, config, vp_stage=vp_stage,
                      pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    return MDNGPTModel(
        loss_chunk_tokens=cfg.loss_chunk_tokens,
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        parallel_output=True,
        vp_stage=vp_stage,
    )


def no_weight_decay(name: str, param) -> bool:
    """True for parameters that take no weight decay (DESIGN §6): the mixer's gate parameters
    and biases (marked `_no_weight_decay`), norm weights and any other 1-D parameter. Matches
    Megatron's default rule and can be passed as its `no_weight_decay_cond`."""
    return bool(getattr(param, "_no_weight_decay", False)) or param.dim() == 1 or name.endswith(".bias")
