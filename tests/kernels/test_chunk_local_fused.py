"""Fused chunk-local kernels (LocalPrepare, LocalOutput) against torch autograd of the torch
spec (chunk._local_prepare / _local_output) in float64: outputs and every input gradient, at
small shapes (chunk 16), ragged lengths and packed documents. Kernels run in fp32 (on CPU under
TRITON_INTERPRET=1; bf16 operands are checked on the GPU by tools/check_fused_gpu.py)."""
import pytest
import torch

from mdn_kernels.mdn import chunk_local_fused as fused
from mdn_kernels.mdn.chunk import _local_output, _local_prepare
from mdn_kernels.mdn.layout import build_layout
from mdn_kernels.mdn.testing import random_inputs

PREP_NAMES = ["qc", "kc", "et", "la", "g0", "gam", "U", "Y", "Z", "Kg", "Km", "a_end", "g_end",
              "u_end"]
IN_NAMES = ["dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]
OUT_IN_NAMES = ["dqc", "dkc", "det", "dla", "dg0", "dgam", "dW", "dS0s", "dM0s"]


def fused_prepare(*args, raw_qk=True):
    """LocalPrepare's 14 outputs of chunk._local_prepare (not the l2norm scales after them);
    raw_qk: its backward reads the raw q, k and those scales (the default path, chunk.raw_qk)
    instead of keeping the fp32 q̂, k̂ chunks."""
    return fused.LocalPrepare.apply(*args, None, raw_qk)[:14]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(names, out, ref, tol):
    assert len(out) == len(ref)
    for name, a, b in zip(names, out, ref):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def cotangents(ts, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in ts]


def grads_of(outs, xs, cots):
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cots))
    return torch.autograd.grad(loss, xs)


SHAPES = [  # B, T, H, K, V, cu_seqlens lengths (None: batched)
    (2, 45, 2, 16, 32, None),            # ragged: 45 = 2·16 + 13
    (1, 96, 2, 32, 32, [5, 40, 17, 1, 33]),  # packed documents, lengths not multiples of 16
    (1, 32, 1, 24, 20, None),            # K, V not powers of two (masked block tails)
]


def _inputs(B, T, H, K, V, lens, seed, mu_zero=False, chunk=16):
    xs64 = random_inputs(B, T, H, K, V, dtype=torch.float64, seed=seed)
    if mu_zero:
        xs64[4] = torch.full_like(xs64[4], float("-inf"))
    cu = None if lens is None else torch.tensor([0] + lens).cumsum(0)
    layout = build_layout(B, T, cu, chunk, torch.device("cpu"))
    return xs64, layout


def _prepare_against_float64(xs64, layout, chunk, seed, norm=True, p_times_alpha=True):
    """LocalPrepare in fp32 against float64 autograd of the torch spec: the 14 outputs and every
    input gradient (relative error < 1e-5); returns the fused path's input gradients."""
    args = (layout.dest, layout.num_chunks, chunk)
    x_ref = [x.clone().requires_grad_() for x in xs64]
    ref = _local_prepare(*x_ref, *args, torch.float64, norm, p_times_alpha, None)
    x_out = [x.float().requires_grad_() for x in xs64]
    out = fused_prepare(*x_out, *args, torch.float32, norm, p_times_alpha, None)
    check(PREP_NAMES, [o.detach() for o in out], [r.detach() for r in ref], 1e-5)
    cots = cotangents(ref, seed=seed)
    g_out = grads_of(out, x_out, cots)
    check(IN_NAMES, g_out, grads_of(ref, x_ref, cots), 1e-5)
    return g_out


