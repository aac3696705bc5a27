"""The state passes with their four C×K operands loaded as factors (kfac: k̂, T and four row
vectors per chunk instead of Kg, Km, Y, Z) against the default passes on the operands made from
the same factors, under TRITON_INTERPRET=1: the reverse pass (state_pass_bwd_triton,
_state_bwd_kernel's KFAC), the forward (state_pass_fwd_triton, _state_fwd_kernel's) and the
pairs from a saved W (_state_pairs_kernel's). float64 (the same sums in another order: to
1e-10), bf16 operands (against the float64 pass: within twice the default's bf16 error), the
factored W read back by the factored pairs pass (bit for bit), and bad factors named."""
import pytest
import torch

from mdn_kernels.mdn.state_pass import (operands_from_factors, state_pass_bwd_triton,
                                        state_pass_fwd_triton)
from mdn_kernels.mdn.testing import patch_interpreter_bf16_dot, random_state_factors

from tests.kernels.test_cp_transition import prepared

patch_interpreter_bf16_dot()

H, C = 2, 16
# K, V off the blocks' multiples (BK = the power of two at or above K; BV from MDN_LAUNCH)
SHAPES = [dict(K=48, V=40), dict(K=16, V=32)]
LAYOUTS = [(2, 45, None), (1, 64, [0, 9, 40, 41, 64])]   # batched, ragged; packed documents
OUT_NAMES = ("dWt", "dS_end", "dM_end", "dS_init", "dM_init", "dgates")


def _case(shape, lay, dtype, seed):
    """The pass's inputs (Y, Z, Kg, Km made from the factors) and the factors, in dtype."""
    B, T, cu = lay
    K, V = shape["K"], shape["V"]
    args, layout = prepared(B, T, H, K, V, C, torch.float64,
                            cu=None if cu is None else torch.tensor(cu), seed=seed)
    NC, N = layout.num_chunks, layout.num_seqs
    kfac = random_state_factors(NC, H, C, K, op_dtype=dtype, seed=seed + 1)
    # the operands from the factors as the op would hold them: the factors' values (rounded to
    # dtype) multiplied out exactly, then rounded once to dtype
    exact = [kfac[0].double(), kfac[1].double()] + [t.double() for t in kfac[2:]]
    ops = [t.to(dtype).contiguous() for t in operands_from_factors(*exact)]
    g = torch.Generator().manual_seed(seed + 2)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc)  # noqa: E731
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    rest = dict(dW=r(NC, H, C, V, sc=0.1).to(dtype), dS0s=r(NC, H, K, V, sc=0.01).to(dtype),
                dM0s=r(NC, H, K, V, sc=0.01).to(dtype), dS_fin=r(N, H, K, V).to(sdt),
                dM_fin=r(N, H, K, V).to(sdt), S0s=r(NC, H, K, V).to(dtype),
                M0s=r(NC, H, K, V, sc=0.5).to(dtype))
    rest["U"] = args[0].to(dtype)
    rest["S_init"], rest["M_init"] = r(N, H, K, V).to(sdt), r(N, H, K, V, sc=0.5).to(sdt)
    return ops, args[5:8], rest, kfac, layout


def _run(ops, gates, rest, layout, kfac=None, end_over=False):
    rest = {k: v.clone() for k, v in rest.items()}
    out = state_pass_bwd_triton(*ops, *gates, rest["dW"], rest["dS0s"], rest["dM0s"],
                                rest["dS_fin"], rest["dM_fin"], rest["S0s"], rest["M0s"], layout,
                                kfac=kfac, end_over_pair_grads=end_over,
                                dWt_out=rest["dW"] if end_over else None)
    return [t.clone() for t in out]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s['K']}V{s['V']}")
