"""model.mlp_kernel: Megatron-core's fused SwiGLU (torch.compile'd, TransformerConfig's
bias_activation_fusion) against the eager glu that Megatron's MLP runs without it.

The fused function is compiled here by inductor's CPU backend (about 15 s on two cores, once per
process); the GPU test (tests/gpu/test_mixer_kernels_gpu.py, saved bytes against the memory
estimate) runs the CUDA build of it inside the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdn_scale.model import ModelConfig, to_transformer_config
from mdn_scale.model.config import compiled_mlp
from mdn_scale.train.memory import Layout, layer_activation_terms

SMALL = dict(num_layers=2, hidden_size=64, num_heads=2, head_k_dim=16)


def test_config_choice(monkeypatch):
    """Default 'compiled', checked by name; it applies only where CUDA is available, and it is
    what the TransformerConfig's bias_activation_fusion says (the switch Megatron's MLP reads)."""
    assert ModelConfig().mlp_kernel == "compiled"
    with pytest.raises(ValueError, match="model.mlp_kernel"):
        ModelConfig(mlp_kernel="triton")
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        for choice in ("compiled", "eager"):
            cfg = ModelConfig(**SMALL, mlp_kernel=choice)
            want = cuda and choice == "compiled"
            assert compiled_mlp(cfg) is want
            tc = to_transformer_config(cfg, use_cpu_initialization=True)
            assert tc.bias_activation_fusion is want


def test_estimate_counts_the_saved_tensors(monkeypatch):
    """The memory estimate's MLP row: 10 F (eager: fc1's output, x_lin + 0, silu, product) or
    6 F bytes per token (compiled: fc1's output and the product), by Layout.compiled_mlp or,
    unset, by the model's choice and CUDA where the estimate runs."""
    cfg = ModelConfig(**SMALL)
    F_l = cfg.ffn_size

    def after(**kw):
        return layer_activation_terms(cfg, Layout(precision="bf16", **kw))["after_op"]

    assert after(compiled_mlp=False) - after(compiled_mlp=True) == 4 * F_l
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert after() == after(compiled_mlp=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert after() == after(compiled_mlp=True)


def _saved_bytes(fn, y):
    """Bytes fn(y) saves for its backward (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(y)
    return out, sum(seen.values())


def _eager_glu(y):
    # megatron.core.transformer.mlp.MLP.forward's glu without bias_activation_fusion
    # (glu_linear_offset 0, no clamp)
    x_glu, x_linear = torch.chunk(y, 2, dim=-1)
    return F.silu(x_glu) * (x_linear + 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_swiglu_matches_eager(dtype):
    """What Megatron's MLP calls with bias_activation_fusion (bias_swiglu_impl, no bias) on its
    [S, B, 2F] fc1 output: the eager glu's values and input gradient (float64: to 1e-12; bf16:
    the fused kernel rounds once, eager after each op), keeping only its input for the backward
    (eager also keeps silu and x_lin + 0: 4 F more bytes per token in bf16)."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    torch.manual_seed(0)
    S, B, Fw = 7, 3, 48
    y0 = (torch.randn(S, B, 2 * Fw, dtype=torch.float64) * 2).to(dtype)
    g = torch.randn(S, B, Fw, dtype=torch.float64).to(dtype)
    y_f = y0.clone().requires_grad_(True)
    y_e = y0.clone().requires_grad_(True)
    out_f, saved_f = _saved_bytes(lambda y: bias_swiglu_impl(y, None), y_f)
    out_e, saved_e = _saved_bytes(_eager_glu, y_e)
    assert out_f.shape == out_e.shape == (S, B, Fw) and out_f.dtype == dtype
    out_f.backward(g)
    out_e.backward(g)
    y64 = y0.double()
    a, b = torch.chunk(y64, 2, dim=-1)
    ref = F.silu(a) * b
    sig = torch.sigmoid(a)
    dref = torch.cat([g.double() * b * sig * (1 + a * (1 - sig)), g.double() * F.silu(a)], -1)
    if dtype == torch.float64:
        for x, r in ((out_f, ref), (out_e, ref), (y_f.grad, dref), (y_e.grad, dref)):
            assert (x - r).abs().max().item() < 1e-12
    else:
        # against float64: the fused kernel's one rounding is no worse than eager's three
        for fused, eager, r in ((out_f, out_e, ref), (y_f.grad, y_e.grad, dref)):
            err_f = ((fused.double() - r).abs() / (r.abs() + 1)).max().item()
            err_e = ((eager.double() - r).abs() / (r.abs() + 1)).max().item()
            assert err_f <= 2 ** -8 and err_f <= err_e
    row = S * B * Fw * y0.element_size()
    assert saved_f == 2 * row                     # the fc1 output only
    assert saved_e == 4 * row                     # + silu (F) and x_lin + 0 (F)
