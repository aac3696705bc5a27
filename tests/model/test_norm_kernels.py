"""The block RMSNorm's Triton kernels (mdn_scale/model/norm_kernels.py) under TRITON_INTERPRET=1
(tests/conftest.py sets it without CUDA, before any kernel module is imported) against the eager
norm.rms_norm, forward and backward (dx, dweight through torch.autograd): fp32 (compared with
float64 to fp32 rounding, as the eager fp32 path is), bf16 (one bf16 ulp: the interpreter
truncates fp32 → bf16), odd widths, Megatron's 3-D [S, B, d], non-contiguous inputs,
determinism; model.norm_kernel validation and wiring (default eager). On the GPU:
tests/gpu/test_norm_kernels_gpu.py."""
import os

import pytest
import torch

from mdn_scale.model import ModelConfig
from mdn_scale.model.norm import RMSNorm, rms_norm
from mdn_scale.model.norm_kernels import BWD_PROGRAMS, _launch, rms_norm_triton, use_triton_norm

EPS = 1e-6


def _case(shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    w = torch.rand(d, generator=g, dtype=torch.float64) * 1.5 + 0.25
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x, w, dy


def _run(fn, x, w, dy, dtype, wdtype=torch.float32, prep=None):
    """y, dx, dw of fn(x, w) with x in `dtype` (prep: a view of it, e.g. transposed)."""
    xl = x.detach().to(dtype).requires_grad_(True)
    wl = w.detach().to(wdtype).requires_grad_(True)
    xin = prep(xl) if prep is not None else xl
    y = fn(xin, wl, EPS)
    ct = prep(dy) if prep is not None else dy
    (y.double() * ct).sum().backward()
    return y.detach(), xl.grad, wl.grad


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("shape", [(300, 40), (129, 100), (70, 1024), (7, 5, 96)])
def test_fp32_against_eager(shape):
    """Odd widths (40, 100: masked columns), rows not a multiple of the block, a 3-D input."""
    x, w, dy = _case(shape)
    ref = _run(rms_norm, x, w, dy, torch.float64, torch.float64)
    eag = _run(rms_norm, x, w, dy, torch.float32)
    tri = _run(rms_norm_triton, x, w, dy, torch.float32)
    for name, r, e, t in zip(("y", "dx", "dw"), ref, eag, tri):
        assert t.shape == e.shape and t.dtype == e.dtype == torch.float32, name
        err, err_eager = _rel(t, r), _rel(e, r)
        assert err < 1e-6, (name, err, err_eager)
    assert tri[0].is_contiguous()


def test_bf16_against_eager():
    """bf16 x (fp32 weight, as Megatron's params_dtype): y and dx are accurate fp32 values
    rounded to bf16, each within half a bf16 ulp of float64 on the eager path; Triton's CPU
    interpreter truncates fp32 → bf16 instead (see test_gate_kernels.py): a whole ulp there.
    dweight stays fp32 (the weight's dtype) on both paths."""
    shape = (3, 50, 256)
    x, w, dy = _case(shape, seed=1)
    x = x.to(torch.bfloat16).double()  # the values the bf16 paths see
    dy = dy.to(torch.bfloat16).double()
    ref = _run(rms_norm, x, w, dy, torch.float64, torch.float64)
    eag = _run(rms_norm, x, w, dy, torch.bfloat16)
    tri = _run(rms_norm_triton, x, w, dy, torch.bfloat16)
    ulp = 2.0 ** -7 if os.environ.get("TRITON_INTERPRET") == "1" else 2.0 ** -8
    for i, name in enumerate(("y", "dx")):
        r = ref[i]
        assert tri[i].dtype == eag[i].dtype == torch.bfloat16, name
        for got, u in ((tri[i], ulp), (eag[i], 2.0 ** -8)):
            err = (got.double() - r).abs()
            assert (err <= u * r.abs() + 1e-6 * r.abs().max()).all(), name
    assert tri[2].dtype == eag[2].dtype == torch.float32
    err, err_eager = _rel(tri[2], ref[2]), _rel(eag[2], ref[2])
    assert err < 1e-5, (err, err_eager)


def test_bf16_weight():
    """A bf16 weight (Megatron with bf16 params): its gradient comes back in bf16, as eager's."""
    x, w, dy = _case((64, 72), seed=4)
    w = w.to(torch.bfloat16).double()
    ref = _run(rms_norm, x, w, dy, torch.float64, torch.float64)
    eag = _run(rms_norm, x, w, dy, torch.float32, torch.bfloat16)
    tri = _run(rms_norm_triton, x, w, dy, torch.float32, torch.bfloat16)
    assert tri[2].dtype == eag[2].dtype == torch.bfloat16
    assert _rel(tri[0], ref[0]) < 1e-6 and _rel(tri[1], ref[1]) < 1e-6
    assert _rel(tri[2], ref[2]) < 2.0 ** -7


@pytest.mark.parametrize("layout", ["transposed", "row_strided"])
def test_non_contiguous(layout):
    """transposed: Megatron's [S, B, d] seen as [B, S, d] (leading dims do not flatten to one
    stride: copied contiguous); row_strided: every other column block of a wider tensor (read in
    place through the row stride). Gradients land in the right places of the base tensor."""
    if layout == "transposed":
        x, w, dy = _case((33, 3, 48), seed=2)
        prep = lambda t: t.transpose(0, 1)  # noqa: E731
        w = w[:48]
    else:
        x, w, dy = _case((40, 2 * 48), seed=2)
        prep = lambda t: t[:, 48:]  # noqa: E731
        w = w[48:]
    ref = _run(rms_norm, x, w, dy, torch.float64, torch.float64, prep)
    tri = _run(rms_norm_triton, x, w, dy, torch.float32, prep=prep)
    assert not prep(x).is_contiguous()
    for name, r, t in zip(("y", "dx", "dw"), ref, tri):
        assert t.shape == r.shape, name
        assert _rel(t, r) < 1e-6, name
    if layout == "row_strided":
        assert (tri[1][:, :48] == 0).all()


def test_deterministic_many_programs():
    """More row blocks than BWD_PROGRAMS (each backward program loops over several): the same
    bits every run, and still equal to float64 to fp32 rounding."""
    d = 16
    _, rows, _ = _launch(d)
    N = rows * BWD_PROGRAMS + 3 * rows + 1
    x, w, dy = _case((N, d), seed=3)
    a = _run(rms_norm_triton, x, w, dy, torch.float32)
    b = _run(rms_norm_triton, x, w, dy, torch.float32)
    ref = _run(rms_norm, x, w, dy, torch.float64, torch.float64)
    for name, s, t, r in zip(("y", "dx", "dw"), a, b, ref):
        assert torch.equal(s, t), name
        assert _rel(s, r) < 1e-5, name


def test_input_checks():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="one of"):
        rms_norm_triton(x.double(), torch.ones(8), EPS)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        rms_norm_triton(x, torch.ones(9), EPS)
    with pytest.raises(ValueError, match="last dim"):
        rms_norm_triton(torch.zeros(2, 8193), torch.ones(8193), EPS)
    y = rms_norm_triton(torch.zeros(0, 8), torch.ones(8), EPS)  # empty: the eager path
    assert y.shape == (0, 8)


