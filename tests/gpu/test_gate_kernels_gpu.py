"""The fused gate kernels (mdn_scale/model/gate_kernels.py) compiled on the GPU, at the 400M
shape (H = 6, the in-projection's 4632 rows, micro-batch 4 × 4096 tokens as Megatron's [S, B, P]
transposed to [B, S, P] views), against the eager MDNMixer.gates: bf16 projections (the trainer
under autocast) and fp32, every output and gradient, with the float64 eager gates as the
reference; the fused kernels must be no worse than eager beyond rounding. Also times both
(forward + backward, recorded, not asserted) and checks the whole mixer takes the kernels on
CUDA. The CPU tests run the same kernels under TRITON_INTERPRET=1: tests/model/test_gate_kernels.py."""
import os
import sys

import pytest
import torch

from .conftest import requires_cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model"))

pytestmark = [pytest.mark.gpu, requires_cuda]

B, T, H, P = 4, 4096, 6, 4632


def _inputs(dtype, momentum=True):
    from test_gate_kernels import _case

    proj, parts, params, cts = _case(B=B, T=T, H=H, seed=0, momentum=momentum)
    dev = torch.device("cuda")
    # the real row width: re-embed the parts as views of a [T, B, P] projection on the GPU
    full = torch.zeros(T, B, P, dtype=dtype, device=dev).transpose(0, 1)
    off = P - 4 * H
    views = {}
    for i, n in enumerate("abme"):
        if parts[n] is None:
            views[n] = None
            continue
        full[..., off + i * H:off + (i + 1) * H] = parts[n].to(dev, dtype)
        views[n] = full[..., off + i * H:off + (i + 1) * H]
    params = {n: (p.to(dev) if p is not None else None) for n, p in params.items()}
    return views, params, [c.to(dev) for c in cts]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("momentum", [True, False])
def test_gate_kernels_match_eager_400m(dtype, momentum, record):
    from test_gate_kernels import NAMES, _eager, _rel, _triton

    views, params, cts = _inputs(dtype, momentum)
    kw = dict(tau=32.0, min_log_mu=-2.0)  # 400M: tau = sqrt(1024 / 1)
    ref, ref_g, _ = _eager(views, params, cts, dtype=torch.float64, **kw)
    eag, eag_g, _ = _eager(views, params, cts, dtype=dtype, **kw)
    tri, tri_g, _ = _triton(views, params, cts, dtype=dtype, **kw)
    if momentum:
        assert (ref["log_mu"] == -2.0).any() and (ref["log_mu"] > -2.0).any()
    errs = {}
    for n in NAMES:
        if not momentum and n == "log_mu":
            assert torch.isinf(tri[n]).all()
            continue
        errs[n] = (_rel(tri[n], ref[n]), _rel(eag[n], ref[n]))
    for n in ref_g:
        assert tri_g[n].dtype == eag_g[n].dtype, n
        errs[n] = (_rel(tri_g[n], ref_g[n]), _rel(eag_g[n], ref_g[n]))
    record(f"gate_kernels_{str(dtype)[6:]}_{'mdn' if momentum else 'gdn'}", errs)
    print(errs)
    for n, (e_t, e_e) in errs.items():
        low = dtype == torch.bfloat16 and n in ("da", "db", "dm", "de")
        assert e_t < (1e-2 if low else 2e-5), (n, e_t, e_e)
        assert e_t <= 2 * e_e + (4e-3 if low else 2e-6), (n, e_t, e_e)


def test_gate_kernels_time_400m(record):
    from test_gate_kernels import _eager, _triton

    views, params, cts = _inputs(torch.bfloat16)
    kw = dict(tau=32.0, min_log_mu=-2.0)
    times = {}
    for name, fn in (("eager", _eager), ("triton", _triton)):
        for _ in range(3):
            fn(views, params, cts, dtype=torch.bfloat16, **kw)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            fn(views, params, cts, dtype=torch.bfloat16, **kw)
        e.record()
        torch.cuda.synchronize()
        times[name] = s.elapsed_time(e) / 20
    record("gate_kernels_time_ms", dict(times, card=torch.cuda.get_device_name(),
                                        note="fwd+bwd incl. the test's cotangent sum, B=4 T=4096 H=6 bf16"))
    print(times)


def test_mixer_takes_the_kernels_on_cuda():
    from mdn_scale.model import mixer_kernels as mk

    x = torch.zeros(1, 4, H, device="cuda", dtype=torch.bfloat16)
    p = [torch.zeros(H, device="cuda")]
    assert mk.use_fused_gates("auto", x, p) and mk.use_fused_gates("fla", x, p)
    assert not mk.use_fused_gates("eager", x, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_correction_kernels_match_eager_1p3b(dtype, record):
    """The output correction's kernels (mdn_scale/model/correction_kernels.py) at the 1.3B
    shape (H = 6, K = 256, q | k | v of the conv output, 2 × 4096 tokens) against the eager
    MDNMixer.correct_q, with float64 as the reference: q' and the gradients of the split conv
    output and D_log; the kernels round once where eager rounds twice."""
    import test_correction_kernels as tc

    saved = (tc.B, tc.T, tc.H, tc.K, tc.V)
    tc.B, tc.T, tc.H, tc.K, tc.V = 2, 4096, 6, 256, 512
    try:
        qkv, D_log, dq, dk = (x.cuda() for x in tc._case(dtype))
        ref = tc._run(tc._eager, qkv.double(), D_log, dq, dk, torch.float64, torch.float64)
        eag = tc._run(tc._eager, qkv, D_log, dq, dk, dtype, torch.float32)
        fus = tc._run(tc.correct_q_triton, qkv, D_log, dq, dk, dtype, torch.float32)
    finally:
        tc.B, tc.T, tc.H, tc.K, tc.V = saved
    errs = {n: (tc._err(f, r), tc._err(e, r))
            for n, f, e, r in zip(("q'", "d qkv", "d D_log"), fus, eag, ref)}
    record(f"correction_kernels_{str(dtype)[6:]}", errs)
    for n, (e_f, e_e) in errs.items():
        # bf16: the cotangents and inputs are rounded to bf16 too (2^-9 each), so one bf16 ulp
        assert e_f < (2 ** -7 if dtype == torch.bfloat16 else 1e-6), (n, e_f, e_e)
        # q', d qkv: one rounding against eager's two; d D_log: two fp32 sums in other orders
        assert e_f <= (e_e * 1.01 + 1e-7 if n != "d D_log" else 2 * e_e + 1e-6), (n, e_f, e_e)
