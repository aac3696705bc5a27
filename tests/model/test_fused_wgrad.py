"""train/wgrad.py: Megatron's gradient-accumulation fusion with our GEMM, in the real model and
Megatron's real linear layers (gloo processes, CPU).

The GEMM is "mm_add" (the default: the product as the unfused layer makes it, added into .grad
in one op), so the gradients must be the unfused ones bit for bit: over two accumulated
micro-batches, after .grad was reset to None (as the CP startup check does), under TP = 1 and 2.
The weights are fp32 here: Megatron's fused path takes no float64 main_grad, and enable leaves
float64 linears unfused. On CUDA under bf16 autocast, and the "addmm" GEMM (fp32 accumulation of
bf16 operands): tests/gpu/test_fused_wgrad_gpu.py."""
from __future__ import annotations

import types

import pytest
import torch

import model_workers as workers
from model_dist import run_jobs
from mdn_scale.model import ModelConfig, build_model
from mdn_scale.train import wgrad

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
            vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=8)


def _batches(n, B=2, S=16, vocab=61):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, S), generator=g)
        out.append((ids, torch.roll(ids, -1, 1)))
    return out


def _backward(model, ids, labels):
    model(ids, None, None, labels=labels).sum().backward()


def _wgrad_worker(rank, world, cfg, sp):
    from megatron.core.tensor_parallel import layers

    workers.init_parallel(tp=world)
    batches = _batches(3)
    out = {}
    for fuse in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**cfg), params_dtype=torch.float32, sequence_parallel=sp)
        calls = []
        if fuse:
            linears = wgrad.enable(model)
            assert wgrad.enable(model) == linears          # idempotent: one hook each
            inner = layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32
            layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
                wgrad_gemm_accum_fp32=lambda *a: (calls.append(a[2].shape), inner(*a))[1])
        for ids, labels in batches[:2]:                     # two micro-batches, accumulated
            _backward(model, ids, labels)
        if sp:
            workers.allreduce_sequence_parallel_grads(model, workers.ps.get_tensor_model_parallel_group())
        accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
        for p in model.parameters():                         # reset as cp_check does
            p.grad = None
        _backward(model, *batches[2])
        after_reset = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[fuse] = dict(accumulated=accumulated, after_reset=after_reset, calls=calls,
                         linears=linears if fuse else 0)
        layers.fused_weight_gradient_mlp_cuda = wgrad.FUSED_MODULE
    return out


# sequence parallelism is not among them: Megatron's reduce-scatter allocates on CUDA
@pytest.mark.parametrize("world,sp", [(1, False), (2, False)])
def test_fused_wgrad_is_the_unfused_gradient(world, sp):
    for res in run_jobs(world, [(_wgrad_worker, (TINY, sp))])[0]:
        plain, fused = res[False], res[True]
        # 2 layers × (in_proj, out_proj, fc1, fc2) + the LM head; every backward through each
        assert fused["linears"] == 9 and len(fused["calls"]) == 3 * 9
        for key in ("accumulated", "after_reset"):
            assert plain[key].keys() == fused[key].keys(), key
            for n, g in plain[key].items():
                assert torch.equal(g, fused[key][n]), (key, n)
        assert any(g.abs().sum() > 0 for g in fused["accumulated"].values())


def _float64_worker(rank, world, cfg):
    workers.init_parallel()
    return wgrad.enable(workers.make_model(cfg, seed=0))   # float64 weights (model_workers)


def test_float64_linears_stay_unfused():
    assert run_jobs(1, [(_float64_worker, (TINY,))])[0][0] == 0


def test_gemm_choice(monkeypatch):
    """MDN_WGRAD_GEMM is checked by name; addmm with out_dtype is never taken on the CPU, and
    asking for it there is an error, not a silent fallback; mm_add (the default) adds the
    operands' dtype product."""
    monkeypatch.setenv("MDN_WGRAD_GEMM", "cublas")
    with pytest.raises(ValueError, match="MDN_WGRAD_GEMM"):
        wgrad.gemm_choice()
    monkeypatch.delenv("MDN_WGRAD_GEMM")
    assert wgrad.gemm_choice() == "mm_add"
    assert not wgrad.addmm_out_dtype_works("cpu")
    x, g = torch.randn(5, 3).bfloat16(), torch.randn(5, 4).bfloat16()
    main = torch.zeros(4, 3)
    monkeypatch.setenv("MDN_WGRAD_GEMM", "addmm")
    with pytest.raises(RuntimeError, match="addmm"):
        wgrad.wgrad_gemm_accum_fp32(x, g, main)
    monkeypatch.setenv("MDN_WGRAD_GEMM", "mm_add")
    wgrad.wgrad_gemm_accum_fp32(x, g, main)      # the bf16 product, added in fp32
    assert torch.equal(main, (g.t() @ x).float())
