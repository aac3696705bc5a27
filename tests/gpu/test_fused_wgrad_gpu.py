"""train/wgrad.py on CUDA under bf16 autocast over fp32 weights (how the trainer runs): the
fused weight-gradient accumulation's two GEMMs against Megatron's unfused linears, same weights,
two micro-batches accumulated. "mm_add" must give the unfused gradients bit for bit (where two unfused runs
agree bit for bit; else within their spread); "addmm"
(bf16 operands, fp32 accumulation in cuBLAS: the product is not rounded to bf16 first) must be
as close to them as one bf16 rounding of the product. The CPU suite checks the mechanism in
fp32 under TP = 1 and 2 (tests/model/test_fused_wgrad.py)."""
import os
import sys

import pytest
import torch

from .conftest import rel, requires_cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model"))

pytestmark = [pytest.mark.gpu, requires_cuda]

CFG = dict(hidden_size=256, num_layers=2, num_heads=2, head_k_dim=64, vocab_size=512,
           ffn_hidden_size=512, seq_len=512, chunk_size=64)


def _worker(rank, world, cfg):
    from mdn_scale.model import ModelConfig, build_model
    from mdn_scale.train import wgrad
    from model_workers import init_parallel

    init_parallel()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, cfg["vocab_size"], (2, 512), generator=g) for _ in range(2)]
    out = {"addmm_works": wgrad.addmm_out_dtype_works("cuda")}
    for name in ("unfused", "unfused_again", "mm_add", "addmm"):
        if name == "addmm" and not out["addmm_works"]:
            continue
        torch.manual_seed(0)
        model = build_model(ModelConfig(**cfg), use_cpu_initialization=True).cuda()
        plain = name.startswith("unfused")
        os.environ["MDN_WGRAD_GEMM"] = "mm_add" if plain else name
        fused = 0 if plain else wgrad.enable(model)
        for ids in batches:
            ids = ids.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, None, None, labels=torch.roll(ids, -1, 1)).float().mean()
            loss.backward()
        out[name] = dict(fused=fused, grads={n: p.grad.detach().cpu()
                                             for n, p in model.named_parameters()})
    os.environ.pop("MDN_WGRAD_GEMM", None)
    return out


def test_fused_wgrad_addmm(record):
    from model_dist import run_jobs

    res = run_jobs(1, [(_worker, (CFG,))], backend="nccl")[0][0]
    plain, mm_add = res["unfused"]["grads"], res["mm_add"]["grads"]
    assert res["mm_add"]["fused"] == 2 * 4 + 1
    # bitwise where the model itself repeats bitwise (a kernel's atomics would not)
    repeats = all(torch.equal(gr, res["unfused_again"]["grads"][n]) for n, gr in plain.items())
    noise = max(rel(res["unfused_again"]["grads"][n], gr) for n, gr in plain.items())
    for n, gr in plain.items():
        assert torch.equal(gr, mm_add[n]) if repeats else rel(mm_add[n], gr) <= 2 * noise, n
    errs = {}
    if res["addmm_works"]:
        addmm = res["addmm"]["grads"]
        errs = {n: rel(addmm[n], gr) for n, gr in plain.items()}
        assert max(errs.values()) < 2 ** -7, errs
    record("fused_wgrad", {"addmm_works": res["addmm_works"], "model_repeats_bitwise": repeats,
                           "unfused_run_to_run_rel_max": noise,
                           "addmm_vs_unfused_rel_max": max(errs.values()) if errs else None})