@pytest.mark.parametrize("lay", LAYOUTS, ids=["batched", "packed"])
@pytest.mark.parametrize("end_over", [False, True], ids=["separate", "end_over"])
def test_kfac_is_the_default_pass_float64(shape, lay, end_over, monkeypatch):
    """float64, several value blocks (BV = 16, the last one masked): every output of the
    factored pass equals the default pass's on Y, Z, Kg, Km made from the same factors, to
    the float64 rounding of the other product order."""
    monkeypatch.setenv("MDN_LAUNCH", "state_bwd:BV=16")
    ops, gates, rest, kfac, layout = _case(shape, lay, torch.float64, seed=3)
    want = _run(ops, gates, rest, layout, end_over=end_over)
    got = _run(ops, gates, rest, layout, kfac=kfac, end_over=end_over)
    for name, a, b in zip(OUT_NAMES, got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("lay", LAYOUTS, ids=["batched", "packed"])
def test_kfac_bf16_error_is_the_default_passs(lay, monkeypatch):
    """bf16 operands (k̂ and T rounded to bf16, the four operands made from them and rounded):
    against the float64 pass on the same rounded factors, the factored pass's error (its
    products round k̂·dS and Tᵀ·dW instead) stays within twice the default pass's, for every
    output; both are of bf16 size."""
    monkeypatch.setenv("MDN_LAUNCH", "state_bwd:BV=16")
    shape = SHAPES[0]
    ops16, gates, rest16, kfac16, layout = _case(shape, lay, torch.bfloat16, seed=5)
    exact = [t.double() for t in kfac16]
    ops64 = [t.contiguous() for t in operands_from_factors(*exact)]
    rest64 = {k: v.double() for k, v in rest16.items()}
    ref = _run(ops64, [t.double() for t in gates], rest64, layout)
    base = _run(ops16, [t.float() for t in gates], rest16, layout)
    got = _run(ops16, [t.float() for t in gates], rest16, layout, kfac=kfac16)
    for name, a, b, r in zip(OUT_NAMES, got, base, ref):
        e_got = ((a.double() - r).norm() / r.norm()).item()
        e_base = ((b.double() - r).norm() / r.norm()).item()
        assert e_base < 5e-2, (name, e_base)
        assert e_got <= 2 * e_base + 1e-6, (name, e_got, e_base)


def test_kfac_names_a_bad_factor():
    ops, gates, rest, kfac, layout = _case(SHAPES[1], LAYOUTS[0], torch.float64, seed=1)
    with pytest.raises(ValueError, match="kfac: tm"):
        _run(ops, gates, rest, layout, kfac=[kfac[0], kfac[1][..., :-1]] + kfac[2:])
    with pytest.raises(ValueError, match="kfac: cg"):
        _run(ops, gates, rest, layout, kfac=kfac[:4] + [kfac[4].float()] + kfac[5:])
    with pytest.raises(ValueError, match="kfac must be"):
        _run(ops, gates, rest, layout, kfac=kfac[:5])


FWD_NAMES = ("W", "S0s", "M0s", "S_fin", "M_fin")


def _run_fwd(ops, gates, rest, layout, kfac=None, W=None):
    """The forward pass (W None) or the pairs alone from W, with the case's initial pair."""
    U = None if W is not None else rest["U"]
    if kfac is not None:
        ops = [None] * 4   # the factored passes read none of the operands
    out = state_pass_fwd_triton(U, *ops, *gates, rest["S_init"], rest["M_init"], layout, W=W,
                                kfac=kfac)
    return [t.clone() for t in out]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s['K']}V{s['V']}")
@pytest.mark.parametrize("lay", LAYOUTS, ids=["batched", "packed"])
def test_kfac_forward_is_the_default_pass_float64(shape, lay, monkeypatch):
    """float64, several value and key blocks (the last ones masked): the factored forward's W,
    per-chunk pairs and final pair equal the default forward's on the operands made from the
    same factors; the pairs from that W (_state_pairs_kernel) too, factored or not."""
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd:BV=16;state_fwd_kfac:BV=16")
    ops, gates, rest, kfac, layout = _case(shape, lay, torch.float64, seed=4)
    want = _run_fwd(ops, gates, rest, layout)
    got = _run_fwd(ops, gates, rest, layout, kfac=kfac)
    for name, a, b in zip(FWD_NAMES, got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    monkeypatch.setenv("MDN_LAUNCH", "state_pairs:BK=16,BV=16")
    pairs = _run_fwd(ops, gates, rest, layout, kfac=kfac, W=got[0])
    for name, a, b in list(zip(FWD_NAMES, pairs, want))[1:]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"pairs {name}")