@pytest.fixture(params=[64, 16], ids=["one-block", "block-loops"])
def block_cap(request, monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_K", request.param)
    monkeypatch.setattr(fused, "BLOCK_V", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=["ragged", "packed", "odd-KV"])
@pytest.mark.parametrize("p_times_alpha", [True, False])
def test_local_prepare(shape, p_times_alpha, block_cap):
    B, T, H, K, V, lens = shape
    if lens is not None:
        T = sum(lens)
    xs64, layout = _inputs(B, T, H, K, V, lens, seed=T + K + int(p_times_alpha))
    args = (layout.dest, layout.num_chunks, 16)

    def run(xs, cdt, fn):
        xs = [x.to(cdt).requires_grad_() for x in xs]
        if fn is None:
            outs = _local_prepare(*xs, *args, cdt, True, p_times_alpha, None)
        else:
            # both ways of keeping q̂, k̂ for the backward, one per p_times_alpha
            outs = fused_prepare(*xs, *args, cdt, True, p_times_alpha, None,
                                 raw_qk=p_times_alpha)
        return outs, xs

    ref, x_ref = run(xs64, torch.float64, None)
    out, x_out = run(xs64, torch.float32, "fused")
    check(PREP_NAMES, [o.detach() for o in out], [r.detach() for r in ref], 1e-5)
    cots = cotangents(ref, seed=7)
    check(IN_NAMES, grads_of(out, x_out, cots), grads_of(ref, x_ref, cots), 1e-5)


@pytest.mark.parametrize("sym", ["0", "1"])
def test_local_prepare_backward_both_dp_transposes(sym, monkeypatch):
    """_prepare_bwd_k_kernel's two ways to dPᵀ (MDN_PREP_BWD_SYM): dP stored over dA's scratch
    and loaded transposed (default), or made from dAᵀ and a recomputed Γ⁻ᵀ (the earlier path):
    every input gradient against float64 autograd of the torch spec, packed documents, both
    block loops."""
    monkeypatch.setenv("MDN_PREP_BWD_SYM", sym)
    monkeypatch.setattr(fused, "BLOCK_K", 16)
    monkeypatch.setattr(fused, "BLOCK_V", 16)
    B, T, H, K, V, lens = SHAPES[1]
    T = sum(lens)
    xs64, layout = _inputs(B, T, H, K, V, lens, seed=11)
    _prepare_against_float64(xs64, layout, 16, seed=3, p_times_alpha=False)


def test_local_prepare_with_tensor_core_decay_products(monkeypatch):
    """launch key f32dot=1 on the three kernels with C×C decay products (their fp32 products as
    tf32x3; under the interpreter the plumbing, on the GPU the precision): outputs and every
    input gradient against float64 autograd of the torch spec."""
    monkeypatch.setenv("MDN_LAUNCH", "prepare_a:f32dot=1;prepare_bwd_k:f32dot=1;"
                                     "prepare_bwd_decay:f32dot=1")
    B, T, H, K, V, lens = SHAPES[0]
    xs64, layout = _inputs(B, T, H, K, V, lens, seed=12)
    _prepare_against_float64(xs64, layout, 16, seed=4)


def test_rejects_bad_prep_bwd_sym(monkeypatch):
    monkeypatch.setenv("MDN_PREP_BWD_SYM", "yes")
    with pytest.raises(ValueError, match="MDN_PREP_BWD_SYM"):
        fused.prep_bwd_sym()


@pytest.mark.parametrize("chunk", [32, 64])
def test_local_prepare_larger_chunks(chunk):
    """The blocked (I + A)⁻¹ (16×16 diagonal blocks, then block substitution) at C = 32 and the
    GPU's C = 64, packed ragged documents."""
    H, K, V = 1, 16, 16
    lens = [chunk + 7, 3, 2 * chunk - 5]
    xs64, layout = _inputs(1, sum(lens), H, K, V, lens, seed=chunk, chunk=chunk)
    _prepare_against_float64(xs64, layout, chunk, seed=4)


def test_rejects_unsupported_chunk():
    xs64, layout = _inputs(1, 24, 1, 16, 16, None, seed=1, chunk=8)
    with pytest.raises(ValueError, match="chunk_size"):
        fused.LocalPrepare.apply(*(x.float() for x in xs64), layout.dest, layout.num_chunks, 8,
                                 torch.float32, True, True, None)


def test_local_prepare_zero_momentum_and_no_norm():
    """log μ = −inf (GDN mode: the clamp's floor and its zero gradient), no l2norm."""
    B, T, H, K, V = 1, 40, 2, 16, 16
    xs64, layout = _inputs(B, T, H, K, V, None, seed=3, mu_zero=True)
    xs64[0], xs64[1] = xs64[0] * 0.3, xs64[1] * 0.3   # unnormalised keys: keep (I+A) tame
    g_out = _prepare_against_float64(xs64, layout, 16, seed=9, norm=False)
    assert (g_out[4] == 0).all()


@pytest.mark.parametrize("shape,chunk",
                         [(s, 16) for s in SHAPES] + [((1, 150, 1, 16, 32, [70, 80]), 64)],
                         ids=["ragged", "packed", "odd-KV", "packed-C64"])
def test_local_output(shape, chunk, block_cap):
    B, T, H, K, V, lens = shape
    if lens is not None:
        T = sum(lens)
    xs64, layout = _inputs(B, T, H, K, V, lens, seed=2 * T + V, chunk=chunk)
    NC = layout.num_chunks
    prep = _local_prepare(*xs64, layout.dest, NC, chunk, torch.float64, True, True, None)
    qc, kc, et, la, g0, gam = prep[:6]
    g = torch.Generator().manual_seed(5)
    W = torch.randn(NC, H, chunk, V, dtype=torch.float64, generator=g)
    S0s = torch.randn(NC, H, K, V, dtype=torch.float64, generator=g)
    M0s = torch.randn(NC, H, K, V, dtype=torch.float64, generator=g) * 0.3
    inputs = [qc, kc, et, la, g0, gam, W, S0s, M0s]
    scale = K ** -0.5

    def run(cdt, fn):
        xs = [x.detach().to(cdt).requires_grad_() for x in inputs]
        o = fn(*xs, layout.dest, scale, None, (B, T, H, V), cdt)
        return o, xs

    ref, x_ref = run(torch.float64, _local_output)
    out, x_out = run(torch.float32, fused.LocalOutput.apply)
    assert out.dtype == torch.float32
    check(["o"], [out.detach()], [ref.detach()], 2e-6)
    cots = cotangents([ref], seed=8)
    check(OUT_IN_NAMES, grads_of([out], x_out, cots), grads_of([ref], x_ref, cots), 2e-6)


def test_chunk_bounds():
    lens = [5, 40, 17, 1, 33]
    cu = torch.tensor([0] + lens).cumsum(0)
    layout = build_layout(1, sum(lens), cu, 16, torch.device("cpu"))
    start, length = fused.chunk_bounds(layout.dest, layout.num_chunks, 16)
    exp_start, exp_len = [], []
    for a, n in zip(cu[:-1].tolist(), lens):
        for s in range(0, n, 16):
            exp_start.append(a + s)
            exp_len.append(min(16, n - s))
    assert start.tolist() == exp_start and length.tolist() == exp_len


def test_rejects_float64():
    xs64, layout = _inputs(1, 16, 1, 16, 16, None, seed=1)
    with pytest.raises(ValueError, match="float32 only"):
        fused.LocalPrepare.apply(*xs64, layout.dest, layout.num_chunks, 16, torch.float64, True,
                                 True, None)


@pytest.fixture
def fused_on():
    from mdn_kernels.mdn import chunk
    chunk.use_fused_local(True)
    yield
    chunk.use_fused_local(None)


def test_switch_defaults(monkeypatch):
    """Unset: fused for 16-bit inputs (checked on the H100), torch ops for fp32 inputs."""
    from mdn_kernels.mdn import chunk
    monkeypatch.delenv("MDN_FUSED_LOCAL", raising=False)
    assert not chunk.fused_local_enabled("triton", torch.float32, 64)
    assert chunk.fused_local_enabled("triton", torch.float32, 64, low_precision=True)
    assert not chunk.fused_local_enabled("torch", torch.float32, 64, low_precision=True)
    monkeypatch.setenv("MDN_FUSED_LOCAL", "0")
    assert not chunk.fused_local_enabled("triton", torch.float32, 64, low_precision=True)
    monkeypatch.setenv("MDN_FUSED_LOCAL", "1")
    assert chunk.fused_local_enabled("triton", torch.float32, 64)
    assert not chunk.fused_local_enabled("torch", torch.float32, 64)
    assert not chunk.fused_local_enabled("triton", torch.float64, 64)
    chunk.use_fused_local(False)
    try:
        assert not chunk.fused_local_enabled("triton", torch.float32, 64)
    finally:
        chunk.use_fused_local(None)


@pytest.mark.parametrize("lens", [None, [5, 40, 17, 1, 33]], ids=["batched-ragged", "packed"])
def test_mdn_chunk_with_fused_local(lens, fused_on):
    """The whole op (fused local parts + Triton state pass) against the float64 token loop:
    outputs, final pair and every gradient, initial states included."""
    from mdn_kernels import mdn_chunk, mdn_recurrent_reference
    H, K, V = 2, 16, 32
    B, T = (2, 45) if lens is None else (1, sum(lens))
    cu = None if lens is None else torch.tensor([0] + lens).cumsum(0)
    N = B if lens is None else len(lens)

    def run(fn, dtype):
        xs = random_inputs(B, T, H, K, V, dtype=dtype, seed=21, with_state=True, num_states=N,
                           requires_grad=True)
        o, (s, m) = fn(xs)
        cots = cotangents((o, s, m), seed=22)
        return [o, s, m, *grads_of((o, s, m), xs, cots)]

    ref = run(lambda x: mdn_recurrent_reference(*x[:7], initial_state=(x[7], x[8]),
                                                output_final_state=True, cu_seqlens=cu),
              torch.float64)
    out = run(lambda x: mdn_chunk(*x[:7], initial_state=(x[7], x[8]), output_final_state=True,
                                  cu_seqlens=cu, backend="triton", chunk_size=16), torch.float32)
    check(["o", "S", "M", *IN_NAMES, "dS0", "dM0"], out, ref, 1e-5)


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """tools/check_fused_gpu.py's own logic, at a tiny shape under the interpreter (--cpu-smoke);
    without that flag and without CUDA it must refuse with a clear message."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    script = os.path.join(root, "tools", "check_fused_gpu.py")
    out = tmp_path / "r.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, script, "--cpu-smoke", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(out.read_text())
    assert res["failed"] == [] and set(res["results"][0]) >= {"errors_fused", "parts", "op_fused"}
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, script, "--out", str(out)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_rejects_bad_fp32_dot_setting(monkeypatch):
    monkeypatch.setenv("MDN_FUSED_FP32_DOT", "tf32")
    xs64, layout = _inputs(1, 16, 1, 16, 16, None, seed=1)
    with pytest.raises(ValueError, match="MDN_FUSED_FP32_DOT"):
        fused.LocalPrepare.apply(*(x.float() for x in xs64), layout.dest, layout.num_chunks, 16,
                                 torch.float32, True, True, None)


def test_16bit_operands_no_worse_than_torch_path():
    """mm_dtype (16-bit operands, fp32 accumulation) through both parts, forward and backward.
    fp16 stands in for the GPU's bf16 here: the interpreter truncates fp32 → bf16 where compiled
    Triton and torch round, so bf16 would not compare like with like (its bf16 tl.dot is fixed
    in tests, conftest.py). Against float64, the fused kernels must be about as accurate as the
    torch path rounding the same operands."""
    B, T, H, K, V = 2, 45, 2, 32, 32
    mm = torch.float16
    xs64, layout = _inputs(B, T, H, K, V, None, seed=1)
    args = (layout.dest, layout.num_chunks, 16)

    def prep(fn, cdt, mmd):
        xs = [x.to(cdt).requires_grad_() for x in xs64]
        return fn(*xs, *args, cdt, True, True, mmd), xs

    ref, x_ref = prep(_local_prepare, torch.float64, None)
    out, x_out = prep(fused_prepare, torch.float32, mm)
    tor, x_tor = prep(_local_prepare, torch.float32, mm)
    cots = cotangents(ref, seed=7)
    pairs = list(zip(PREP_NAMES + IN_NAMES,
                     [o.detach() for o in out] + list(grads_of(out, x_out, cots)),
                     [o.detach() for o in tor] + list(grads_of(tor, x_tor, cots)),
                     [o.detach() for o in ref] + list(grads_of(ref, x_ref, cots))))

    qc, kc, et, la, g0, gam = (t.detach() for t in ref[:6])
    NC = layout.num_chunks
    g = torch.Generator().manual_seed(5)
    W, S0s, M0s = (torch.randn(NC, H, *s, dtype=torch.float64, generator=g)
                   for s in ((16, V), (K, V), (K, V)))
    ins = [qc, kc, et, la, g0, gam, W, S0s, M0s]

    def outp(fn, cdt, mmd):
        xs = [x.to(cdt).requires_grad_() for x in ins]
        return fn(*xs, layout.dest, K ** -0.5, mmd, (B, T, H, V), cdt), xs

    o_ref, xo_ref = outp(_local_output, torch.float64, None)
    o_out, xo_out = outp(fused.LocalOutput.apply, torch.float32, mm)
    o_tor, xo_tor = outp(_local_output, torch.float32, mm)
    c = cotangents([o_ref], seed=8)
    pairs += list(zip(["o"] + OUT_IN_NAMES,
                      [o_out.detach()] + list(grads_of([o_out], xo_out, c)),
                      [o_tor.detach()] + list(grads_of([o_tor], xo_tor, c)),
                      [o_ref.detach()] + list(grads_of([o_ref], xo_ref, c))))
    for name, a, t, r in pairs:
        e_fused, e_torch = rel_err(a, r), rel_err(t, r)
        assert e_fused < 2e-3, f"{name}: {e_fused:.2e}"
        assert e_fused <= 1.5 * e_torch + 1e-6, f"{name}: fused {e_fused:.2e}, torch {e_torch:.2e}"


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spilling(tmp_path):
    """The real Triton pipeline (not the interpreter) compiles every fused kernel (and the state
    pass's) for an H100
    at K=128, V=256, and ptxas reports at most a few bytes of register spill per kernel
    (tools/compile_fused_sm90.py; needs no GPU)."""
    import json
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "compile_fused_sm90.py")
    out = tmp_path / "c.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script, "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(out.read_text())
    # the eight fused kernels, their MDN_RECOMPUTE_PAIRS variants and the state pass's kernels
    # (with CP's store-nothing reverse pass, the lean nodes' end-over-pair-grads pass and the
    # pairs re-made from a saved W, and the three passes with their operands as factors)
    assert res["failed"] == [] and len(res["kernels"]) == 24
    assert {"out_bwd_dw", "out_bwd_rest", "state_bwd_fused", "prepare_c_bf16op",
            "state_bwd_init_only", "state_bwd_end_late", "state_pairs",
            "state_bwd_kfac"} <= set(res["kernels"])
    for name, k in res["kernels"].items():
        # the end-over-pair-grads backward keeps its old end pair to the chunk's end: 412 B of
        # spill here (num_stages 1), yet measured faster on the H200 than a 32 B variant that
        # stores first (state_pass._state_bwd_kernel's END_LATE note)
        # the pairs re-made from W at their default 64×64 blocks on 4 warps: 1408 B here, yet
        # the fastest of 14 block choices at three of four shapes on an H200 (64×32 spills
        # nothing and ran 14–38% slower at those three, 4% faster at the fourth;
        # state_pass.pairs_launch_defaults, plans s20k, s20m)
        # (the same kernel on factors, state_pairs_kfac: 376 B, timed at its default and three
        # other blocks on an H200, plans s22n, s22p: the default fastest at two of three K = 256
        # shapes)
        # Since session 24 the tool compiles as the JIT specializes (16-byte aligned pointers:
        # vector loads) and the reverse pass without wgmma as the op runs it; then the pairs
        # spill nothing and the reverse pass on factors 500 B at K = 128 (not the default
        # there: the factors are the default at K > 128), the fused-output variant
        # (MDN_RECOMPUTE_PAIRS=2, opt-in) 316 B.
        limit = {"state_bwd_end_late": 512, "state_pairs": 1536, "state_pairs_kfac": 512,
                 "state_bwd_kfac": 640, "state_bwd_fused": 512}.get(name, 256)
        assert k["spill_stores"] <= limit, f"{name} spills {k['spill_stores']} bytes"


@pytest.mark.parametrize("op_dtype", [torch.float32, torch.bfloat16])
def test_local_prepare_factors(op_dtype):
    """kfac (the factored state passes, chunk.state_kfac): LocalPrepare stores k̂ and T in the
    operand dtype and c_g, c_m instead of Y, Z, Kg, Km, which come back as zero-stride zeros.
    k̂ is the kc output in op_dtype (fp32: bit for bit; bf16: within an ulp); the factors
    multiply out to the default run's Y, Z, Kg, Km (state_pass.operands_from_factors); the other outputs and the
    gradients through them (the operands' cotangents given to both) are the default run's."""
    from mdn_kernels.mdn.state_pass import operands_from_factors
    B, T, H, K, V = 2, 45, 2, 32, 32
    xs64, layout = _inputs(B, T, H, K, V, None, seed=3)
    args = (layout.dest, layout.num_chunks, 16, torch.float32, True, True, None, op_dtype, True)

    def run(kfac):
        xs = [x.float().requires_grad_() for x in xs64]
        return fused.LocalPrepare.apply(*xs, *args, kfac), xs

    (base, xb), (got, xg) = run(False), run(True)
    assert len(base) == 16 and len(got) == 22
    kh, tm, ele, g0r, cg, cm = got[16:]
    assert kh.dtype == tm.dtype == op_dtype and tuple(tm.shape[-2:]) == (16, 16)
    if op_dtype == torch.float32:
        assert torch.equal(kh, got[1])
    else:   # the interpreter truncates fp32 → bf16 where compiled Triton rounds: within an ulp
        torch.testing.assert_close(kh.float(), got[1].detach(), rtol=2 ** -7, atol=0)
    for t in got[7:11]:   # Y, Z, Kg, Km: zero-stride stand-ins
        assert t.stride() == (0, 0, 0, 0) and not t.any()
    made = operands_from_factors(kh.float(), tm.float(), ele, g0r, cg, cm)
    tol = 1e-5 if op_dtype == torch.float32 else 2e-2
    for name, a, b in zip(("Y", "Z", "Kg", "Km"), made, base[7:11]):
        assert rel_err(a, b.float()) < tol, name
    for name, a, b in zip(PREP_NAMES, got[:14], base[:14]):
        if name not in ("Y", "Z", "Kg", "Km"):
            assert torch.equal(a, b), name
    cots = cotangents([t.float() for t in base[:14]], seed=4)
    cots = [c.to(t.dtype) for c, t in zip(cots, base[:14])]
    for name, a, b in zip(IN_NAMES, grads_of(got[:14], xg, cots), grads_of(base[:14], xb, cots)):
        assert torch.equal(a, b), name
