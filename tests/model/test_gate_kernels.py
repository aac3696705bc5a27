"""The mixer's fused gate kernels (mdn_scale/model/gate_kernels.py) under TRITON_INTERPRET=1
against the eager MDNMixer.gates (the reference), forward values and every gradient: strided
in-projection views (B > 1, Megatron's [S, B, P] transposed), the momentum clamp active on part
of the tokens (zero gradient below it), momentum off (log_mu = −inf, no gradient), softplus past
its threshold and deep in its tail, bf16 projections. The kernels compute in fp32: compared
with the eager gates in float64 to fp32 rounding, and with the eager fp32 / bf16 path. On the
GPU at the 400M shape: tests/gpu/test_gate_kernels_gpu.py."""
import os
import types

import pytest
import torch

from mdn_scale.model import mixer_kernels as mk
from mdn_scale.model.gate_kernels import gates_triton
from mdn_scale.model.mixer import MDNMixer

NAMES = ("log_alpha", "log_mu", "beta", "eta")
PARAMS = ("A_log", "dt_bias", "Mu_log", "mu_bias", "log_factor")


def _case(B=2, T=300, H=6, seed=0, scale=3.0, momentum=True):
    """Projections as strided views of a [T, B, P] in-projection output (transposed to [B, T, P]),
    per-head parameters around the DESIGN §6 init, and output cotangents."""
    g = torch.Generator().manual_seed(seed)
    P = 2 * H + 4 * H + 7
    proj = (torch.randn(T, B, P, generator=g) * scale).transpose(0, 1)
    parts = {n: proj[..., 2 * H + i * H:2 * H + (i + 1) * H] for i, n in enumerate("abme")}
    params = dict(A_log=torch.rand(H, generator=g) * 3 - 1, dt_bias=torch.rand(H, generator=g) * 5 - 7,
                  Mu_log=torch.rand(H, generator=g) * 3 - 1, mu_bias=torch.rand(H, generator=g) * 5 - 7,
                  log_factor=torch.rand(H, generator=g) * 2 - 1)
    cts = [torch.randn(B, T, H, generator=g, dtype=torch.float64) for _ in NAMES]
    if not momentum:
        parts["m"] = None
        params["Mu_log"] = params["mu_bias"] = None
    return proj, parts, params, cts


def _eager(parts, params, cts, *, tau, min_log_mu, dtype):
    """MDNMixer.gates itself (its self: the attributes it reads), outputs and gradients."""
    momentum = parts["m"] is not None
    x = {n: (t.detach().to(dtype).requires_grad_(True) if t is not None else None) for n, t in parts.items()}
    p = {n: (t.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
             if t is not None else None) for n, t in params.items()}
    ns = types.SimpleNamespace(cfg=types.SimpleNamespace(momentum=momentum, min_log_mu=min_log_mu),
                               tau=tau, **p)
    out = MDNMixer.gates(ns, x["a"], x["b"], x["m"], x["e"])
    return _backward(out, x, p, cts)


def _triton(parts, params, cts, *, tau, min_log_mu, dtype):
    x = {n: (t.detach().to(dtype).requires_grad_(True) if t is not None else None) for n, t in parts.items()}
    p = {n: (t.detach().float().requires_grad_(True) if t is not None else None) for n, t in params.items()}
    out = gates_triton(x["a"], x["b"], x["m"], x["e"], p["A_log"], p["dt_bias"], p["Mu_log"],
                       p["mu_bias"], p["log_factor"], tau=tau, min_log_mu=min_log_mu)
    return _backward(out, x, p, cts)


def _backward(out, x, p, cts):
    loss = sum((o.double() * c).sum() for o, c in zip(out, cts) if o.requires_grad)
    loss.backward()
    grads = {f"d{n}": t.grad for n, t in {**x, **p}.items() if t is not None}
    return dict(zip(NAMES, (o.detach() for o in out))), grads, out


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("momentum", [True, False])
def test_fp32_against_eager(momentum):
    proj, parts, params, cts = _case(momentum=momentum)
    kw = dict(tau=32.0 ** 0.5, min_log_mu=-2.0)
    ref, ref_g, _ = _eager(parts, params, cts, dtype=torch.float64, **kw)
    eag, eag_g, _ = _eager(parts, params, cts, dtype=torch.float32, **kw)
    tri, tri_g, out = _triton(parts, params, cts, dtype=torch.float32, **kw)
    assert all(o.dtype == torch.float32 and o.shape == parts["a"].shape and o.is_contiguous() for o in out)
    if momentum:
        clamped = ref["log_mu"] == -2.0
        assert 0.05 < clamped.double().mean() < 0.95  # the clamp is active on part of the tokens
        assert torch.equal(tri["log_mu"] == -2.0, clamped)
        assert (tri_g["dm"][clamped] == 0).all() and (tri_g["dm"][~clamped] != 0).all()
        assert (eag_g["dm"][clamped] == 0).all()
    else:
        assert torch.isinf(tri["log_mu"]).all() and (tri["log_mu"] < 0).all()
        assert not out[1].requires_grad
        assert set(tri_g) == {"da", "db", "de", "dA_log", "ddt_bias", "dlog_factor"}
    for n in NAMES:
        if not momentum and n == "log_mu":
            continue
        err, err_eager = _rel(tri[n], ref[n]), _rel(eag[n], ref[n])
        assert err < 2e-6, (n, err, err_eager)
    assert set(tri_g) == set(ref_g)
    for n in ref_g:
        err, err_eager = _rel(tri_g[n], ref_g[n]), _rel(eag_g[n], ref_g[n])
        assert tri_g[n].dtype == eag_g[n].dtype, n
        assert err < 1e-5, (n, err, err_eager)


