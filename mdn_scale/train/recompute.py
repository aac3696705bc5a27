"""Activation recomputation: each transformer layer keeps only its input and recomputes its
activations in the backward pass.

Megatron's own full recompute (``recompute_granularity="full"``) saves and restores CUDA RNG
states through its CUDA RNG tracker, so it cannot run the CPU demo or CI (megatron-core 0.16.1).
PyTorch's non-reentrant ``torch.utils.checkpoint`` does the same per layer on any device, and
our models have no dropout that would need the tracker.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def enable_layer_recompute(model: torch.nn.Module) -> int:
    """Wrap every decoder layer of a GPTModel; returns the number of layers wrapped."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    layers = getattr(getattr(inner, "decoder", None), "layers", None)
    if layers is None:
        raise ValueError("train.recompute: the model has no decoder.layers to recompute")
    for layer in layers:
        forward = layer.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed
    return len(layers)
