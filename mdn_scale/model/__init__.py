"""MDN model: config, Megatron mixer, layer specs, builder, sharding helpers."""
from .config import MIXERS, ModelConfig, check_parallel, to_transformer_config

__all__ = ["MIXERS", "ModelConfig", "check_parallel", "to_transformer_config", "build_model",
           "MDNMixer"]


def __getattr__(name):  # keep `import mdn_scale.model` light (no megatron import for the config)
    if name == "build_model":
        from .builder import build_model
        return build_model
    if name == "MDNMixer":
        from .mixer import MDNMixer
        return MDNMixer
    raise AttributeError(name)