def test_softplus_tails_and_large_inputs():
    """a + dt_bias past softplus' threshold (20: identity, gradient 1) and far below it (softplus
    ≈ e^x: log(1 + e^x) would round to 0 where log1p keeps every digit); large |e|/τ (η down
    to ~1e-4: not so far that fp32 rounds η to 0, which no fp32 path can avoid)."""
    proj, parts, params, cts = _case(T=200, scale=12.0, seed=3)
    params["dt_bias"] = torch.tensor([-30.0, -12.0, 0.0, 12.0, 25.0, -3.0])
    params["mu_bias"] = torch.tensor([25.0, -25.0, -9.0, 3.0, 0.0, -1.0])
    kw = dict(tau=8.0, min_log_mu=-50.0)
    ref, ref_g, _ = _eager(parts, params, cts, dtype=torch.float64, **kw)
    tri, tri_g, _ = _triton(parts, params, cts, dtype=torch.float32, **kw)
    sa = parts["a"].double() + params["dt_bias"].double()
    assert (sa > 20).any() and (sa < -20).any()
    for n in NAMES:
        # per element: the tiny log_alpha values of the deep tail must keep their digits
        rel = ((tri[n].double() - ref[n]).abs() / ref[n].abs().clamp(min=1e-30)).max().item()
        assert rel < 2e-5, (n, rel)
    for n in ref_g:
        assert _rel(tri_g[n], ref_g[n]) < 1e-5, n


def test_bf16_projections():
    """bf16 projections (the in-projection's output under autocast): fp32 math on the bf16
    values, input gradients rounded to bf16 as the eager path's cast does."""
    proj, parts, params, cts = _case(seed=1)
    kw = dict(tau=4.0, min_log_mu=-1.0)
    bf = {n: t.to(torch.bfloat16) for n, t in parts.items()}
    ref, ref_g, _ = _eager(bf, params, cts, dtype=torch.float64, **kw)
    eag, eag_g, _ = _eager(bf, params, cts, dtype=torch.bfloat16, **kw)
    tri, tri_g, out = _triton(bf, params, cts, dtype=torch.bfloat16, **kw)
    for n in NAMES:
        assert out[NAMES.index(n)].dtype == eag[n].dtype == torch.float32
        assert _rel(tri[n], ref[n]) < 2e-6, n
    for n in ref_g:
        assert tri_g[n].dtype == eag_g[n].dtype, n
        if n in ("da", "db", "dm", "de"):
            # bf16 gradients: an accurate fp32 value rounded to bf16, each element within half
            # a bf16 ulp (2^-8 relative) of the float64 gradient, as the eager path's are.
            # Triton's CPU interpreter truncates fp32 → bf16 (cast_impl passes no rounding mode;
            # see tests/kernels/test_recompute_pairs.py): a whole ulp there.
            ulp = 2.0 ** -7 if os.environ.get("TRITON_INTERPRET") == "1" else 2.0 ** -8
            for got, u in ((tri_g[n], ulp), (eag_g[n], 2.0 ** -8)):
                err = (got.double() - ref_g[n]).abs()
                assert (err <= u * ref_g[n].abs() + 1e-6 * ref_g[n].abs().max()).all(), n
        else:
            err, err_eager = _rel(tri_g[n], ref_g[n]), _rel(eag_g[n], ref_g[n])
            assert err < 1e-5, (n, err, err_eager)


def test_deterministic_and_odd_shapes():
    """Per-head parameter gradients: per-program partial sums + one torch sum, the same bits every
    time; T not a multiple of the block, H not a power of two, B = 1."""
    proj, parts, params, cts = _case(B=1, T=BLOCK_T, H=3, seed=2)
    kw = dict(tau=2.0, min_log_mu=-2.0)
    a, a_g, _ = _triton(parts, params, cts, dtype=torch.float32, **kw)
    b, b_g, _ = _triton(parts, params, cts, dtype=torch.float32, **kw)
    ref, ref_g, _ = _eager(parts, params, cts, dtype=torch.float64, **kw)
    for n in NAMES:
        assert torch.equal(a[n], b[n]) and _rel(a[n], ref[n]) < 2e-6, n
    for n in a_g:
        assert torch.equal(a_g[n], b_g[n]) and _rel(a_g[n], ref_g[n]) < 1e-5, n


BLOCK_T = 3 * 128 + 5


def test_dispatch():
    """CPU tensors and float64 take the eager gates; CUDA 16/32-bit with fp32 parameters the
    kernels, unless model.mixer_kernels is 'eager'."""
    p32 = [torch.zeros(2)]
    for choice in ("auto", "fla", "eager"):
        assert not mk.use_fused_gates(choice, torch.zeros(1, 2, 2), p32)
    with pytest.raises(ValueError, match="one dtype"):
        z = torch.zeros(1, 4, 2)
        gates_triton(z, z, None, z.double(), *[torch.zeros(2)] * 2, None, None, torch.zeros(2),
                     tau=1.0, min_log_mu=-1.0)
    if torch.cuda.is_available():
        x = torch.zeros(1, 2, 2, device="cuda", dtype=torch.bfloat16)
        assert mk.use_fused_gates("auto", x, [p.cuda() for p in p32])
        assert not mk.use_fused_gates("eager", x, [p.cuda() for p in p32])
        assert not mk.use_fused_gates("auto", x.double(), [p.cuda() for p in p32])
        assert not mk.use_fused_gates("auto", x, [p.cuda().double() for p in p32])
