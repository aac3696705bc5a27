"""The op with its state passes on factored operands (MDN_STATE_KFAC=1: StateOutput hands k̂, T,
e^{le}, γ⁻, c_g, c_m from LocalPrepare to the kfac of state_pass_fwd_triton, forward and
recompute, and of state_pass_bwd_triton, and saves no Kg, Km, Y, Z) against the default (Kg,
Km, Y, Z as stored), fp32 under TRITON_INTERPRET=1: outputs and every gradient, initial states
included, to fp32 rounding of the other product order; in one backward segment and in segments
that cut a sequence. Every pass must actually run factored (spied), with no operand given."""
import pytest
import torch

from mdn_kernels.mdn import state_pass
from mdn_kernels.mdn.testing import random_inputs

# the fused chunk-local kernels (and so StateOutput) in fp32, and the op's run with cotangents
from tests.kernels.test_recompute_pairs import NAMES, _run as run_op
from tests.kernels.test_recompute_pairs import fused_on  # noqa: F401  (a fixture)

CASES = {  # B, T, document lengths (None: batched), mdn_chunk options
    "batched-ragged": (2, 45, None, dict()),
    "packed": (1, 61, [5, 21, 1, 34], dict()),
    "no-pta-no-norm": (1, 40, None, dict(p_times_alpha=False, use_qk_l2norm=False)),
    "one-sequence": (1, 100, None, dict()),
}


def _run(xs, cu, monkeypatch, kfac: str, **kw):
    monkeypatch.setenv("MDN_STATE_KFAC", kfac)
    return run_op(xs, cu, 1, monkeypatch, **kw)   # mode 1: the lean path, StateOutput


@pytest.mark.parametrize("segments", ["1", "3"])
@pytest.mark.parametrize("case", list(CASES))
def test_factored_state_backward_is_the_default(case, segments, fused_on, monkeypatch):
    B, T, lens, opts = CASES[case]
    H, K, V = 2, 24, 32
    cu = None if lens is None else torch.tensor([0] + lens).cumsum(0)
    N = B if lens is None else len(lens)
    xs = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=41, with_state=True,
                       num_states=N)
    monkeypatch.setenv("MDN_BWD_SEGMENTS", segments)
    seen = {"fwd": [], "bwd": []}

    def spy(which, real, operands):
        def run(*a, **kw):   # (factored, no operand given) per call
            seen[which].append((kw.get("kfac") is not None,
                                all(t is None for t in operands(a))))
            return real(*a, **kw)
        return run
    monkeypatch.setattr(state_pass, "state_pass_fwd_triton", spy(
        "fwd", state_pass.state_pass_fwd_triton, lambda a: a[1:5]))
    monkeypatch.setattr(state_pass, "state_pass_bwd_triton", spy(
        "bwd", state_pass.state_pass_bwd_triton, lambda a: a[:4]))
    base = _run(xs, cu, monkeypatch, "0", **opts)
    # the forward, the backward's recompute of the pairs, the reverse pass: per segment
    for calls in seen.values():
        assert calls and all(c == (False, False) for c in calls), seen
    seen = {"fwd": [], "bwd": []}
    got = _run(xs, cu, monkeypatch, "1", **opts)
    assert len(seen["fwd"]) >= 2 and seen["bwd"], seen
    for calls in seen.values():
        assert all(c == (True, True) for c in calls), seen
    for n, a, b in zip(NAMES, got, base):
        assert a.dtype == b.dtype and a.shape == b.shape, n
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-5, f"{n}: {err:.2e}"


def test_a_bad_flag_is_named(fused_on, monkeypatch):
    xs = random_inputs(1, 20, 2, 16, 16, dtype=torch.float32, seed=1, with_state=True)
    with pytest.raises(ValueError, match="MDN_STATE_KFAC"):
        _run(xs, None, monkeypatch, "yes")