def test_config_and_dispatch():
    """model.norm_kernel: default triton (session 11), validated by name; RMSNorm takes the
    kernels only on CUDA 16/32-bit inputs with 'triton' (CPU and float64 stay eager)."""
    assert ModelConfig().norm_kernel == "triton"
    assert ModelConfig(norm_kernel="eager").norm_kernel == "eager"
    with pytest.raises(ValueError, match="model.norm_kernel"):
        ModelConfig(norm_kernel="fused")
    cpu = torch.zeros(2, 8)
    w = torch.ones(8)
    for choice in ("eager", "triton"):
        assert not use_triton_norm(choice, cpu, w)
    if torch.cuda.is_available():
        xc, wc = cpu.cuda(), w.cuda()
        assert use_triton_norm("triton", xc, wc) and use_triton_norm("triton", xc.bfloat16(), wc)
        assert not use_triton_norm("eager", xc, wc)
        assert not use_triton_norm("triton", xc.double(), wc)
        assert not use_triton_norm("triton", torch.zeros(2, 8200, device="cuda"), torch.ones(8200, device="cuda"))


def _tcfg(sp=False):
    import types
    return types.SimpleNamespace(params_dtype=torch.float32, use_cpu_initialization=True,
                                 sequence_parallel=sp)


def test_rmsnorm_module():
    """RMSNorm: the kernel choice from its spec param (default eager), checked by name; the
    weight's sequence_parallel attribute either way; on CPU 'triton' computes the eager result."""
    n = RMSNorm(_tcfg(sp=True), 16, eps=1e-5, kernel="triton")
    assert n.kernel == "triton" and n.weight.sequence_parallel is True
    assert RMSNorm(_tcfg(), 16).kernel == "eager"
    assert RMSNorm(_tcfg(), 16).weight.sequence_parallel is False
    with pytest.raises(ValueError, match="model.norm_kernel"):
        RMSNorm(_tcfg(), 16, kernel="fused")
    x = torch.randn(3, 2, 16)
    assert torch.equal(n(x), rms_norm(x, n.weight, 1e-5))


