"""Activation recomputation: each transformer layer keeps only its input and recomputes its
activations in the backward pass.

Megatron's own full recompute (``recompute_granularity="full"``) saves and restores CUDA RNG
states through its CUDA RNG tracker, so it cannot run the CPU demo or CI (megatron-core 0.16.1).
PyTorch's non-reentrant ``torch.utils.checkpoint`` does the same per layer on any device, and
our models have no dropout that would need the tracker.

``train.recompute_offload``: the kept layer inputs are what recompute leaves on the GPU, one
[T, d] tensor per layer (20 GiB of a 1.3B model's 21 layers at 256K tokens per rank). With it,
each layer's input waits in pinned host memory between the layer's forward and its backward
(`_HostKeptLayer`, a reentrant recompute: the forward runs without a graph; the backward copies
the input back, rebuilds the layer's graph and runs its backward). The copies are on the compute
stream, in order with the layer's kernels: ~T·d·2 bytes each way per layer, a few per cent of a
long-context layer's time.

``train.recompute_keep_cp_maps``: under CP the recompute would repeat the CP op's group maps,
their tree, the all-gather and the fold (mdn_kernels.cp.kept); with it, each checkpointed layer
call records them in its forward and its recompute takes them back, so they run once per step.
They stay alive from the layer's forward to its backward (a selective recompute; opt-in).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from mdn_kernels.cp.kept import KeptMaps


class _HostKeptLayer(torch.autograd.Function):
    """out = run(x)[0], keeping x on the host (pinned on CUDA) until the backward recomputes."""

    @staticmethod
    def forward(ctx, x, run):
        ctx.run, ctx.device, ctx.needs_x_grad = run, x.device, x.requires_grad
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) \
            if dev in ("cuda", "cpu") else (False, None)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        host.copy_(x, non_blocking=x.is_cuda)   # stream-ordered before x's memory is reused
        ctx.host = host
        with torch.no_grad():
            out, context = run(x)
        if context is not None:
            raise NotImplementedError("train.recompute_offload: layers that return a context "
                                      "(cross attention) are not supported")
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(ctx.needs_x_grad)
        ctx.host = None
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out, _ = ctx.run(x)
        torch.autograd.backward(out, grad_out)
        return (x.grad if ctx.needs_x_grad else None), None


def _keeping_cp_maps(forward):
    """forward for one checkpointed call: each run inside one KeptMaps scope (the first records
    the CP op's maps, the recompute takes them back)."""
    kept = KeptMaps()

    def run(*args, **kwargs):
        with kept.scope():
            return forward(*args, **kwargs)
    return run


def enable_layer_recompute(model: torch.nn.Module, offload: bool = False,
                           keep_cp_maps: bool = False) -> int:
    """Wrap every decoder layer of a GPTModel; returns the number of layers wrapped. offload:
    the layers' kept inputs wait in host memory (train.recompute_offload); keep_cp_maps: the CP
    op's maps are kept for the recompute (train.recompute_keep_cp_maps; module docstring)."""
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
            if keep_cp_maps:
                _forward = _keeping_cp_maps(_forward)
            if not offload:
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            # Megatron's TransformerBlock passes hidden_states by keyword; the other inputs
            # (masks, packed_seq_params, rotary tables) need no gradient and are closed over
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            out = _HostKeptLayer.apply(x, lambda h: _forward(h, *rest, **kwargs))
            return out, None

        layer.forward = recomputed
    return len(layers)
