"""train.recompute_offload (mdn_scale/train/recompute.py): a layer's kept input lives in host
memory between its forward and its backward, and the gradients equal plain recompute's."""
import gc
import weakref

import pytest
import torch
from torch import nn

from mdn_scale.train.recompute import enable_layer_recompute


class Layer(nn.Module):
    """Megatron's layer interface: forward(hidden_states=..., mask) -> (out, context)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None):
        h = torch.tanh(self.w(hidden_states))
        if attention_mask is not None:
            h = h * attention_mask
        return hidden_states + h, None


class Model(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(Layer(d) for _ in range(n))

    def forward(self, x, mask):
        for layer in self.decoder.layers:
            x, _ = layer(hidden_states=x, attention_mask=mask)
        return x


def _grads(mode, x, mask, ct):
    torch.manual_seed(0)
    m = Model().double()
    if mode != "none":
        assert enable_layer_recompute(m, offload=(mode == "offload")) == 3
    x = x.clone().requires_grad_(True)
    (m(x, mask) * ct).sum().backward()
    return [x.grad] + [p.grad for p in m.parameters()]


def test_offload_gives_plain_recompute_gradients():
    g = torch.Generator().manual_seed(1)
    x, mask, ct = (torch.randn(5, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = _grads("none", x, mask, ct)
    for mode in ("checkpoint", "offload"):
        for a, b in zip(_grads(mode, x, mask, ct), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("offload", [False, True])
def test_the_kept_input_leaves_the_device_copy(offload):
    """After the forward, plain recompute holds each layer's input (the tensor itself); with
    offload only a copy does, so the input's own memory is free (on a GPU: its device memory)."""
    torch.manual_seed(0)
    m = Model()
    enable_layer_recompute(m, offload=offload)
    x = torch.randn(5, 2, 8, requires_grad=True)
    h = m.decoder.layers[0](hidden_states=x)[0]   # layer 1's input: made here, kept by layer 1
    ref = weakref.ref(h)
    out, _ = m.decoder.layers[1](hidden_states=h)
    del h
    gc.collect()
    assert (ref() is None) == offload
    out.sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for layer in m.decoder.layers[:2] for p in layer.parameters())


def test_offload_needs_recompute():
    from mdn_scale.train.config import ConfigError, RunConfig, validate

    cfg = RunConfig()
    cfg.train.recompute_offload = True
    with pytest.raises(ConfigError, match="train.recompute_offload .* set train.recompute=true"):
        validate(cfg, 1, has_cuda=False)


class SeeingLayer(Layer):
    """Records, at each run of its forward, the KeptMaps scope it runs in (what the CP op reads)
    and whether that run records or replays."""

    def __init__(self, d, seen):
        super().__init__(d)
        self.seen = seen

    def forward(self, hidden_states, attention_mask=None):
        from mdn_kernels.cp.kept import current

        kept = current()
        self.seen.append(None if kept is None else (id(kept), kept.replay_at))
        if kept is not None:
            kept.take(("call",)) if kept.replay_at is not None else kept.keep(("call",), "maps")
        return super().forward(hidden_states, attention_mask)


@pytest.mark.parametrize("offload", [False, True], ids=["recompute", "offload"])
def test_keep_cp_maps_gives_each_layer_call_one_scope_for_both_runs(offload):
    """train.recompute_keep_cp_maps: a layer's forward and its recompute run in one KeptMaps
    scope (the first run records, the recompute replays), another layer in another; the
    gradients equal plain recompute's. Without the setting no scope is open."""
    x, mask, ct = torch.randn(4, 8, dtype=torch.float64), None, torch.randn(4, 8, dtype=torch.float64)
    results = {}
    for keep in (False, True):
        torch.manual_seed(0)
        m, seen = Model(), []
        m.decoder.layers = nn.ModuleList(SeeingLayer(8, seen) for _ in range(2))
        m = m.double()
        enable_layer_recompute(m, offload=offload, keep_cp_maps=keep)
        xi = x.clone().requires_grad_(True)
        (m(xi, mask) * ct).sum().backward()
        results[keep] = (seen, [xi.grad] + [p.grad for p in m.parameters()])
    plain, kept = results[False][0], results[True][0]
    assert plain == [None] * 4   # two layers, forward and recompute
    assert [r for _, r in kept] == [None, None, 0, 0], kept   # record, record; replay (layer 1, then 0)
    assert kept[0][0] == kept[3][0] and kept[1][0] == kept[2][0] and kept[0][0] != kept[1][0], kept
    for a, b in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