def test_specs_pass_the_choice():
    """specs.norm_spec carries model.norm_kernel to every block norm (both per layer, the final)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from mdn_scale.model import specs
    for choice in ("eager", "triton"):
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=2, head_k_dim=16, norm_kernel=choice)
        layer = specs.layer_spec(cfg, "mdn").submodules
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm, specs.norm_spec(cfg)):
            assert isinstance(norm, ModuleSpec) and norm.module is RMSNorm
            assert norm.params == {"kernel": choice}


@pytest.mark.parametrize("kernel", ["eager", "triton"])
def test_fp32_input_under_autocast_hands_on_the_autocast_dtype(kernel):
    """Layer 0's input norm sees the fp32 embedding under bf16 autocast: the block norm hands on
    bf16 (norm.block_norm_out_dtype), so Megatron's sequence-parallel column linear gets an input
    of its gradient's dtype. The linear after it gives the same bits as it did on the norm's fp32
    output (autocast casts that to bf16 itself), forward and backward; outside autocast, and for
    a bf16 input, the output keeps x's dtype."""
    from mdn_scale.model.norm import block_norm_out_dtype
    norm = RMSNorm(_tcfg(), 64, eps=EPS, kernel=kernel)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    lin = torch.nn.Linear(64, 48, bias=False)
    x0 = torch.randn(40, 64) * 3
    dy = torch.randn(40, 48)

    def run(cast_fp32):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = norm(x)
            hin = h.float() if cast_fp32 else h   # the old hand-on: fp32, cast again by the linear
            y = lin(hin)
        (y.float() * dy).sum().backward()
        grads = (x.grad.clone(), norm.weight.grad.clone(), lin.weight.grad.clone())
        norm.weight.grad = lin.weight.grad = None
        return h, y, grads

    h, y, g = run(False)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    _, y_old, g_old = run(True)
    assert torch.equal(y, y_old)
    for a, b in zip(g, g_old):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert norm(x0).dtype == torch.float32                       # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x0.bfloat16()).dtype == torch.bfloat16
        assert block_norm_out_dtype(x0.double()) == torch.float64


def test_triton_out_dtype():
    """rms_norm_triton(out_dtype=bf16) on an fp32 x: y within a bf16 ulp of the fp32 kernel's y
    (the interpreter truncates where the GPU rounds to nearest), dx in fp32 and the same bits as
    the fp32-output kernel's dx for the same (bf16-valued) cotangent; a bad out_dtype is refused."""
    x, w, dy = _case((96, 72), seed=7)
    dy = dy.to(torch.bfloat16).double()
    y32, dx32, dw32 = _run(rms_norm_triton, x, w, dy, torch.float32)
    y16, dx16, dw16 = _run(lambda a, b, e: rms_norm_triton(a, b, e, torch.bfloat16), x, w, dy,
                           torch.float32)
    assert y16.dtype == torch.bfloat16 and dx16.dtype == torch.float32
    assert ((y16.double() - y32.double()).abs() <= 2.0 ** -7 * y32.double().abs()).all()
    assert torch.equal(dx16, dx32) and torch.equal(dw16, dw32)
    with pytest.raises(ValueError, match="output"):
        rms_norm_triton(x.float(), w.float(), EPS, torch.float64)
