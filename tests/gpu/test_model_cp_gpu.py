"""The whole model under context parallelism on GPUs (NCCL), against CP = 1 on the same GPU.

The op-level CP tests (test_cp_gpu.py) passed, yet whole-model CP runs on the H100s reported
gradient norms of 6e6 (400M, CP = 4) and NaN (1.3B, CP = 4) where CP = 1 gives ~5. This test
found it in the model (session 5, benchmarks/results/cp_model_h100x4.json: layer 0's gate
gradients off by up to 4.6× their norm), but it depends on the machine: on some lent H100
machines every 16-bit CP run was wrong, on others every one was right, with the same code
(session 6; the torch chunk-local ops failed too on a wrong machine). The fp32 model and the
torch op passed everywhere. This test runs what the trainer runs: the MDN model at the 400M
mixer's shape (d = 1024, H = 6, K = 128, V = 256; 2 layers, small vocabulary), bf16 autocast
over fp32 weights, packed documents, the per-token loss summed, gradients summed over the CP
group; then the same on one rank with the whole sequence. Variants switch the GPU-only parts off one at a time (fused gates, FLA conv /
norm, the Triton op, autocast), so a failure names the part. Every rank starts from an allocator
poisoned with NaN.
"""
from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch

from .conftest import poison_allocator, rel, requires_cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model"))

pytestmark = [pytest.mark.gpu, requires_cuda]

CFG = dict(hidden_size=1024, num_layers=2, num_heads=6, head_k_dim=128, vocab_size=509,
           ffn_hidden_size=1024, seq_len=8192, chunk_size=64)
T = 8192
DOCS = {"one_doc": [0, T], "docs": [0, 1000, 4100, 4101, 6000, T]}
# name → (model overrides, environment, bf16 autocast)
VARIANTS = {
    "default": ({}, {}, True),
    "eager_gates": ({}, {"MDN_GATES": "eager"}, True),
    # the eager conv with its masked halo (the CP conv before session 11; default: FLA's conv
    # over the halo-padded slice)
    "eager_conv": ({}, {"MDN_CONV": "eager"}, True),
    # FLA's conv over the slice alone, the previous rank's rows as its initial state (opt-in
    # since session 20: mixer_kernels.cp_conv_halo)
    "halo_state_conv": ({}, {"MDN_CP_CONV_HALO": "state"}, True),
    "eager_mixer_kernels": ({"mixer_kernels": "eager"}, {}, True),
    "torch_op": ({"mixer_kernels": "eager", "backend": "torch"}, {}, True),
    # the torch chunk-local ops beside the Triton state pass (CP's default in session 5)
    "torch_local": ({}, {"MDN_FUSED_LOCAL": "0"}, True),
    "fp32": ({}, {}, False),
}
# Diagnostics, run only when MDN_CP_VARIANTS names them: MDN_RECOMPUTE_PAIRS=0, where CP = 1
# runs the very kernels CP runs (LocalPrepare → StatePass → LocalOutput) instead of the lean
# StateOutput path (on a machine where CP is wrong: is CP = 1 then wrong too?).
DIAGNOSTIC_VARIANTS = {
    "fused_local_mode0": ({}, {"MDN_RECOMPUTE_PAIRS": "0"}, True),
}
ALL_VARIANTS = {**VARIANTS, **DIAGNOSTIC_VARIANTS}


def _seed() -> int:
    """MDN_CP_SEED: the tokens' and the weights' seed (default 0), to see the bf16 rule's spread."""
    return int(os.environ.get("MDN_CP_SEED", "0"))


def _step(model, ids, labels, cu, autocast):
    from megatron.core.packed_seq_params import PackedSeqParams
    model.zero_grad(set_to_none=True)
    dev = ids.device
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    mx = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                          max_seqlen_q=mx, max_seqlen_kv=mx)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        per_token = model(ids, None, None, labels=labels, packed_seq_params=psp)
    per_token.float().sum().backward()
    return per_token.detach().float()


