"""The recurrent (decoding) kernel against the token loop: whole sequences and step by step."""
import pytest
import torch

from mdn_kernels import fused_recurrent_mdn, mdn_recurrent_reference
from mdn_kernels.mdn.testing import random_inputs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("p_times_alpha", [True, False])
def test_whole_sequence_matches_reference(p_times_alpha):
    xs = random_inputs(2, 13, 2, 16, 32, dtype=torch.float32, seed=1, with_state=True)
    o, (S, M) = fused_recurrent_mdn(*xs[:7], initial_state=(xs[7], xs[8]),
                                    p_times_alpha=p_times_alpha, backend="triton")
    ref, (rS, rM) = mdn_recurrent_reference(*(t.double() for t in xs[:7]),
                                            initial_state=(xs[7].double(), xs[8].double()),
                                            output_final_state=True, p_times_alpha=p_times_alpha)
    assert rel(o, ref) < 1e-5 and rel(S, rS) < 1e-5 and rel(M, rM) < 1e-5


def test_packed_documents():
    lens = [3, 7, 1]
    cu = torch.tensor([0] + lens).cumsum(0)
    xs = random_inputs(1, sum(lens), 2, 8, 16, dtype=torch.float32, seed=2, with_state=True,
                       num_states=3)
    o, (S, M) = fused_recurrent_mdn(*xs[:7], initial_state=(xs[7], xs[8]), cu_seqlens=cu,
                                    backend="triton")
    ref, (rS, rM) = mdn_recurrent_reference(*(t.double() for t in xs[:7]),
                                            initial_state=(xs[7].double(), xs[8].double()),
                                            output_final_state=True, cu_seqlens=cu)
    assert rel(o, ref) < 1e-5 and rel(S, rS) < 1e-5 and rel(M, rM) < 1e-5


def test_step_by_step_decoding_equals_one_pass():
    """Generation: T = 1 steps chained through the state pair equal one pass over the prompt."""
    xs = random_inputs(1, 9, 2, 16, 16, dtype=torch.float32, seed=3)
    o_all, (S_all, M_all) = fused_recurrent_mdn(*xs, backend="triton")
    state = None
    outs = []
    for t in range(9):
        o_t, state = fused_recurrent_mdn(*(x[:, t:t + 1] for x in xs), initial_state=state,
                                         backend="triton")
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state[0], S_all, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state[1], M_all, rtol=1e-6, atol=1e-6)
