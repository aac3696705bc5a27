"""HF configuration of an mdn_scale model (MDN / GDN / hybrid / Transformer).

Self-contained (torch + transformers only): exported folders ship it as trust_remote_code.
"""
from transformers import PretrainedConfig


class MDNConfig(PretrainedConfig):
    model_type = "mdn_scale"

    def __init__(
        self,
        vocab_size=50304,
        hidden_size=1024,
        num_hidden_layers=21,
        num_heads=6,
        head_k_dim=128,
        expand_v=2,
        intermediate_size=2816,
        momentum=True,
        min_log_mu=-2.0,
        tau_factor=1.0,
        conv_size=4,
        mdn_layer_types=None,
        num_attention_heads=8,
        rope_theta=10000.0,
        norm_eps=1e-6,
        initializer_range=0.02,
        max_position_embeddings=4096,
        original_vocab_size=None,
        recurrent_backend="auto",
        tie_word_embeddings=False,
        **kwargs,
    ):
        """mdn_layer_types: per layer "mdn", "gdn" or "attention" (default: all "mdn"/"gdn" by
        `momentum`). recurrent_backend: "auto" (mdn_kernels.mdn_chunk for multi-token prefill
        when installed, else the token loop) or "loop" (always the token loop)."""
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_k_dim = head_k_dim
        self.expand_v = expand_v
        self.intermediate_size = intermediate_size
        self.momentum = momentum
        self.min_log_mu = min_log_mu
        self.tau_factor = tau_factor
        self.conv_size = conv_size
        # (not `layer_types`: transformers validates that name against its own layer kinds)
        if mdn_layer_types is None:
            mdn_layer_types = ["mdn" if momentum else "gdn"] * num_hidden_layers
        if len(mdn_layer_types) != num_hidden_layers:
            raise ValueError(f"mdn_layer_types has {len(mdn_layer_types)} entries for "
                             f"{num_hidden_layers} layers")
        bad = sorted(set(mdn_layer_types) - {"mdn", "gdn", "attention"})
        if bad:
            raise ValueError(f"mdn_layer_types: unknown layer kinds {bad}")
        self.mdn_layer_types = list(mdn_layer_types)
        self.num_attention_heads = num_attention_heads
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.original_vocab_size = original_vocab_size
        if recurrent_backend not in ("auto", "loop"):
            raise ValueError(f"recurrent_backend must be 'auto' or 'loop', got {recurrent_backend!r}")
        self.recurrent_backend = recurrent_backend
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