def _worker(rank, world, variants, docs, cfg=CFG):
    """Per (variant, documents): CP = world against CP = 1 (every rank runs the reference).
    Runs on CPU with gloo as well (the harness's own check:
    tests/model/test_model_parallel.py::test_gpu_cp_model_harness_on_cpu)."""
    from megatron.core import parallel_state as ps
    import torch.distributed as dist
    from mdn_scale.model import ModelConfig, build_model

    cuda = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    T = cfg["seq_len"]
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=g).to(dev)
    labels = torch.randint(0, cfg["vocab_size"], (1, T), generator=g).to(dev)
    poison = poison_allocator if cuda else (lambda fraction: None)

    def build(overrides):
        torch.manual_seed(seed)
        return build_model(ModelConfig(**dict(cfg, **overrides)), use_cpu_initialization=True).to(dev)

    def run(cp, cu, overrides, autocast):
        """One model step at CP = cp: the per-token loss [1, T] (gathered over CP) and every
        parameter's gradient (summed over CP)."""
        poison(0.3)
        ps.initialize_model_parallel(context_parallel_size=cp)
        try:
            group = ps.get_context_parallel_group()
            model = build(overrides)
            n = T // cp
            sl = slice(group.rank() * n, (group.rank() + 1) * n)
            loss = _step(model, ids[:, sl].contiguous(), labels[:, sl].contiguous(), cu, autocast)
            grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters()}
            if cp > 1:
                for gr in grads.values():
                    dist.all_reduce(gr, group=group)
                parts = [torch.empty_like(loss) for _ in range(cp)]
                dist.all_gather(parts, loss.contiguous(), group=group)
                loss = torch.cat(parts, 1)
            return loss, grads
        finally:
            ps.destroy_model_parallel()

    out = {}
    for dname, cu in docs.items():
        # the fp32 model at CP = 1 (default kernels): what every variant's rounding is measured against
        loss32, ref32 = run(1, cu, {}, False)
        for vname in variants:
            overrides, env, autocast = ALL_VARIANTS[vname]
            with mock.patch.dict(os.environ, env):
                loss1, ref = run(1, cu, overrides, autocast)
                loss_cp, got = run(world, cu, overrides, autocast)
            out[(vname, dname)] = dict(
                loss=dict(cp_vs_cp1=rel(loss_cp, loss1), cp1_vs_fp32=rel(loss1, loss32),
                          cp_vs_fp32=rel(loss_cp, loss32)),
                grads={name: dict(cp_vs_cp1=rel(got[name], ref[name]),
                                  cp1_vs_fp32=rel(ref[name], ref32[name]),
                                  cp_vs_fp32=rel(got[name], ref32[name]),
                                  norm_fp32=float(ref32[name].norm()), norm_cp=float(got[name].norm()))
                       for name in ref32},
                nonfinite=[name for name, gr in got.items() if not torch.isfinite(gr).all()])
    return out


@pytest.mark.parametrize("R", [2, 4])
def test_model_cp_matches_cp1(R, record):
    """CP = R of the trainer's model step is as close to the fp32 model (CP = 1) as CP = 1 is:
    per-token loss and every parameter's gradient (CP's relative error at most 1.5× CP = 1's
    plus 1e-3 in bf16, 5e-5 in fp32: plan o measured 1.4e-5 for fp32 CP = 4), all finite, for every variant.

    The bf16 rule is known to fail on some seeds without a CP defect (session 21, two H200s,
    one_doc, default variant; fp32 passes): the per-head parameters (dt_bias, A_log, D_log, ...)
    get gradients that are sums over every token with much cancellation, so their bf16 errors
    vary several-fold from seed to seed (layer 1's dt_bias: CP = 1 against fp32 2.4e-2 at seed 2,
    4.5e-3 at seed 3), and two such draws break a 1.5× ratio: seed 0 failed on D_log (9.6e-3
    against 9.1e-3 allowed), seed 2 on dt_bias (6.2e-2 against 3.7e-2), seed 3 passed.
    BENCHMARKS.md, GPU tests, has the numbers; MDN_CP_SEED picks the seed."""
    if torch.cuda.device_count() < R:
        pytest.skip(f"needs {R} GPUs, found {torch.cuda.device_count()}")
    from model_dist import run_jobs

    variants = os.environ.get("MDN_CP_VARIANTS", ",".join(VARIANTS)).split(",")
    docs = {d: DOCS[d] for d in os.environ.get("MDN_CP_DOCS", ",".join(DOCS)).split(",")}
    res = run_jobs(R, [(_worker, (variants, docs))], backend="nccl")[0][0]
    failures = []
    for (vname, dname), r in res.items():
        g = r["grads"]
        # CP's error against the fp32 model may exceed CP = 1's by half (and rounding-size slack)
        excess = {n: e["cp_vs_fp32"] - 1.5 * e["cp1_vs_fp32"] for n, e in g.items()}
        worst = sorted(excess, key=lambda n: -excess[n])[:3]
        record(f"model_cp{R}_{vname}_{dname}" + (f"_seed{_seed()}" if _seed() else ""), r)
        print(f"CP={R} {vname:20s} {dname:8s} loss {r['loss']} nonfinite {r['nonfinite'][:4]}", flush=True)
        for n in worst:
            print(f"    {n}: {g[n]}", flush=True)
        slack = 1e-3 if ALL_VARIANTS[vname][2] else 5e-5
        bad = [n for n in g if excess[n] > slack]
        if r["nonfinite"] or bad or r["loss"]["cp_vs_fp32"] > 1.5 * r["loss"]["cp1_vs_fp32"] + slack:
            failures.append((vname, dname, r["loss"], bad[:3], r["nonfinite"][:3]))
    assert not failures, failures
