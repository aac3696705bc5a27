"""_state_pairs_kernel (state_pass_fwd_triton with W given: the pairs re-made from a saved W,
K split across programs as V is) against the pass that made W and against the float64 spec
(chunk_torch.state_pass_fwd_torch), under TRITON_INTERPRET=1. The launch blocks are set smaller
than K and V (MDN_LAUNCH) so that several key and value blocks, and masked last blocks, run."""
import pytest
import torch

from mdn_kernels.mdn.chunk_torch import state_pass_fwd_torch
from mdn_kernels.mdn.state_pass import launch_defaults, state_pass_fwd_triton

from tests.kernels.test_cp_transition import prepared

# K, V off the blocks' multiples: the last key and value blocks are masked
SHAPES = [dict(K=48, V=40, blocks="BK=32,BV=16"), dict(K=16, V=32, blocks="BK=16,BV=16"),
          dict(K=40, V=24, blocks="BK=16,BV=32")]
LAYOUTS = [(2, 45, None), (1, 64, [0, 9, 40, 41, 64])]   # batched, ragged; packed documents


def _case(shape, lay, dtype, seed):
    B, T, cu = lay
    args, layout = prepared(B, T, 2, shape["K"], shape["V"], 16, dtype,
                            cu=None if cu is None else torch.tensor(cu), seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    S0, M0 = torch.randn(2, layout.num_seqs, 2, shape["K"], shape["V"], generator=g,
                         dtype=torch.float64).to(dtype)
    return args, layout, S0, M0


@pytest.mark.parametrize("lay", LAYOUTS, ids=["batched", "packed"])
def test_pairs_from_w_are_the_forward_pass_pairs(lay, monkeypatch):
    """fp32, the blocks of the pass that made W (BK = K, the same BV): the pairs from the saved
    W are bit for bit that pass's (the same products of the same operands), the final pair
    too, and W comes back as the same tensor. (With split blocks the interpreter's numpy
    products round sub-blocks differently; the float64 test below covers the split.)"""
    shape = SHAPES[1]
    args, layout, S0, M0 = _case(shape, lay, torch.float32, seed=3)
    W, *want = state_pass_fwd_triton(*args, S0, M0, layout)
    bv = launch_defaults(shape["K"], shape["V"])["BV"]
    monkeypatch.setenv("MDN_LAUNCH", f"state_pairs:BK={shape['K']},BV={bv}")
    W2, *got = state_pass_fwd_triton(None, None, None, *args[3:], S0, M0, layout, W=W)
    assert W2 is W
    for name, a, b in zip(("S0s", "M0s", "S_fin", "M_fin"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), \
            f"{name}: max diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s['K']}V{s['V']}")
@pytest.mark.parametrize("lay", LAYOUTS, ids=["batched", "packed"])
@pytest.mark.parametrize("with_init", [True, False])
def test_pairs_from_w_match_the_float64_spec(shape, lay, with_init, monkeypatch):
    """float64, several key and value blocks (masked last ones): the pairs from the spec's W
    equal the spec's pairs (a zero initial pair when none is given)."""
    args, layout, S0, M0 = _case(shape, lay, torch.float64, seed=5)
    # the state-pass kernels load the initial pair as fp32 (their state is fp32, or fp64 from
    # the first float64 update on): initial values that fp32 holds exactly
    S0, M0 = S0.float().double(), M0.float().double()
    if not with_init:
        S0, M0 = torch.zeros_like(S0), torch.zeros_like(M0)
    W, *want = state_pass_fwd_torch(*args, S0, M0, layout)
    monkeypatch.setenv("MDN_LAUNCH", "state_pairs:" + shape["blocks"])
    init = (S0, M0) if with_init else (None, None)
    _, *got = state_pass_fwd_triton(None, None, None, *args[3:], *init, layout,
                                    W=W.contiguous())
    for name, a, b in zip(("S0s", "M0s", "S_fin", "M_fin"), got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_pairs_from_w_names_a_bad_w():
    args, layout, S0, M0 = _case(SHAPES[1], LAYOUTS[0], torch.float32, seed=1)
    W, *_ = state_pass_fwd_triton(*args, S0, M0, layout)
    with pytest.raises(ValueError, match="W given"):
        state_pass_fwd_triton(None, None, None, *args[3:], S0, M0, layout, W=W.double())
    with pytest.raises(ValueError, match="W given"):
        state_pass_fwd_triton(None, None, None, *args[3:], S0, M0, layout,
                              W=W.transpose(-1, -2).contiguous().transpose(-1, -2))
