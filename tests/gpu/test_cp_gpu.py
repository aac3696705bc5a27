"""Context parallelism on GPUs (NCCL, Triton backend) at real shapes: CP = R against CP = 1.

R = 1, 2, 4 processes, one GPU each (skipped where fewer GPUs exist). fp32 must agree to 1e-5
(the CPU suite's bound); bf16 (bf16 operands, fp32 state) must stay within the op's own bf16
error: CP = R's error against an fp32 run may exceed CP = 1's by at most half. Also the
group-map kernel (transition.py) against its float64 torch spec. Every run starts from an
allocator poisoned with NaN.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdn_kernels import mdn_chunk
from mdn_kernels.mdn.testing import random_inputs

from .conftest import poison_allocator, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

H, K, V, C = 6, 128, 256, 64
T_TOTAL = 8192
NAMES = ["o", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]
CASES = {  # name → (dtype, global cu_seqlens or None)
    "fp32": (torch.float32, None),
    "fp32_packed": (torch.float32, [0, 3000, 5000, 5001, T_TOTAL]),
    "bf16": (torch.bfloat16, None),
    # the trainer's case (packed documents, 16-bit): whole-model CP runs gave NaN / 1e6 gradients
    "bf16_packed": (torch.bfloat16, [0, 3000, 5000, 5001, T_TOTAL]),
    # and the model's dtypes: bf16 q, k, v with fp32 gates (the gate kernels' output)
    "bf16_fp32_gates": ((torch.bfloat16, torch.float32), [0, 3000, 5000, 5001, T_TOTAL]),
}


# "allgather_lean": the opt-in lean node (MDN_CP_LEAN, kernels/cp/state_pass_cp.CPStateOutput) in
# segments of one 2048-token group (two per rank at R = 2); it applies to the 16-bit cases (the
# fused chunk-local kernels), the fp32 ones run the default path under it
MODES = ("allgather", "ring", "allgather_lean")
MODE_ENV = {"allgather_lean": {"MDN_CP_LEAN": "1", "MDN_CP_LEAN_SEGMENT_TOKENS": "2048"}}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def inputs(dtype, seed=0):
    """dtype, or (q/k/v dtype, gate dtype)."""
    dtype, gate_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    xs = random_inputs(1, T_TOTAL, H, K, V, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(1, T_TOTAL, H, V, generator=g)
    return [x.to(dtype if i < 3 else gate_dtype) for i, x in enumerate(xs)], do.to(dtype)


def run(xs, do, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    o, _ = mdn_chunk(*leaves, backend="triton", chunk_size=C, **kw)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def worker(rank, R, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=R, device_id=torch.device("cuda", rank))
    poison_allocator(0.3)
    n = T_TOTAL // R
    sl = slice(rank * n, (rank + 1) * n)
    out = {}
    for name, (dtype, cu) in CASES.items():
        xs, do = inputs(dtype)
        xs, do = [x.cuda() for x in xs], do.cuda()
        cu_t = None if cu is None else torch.tensor(cu, device="cuda")
        for mode in MODES:
            os.environ.update(MODE_ENV.get(mode, {}))
            try:
                res = run([x[:, sl] for x in xs], do[:, sl].contiguous(), cu_seqlens=cu_t,
                          cp_group=dist.group.WORLD, cp_mode=mode.split("_")[0])
            finally:
                for k in MODE_ENV.get(mode, {}):
                    os.environ.pop(k, None)
            out[(name, mode)] = [t.cpu() for t in res]
        if rank == 0:
            out[(name, "cp1")] = [t.cpu() for t in run(xs, do, cu_seqlens=cu_t)]
            out[(name, "fp32")] = [t.cpu() for t in run([x.float() for x in xs], do.float(),
                                                         cu_seqlens=cu_t)]
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("R", [1, 2, 4])
def test_cp_matches_cp1_on_gpus(R, record):
    if torch.cuda.device_count() < R:
        pytest.skip(f"needs {R} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(R, free_port(), d), nprocs=R, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(R)]
    n = T_TOTAL // R
    for name, (dtype, _) in CASES.items():
        cp1, f32 = ranks[0][(name, "cp1")], ranks[0][(name, "fp32")]
        for mode in MODES:
            got = [torch.cat([r[(name, mode)][i] for r in ranks], dim=1) for i in range(len(NAMES))]
            errs = {}
            for i, key in enumerate(NAMES):
                e_cp, e_1, e_cp32 = rel(got[i], cp1[i]), rel(cp1[i], f32[i]), rel(got[i], f32[i])
                errs[key] = dict(cp_vs_cp1=e_cp, cp1_vs_fp32=e_1, cp_vs_fp32=e_cp32)
                assert torch.isfinite(got[i]).all(), f"R={R} {name} {mode}: {key} not finite"
                if dtype == torch.float32:
                    assert e_cp <= 1e-5, f"R={R} {name} {mode}: {key} {e_cp:.2e}"
                else:
                    assert e_cp32 <= 1.5 * e_1 + 1e-6, f"R={R} {name} {mode}: {key} {errs[key]}"
            record(f"cp_R{R}_{name}_{mode}", dict(tokens=T_TOTAL, tokens_per_rank=n, H=H, K=K,
                                                  V=V, errors=errs))


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-2)])
def test_group_map_kernel_against_float64(allow_tf32, tol, record):
    """[𝒯_g | ℬ_g] of 8 groups of 8 chunks, Triton (fp32 operands, or bf16 as for 16-bit
    models) against the torch spec in float64."""
    from mdn_kernels.cp.transition import group_maps_torch, group_maps_triton, plan_groups
    from mdn_kernels.mdn.chunk_torch import chunk_prepare
    from mdn_kernels.mdn.layout import build_layout
    from mdn_kernels.mdn.naive import l2norm
    poison_allocator()
    T = 64 * C
    q, k, v, la, lm, beta, eta = (t.cuda() for t in random_inputs(1, T, H, K, V, dtype=torch.float64, seed=3))
    layout = build_layout(1, T, None, C, k.device)
    flat = lambda x: x.reshape(T, *x.shape[2:])  # noqa: E731
    kc = layout.to_chunks(l2norm(flat(k)))
    prep = chunk_prepare(kc, kc, layout.to_chunks(flat(v)),
                         *(layout.to_chunks(flat(g)) for g in (la, lm, beta, eta)), p_times_alpha=True)
    args = [prep[n] for n in ("U", "Y", "Z", "Kg", "Km", "a_end", "g_end", "u_end")]
    plan = plan_groups(layout, 8)
    ref = group_maps_torch(*args, plan.g_start, plan.g_len)
    low = torch.bfloat16 if allow_tf32 else torch.float32
    a32 = [t.to(low).contiguous() if i < 5 else t.float().contiguous() for i, t in enumerate(args)]
    got = group_maps_triton(*a32, plan.g_start, plan.g_len, allow_tf32)
    err = rel(got, ref)
    record(f"cp_group_maps_{'bf16' if allow_tf32 else 'fp32'}", dict(rel_err=err))
    assert torch.isfinite(got).all() and err <= tol, err


@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reverse_pass_init_only_matches_full_kernel(low, record):
    """The reverse state-pass kernel with init_only (CP's first backward pass: no per-chunk
    stores) gives the full kernel's initial-pair gradient, at the benchmark shape (Hopper
    compiles the two variants separately)."""
    from mdn_kernels.mdn.layout import build_layout
    from mdn_kernels.mdn.state_pass import state_pass_bwd_triton, state_pass_fwd_triton
    poison_allocator()
    g = torch.Generator(device="cuda").manual_seed(7)
    NC, Nseq = 64, 4
    layout = build_layout(Nseq, NC // Nseq * C, None, C, torch.device("cuda"))
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    U, Y, Z, Kg, Km = (r(NC, H, C, V) * 0.1).to(low), *((r(NC, H, C, K) * 0.02).to(low) for _ in range(4))
    a, gg, u = torch.rand(3, NC, H, device="cuda", generator=g)
    S0, M0 = r(2, Nseq, H, K, V)
    prec = low != torch.float32
    _, S0s, M0s, _, _ = state_pass_fwd_triton(U, Y, Z, Kg, Km, a, gg, u, S0, M0, layout, prec)
    cot = (r(NC, H, C, V).to(low), r(NC, H, K, V).to(low), r(NC, H, K, V).to(low), *r(2, Nseq, H, K, V))
    full = state_pass_bwd_triton(Y, Z, Kg, Km, a, gg, u, *cot, S0s, M0s, layout, prec)
    dS, dM = state_pass_bwd_triton(Y, Z, Kg, Km, a, gg, u, *cot, None, None, layout, prec,
                                   init_only=True)
    err = max(rel(dS, full[3]), rel(dM, full[4]))
    record(f"state_pass_bwd_init_only_{'bf16' if prec else 'fp32'}", dict(rel_err=err))
    assert torch.isfinite(dS).all() and torch.isfinite(dM).all() and err <= 1e-6, err


def test_offsets_reach_the_gpu_without_a_host_sync():
    """The CP op's local offsets and the halo conv's padded offsets (device_copy_of_host): no
    host sync to copy them to the GPU nor to read them back for validation (torch's sync debug
    mode raises on any), and the values are the host's. Session 18's --sync-report counted three
    such syncs per micro-batch at CP = 4."""
    from mdn_kernels.cp.halo import padded_doc_offsets
    from mdn_kernels.mdn.layout import device_copy_of_host, host_cu_seqlens

    host = torch.tensor([0, 5, 130, 3000, 4096], dtype=torch.int64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dev = device_copy_of_host(host, "cuda")
        back = host_cu_seqlens(dev)
        padded = padded_doc_offsets(dev, 2048, 4, 2048)
        padded_host = host_cu_seqlens(padded)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert dev.is_cuda and torch.equal(dev.cpu(), host) and torch.equal(back, host)
    assert padded.is_cuda and padded.dtype == torch.int32
    assert padded.cpu().tolist() == padded_host.tolist() == [0, 3 + 3000 - 2048, 2048 + 3]
