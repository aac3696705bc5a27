"""Bad inputs to mdn_chunk raise ValueError naming the argument, before any work."""
import pytest
import torch

from mdn_kernels import mdn_chunk
from mdn_kernels.mdn.testing import random_inputs


def inputs():
    return random_inputs(2, 20, 2, 8, 16, dtype=torch.float32, seed=0)


def call(xs, **kw):
    return mdn_chunk(*xs, **kw)


@pytest.mark.parametrize("index,bad,match", [
    (0, torch.zeros(2, 20, 2, 4), r"q must have shape \[B, T, H, K\]"),
    (2, torch.zeros(2, 20, 3, 16), r"v must have shape \[B, T, H, V\]"),
    (3, torch.zeros(2, 20), r"log_alpha must have shape \[B, T, H\]"),
    (4, torch.zeros(2, 19, 2), r"log_mu must have shape"),
    (5, torch.zeros(2, 20, 2, dtype=torch.int64), r"beta must be a floating tensor"),
    (6, "eta", r"eta must be a torch.Tensor"),
    (1, torch.zeros(2, 20, 2), r"k must be a 4-D tensor"),
])
def test_bad_tensor(index, bad, match):
    xs = inputs()
    xs[index] = bad
    with pytest.raises(ValueError, match=match):
        call(xs)


def test_bad_initial_state():
    xs = inputs()
    with pytest.raises(ValueError, match=r"initial_state\[0\] \(S0\) must have shape \[N, H, K, V\]"):
        call(xs, initial_state=(torch.zeros(1, 2, 8, 16), torch.zeros(2, 2, 8, 16)))
    with pytest.raises(ValueError, match="initial_state must be a pair"):
        call(xs, initial_state=torch.zeros(2, 2, 8, 16))


def test_bad_cu_seqlens():
    xs = [t[:1] for t in inputs()]
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=20"):
        call(xs, cu_seqlens=torch.tensor([0, 5, 19]))
    with pytest.raises(ValueError, match="strictly increasing"):
        call(xs, cu_seqlens=torch.tensor([0, 5, 5, 20]))
    with pytest.raises(ValueError, match="int32 or int64"):
        call(xs, cu_seqlens=torch.tensor([0.0, 20.0]))
    with pytest.raises(ValueError, match="need B == 1"):
        call(inputs(), cu_seqlens=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match=r"initial_state\[1\] \(M0\) must have shape"):
        call(xs, cu_seqlens=torch.tensor([0, 5, 20]),
             initial_state=(torch.zeros(2, 2, 8, 16), torch.zeros(1, 2, 8, 16)))


def test_bad_backend_and_chunk():
    with pytest.raises(ValueError, match="backend must be one of"):
        call(inputs(), backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        call(inputs(), backend="triton", chunk_size=24)