@pytest.mark.parametrize("lay", LAYOUTS, ids=["batched", "packed"])
def test_kfac_forward_bf16(lay, monkeypatch):
    """bf16 operands: against the float64 forward on the same rounded factors, the factored
    forward's error (its products round k̂·S, the scaled sums and c ⊙ W where the default's
    use the rounded Y, Z, Kg, Km) stays within twice the default forward's, for every output;
    and the pairs read back from its W with the factors are its own pairs, bit for bit (the
    lean backward's recompute)."""
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd:BV=16;state_fwd_kfac:BV=16")
    assert SHAPES[0]["K"] <= 64
    ops16, gates, rest16, kfac16, layout = _case(SHAPES[0], lay, torch.bfloat16, seed=6)
    ops64 = [t.contiguous() for t in operands_from_factors(*[t.double() for t in kfac16])]
    rest64 = {k: v.double() for k, v in rest16.items()}
    ref = _run_fwd(ops64, [t.double() for t in gates], rest64, layout)
    base = _run_fwd(ops16, [t.float() for t in gates], rest16, layout)
    got = _run_fwd(ops16, [t.float() for t in gates], rest16, layout, kfac=kfac16)
    for name, a, b, r in zip(FWD_NAMES, got, base, ref):
        assert a.dtype == b.dtype, name
        e_got = ((a.double() - r).norm() / r.norm()).item()
        e_base = ((b.double() - r).norm() / r.norm()).item()
        assert e_base < 5e-2, (name, e_base)
        assert e_got <= 2 * e_base + 1e-6, (name, e_got, e_base)
    # the forward's blocks (BK = 64 ≥ K, the same BV): the same products on the same tiles
    # (with split blocks the interpreter's numpy products round sub-blocks differently)
    monkeypatch.setenv("MDN_LAUNCH", "state_pairs:BK=64,BV=16")
    pairs = _run_fwd(ops16, [t.float() for t in gates], rest16, layout, kfac=kfac16, W=got[0])
    for name, a, b in list(zip(FWD_NAMES, pairs, got))[1:]:
        assert torch.equal(a, b), f"pairs {name}"


def test_kfac_forward_names_a_bad_factor():
    ops, gates, rest, kfac, layout = _case(SHAPES[1], LAYOUTS[0], torch.float64, seed=2)
    with pytest.raises(ValueError, match="kfac: kh"):
        bad = [kfac[0][..., :-1]] + kfac[1:]
        state_pass_fwd_triton(rest["U"], *ops, *gates, None, None, layout, kfac=bad)
    with pytest.raises(ValueError, match="kfac: cm"):
        W = _run_fwd(ops, gates, rest, layout)[0]
        _run_fwd(ops, gates, rest, layout, kfac=kfac[:5] + [kfac[5][:, :1]], W=W)


def test_kfac_forward_refuses_8_warps_at_k256(monkeypatch):
    """8 warps at K = 256 gave NaN on an H200 (plan s22n): refused by name before the launch;
    4 warps at the same K run (interpreted here; compared on the GPU)."""
    shape = dict(K=200, V=16)   # BK = 256
    ops, gates, rest, kfac, layout = _case(shape, LAYOUTS[0], torch.float64, seed=7)
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd_kfac:num_warps=8")
    with pytest.raises(ValueError, match="state_fwd_kfac: num_warps 8 at K = 200"):
        _run_fwd(ops, gates, rest, layout, kfac=kfac)
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd_kfac:num_warps=4")
    want = _run_fwd(ops, gates, rest, layout)
    got = _run_fwd(ops, gates, rest, layout, kfac=kfac)
    torch.testing.assert_close(got[3], want[3], rtol=1e-10, atol=1e-12)
