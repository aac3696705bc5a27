"""mdn_chunk with the fused chunk-local kernels (chunk.use_fused_local(True)) on a GPU at real
shapes: outputs, final pair and every gradient against the float64 chunkwise torch path, with
memory poisoned with NaN first (as test_kernels_gpu.py). tools/check_fused_gpu.py adds timings."""
import pytest
import torch

from mdn_kernels import mdn_chunk
from mdn_kernels.mdn import chunk as chunk_mod
from mdn_kernels.mdn.testing import random_inputs

from .conftest import NAMES, SHAPES, grads, poison_allocator, rel, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture
def fused_local():
    chunk_mod.use_fused_local(True)
    yield
    chunk_mod.use_fused_local(None)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_local_real_shape(shape, dtype, fused_local, record):
    B, T, H, K, V = SHAPES[shape]
    xs = random_inputs(B, T, H, K, V, dtype=dtype, device="cuda", seed=1, requires_grad=True)
    poison_allocator()
    out = grads(lambda x: mdn_chunk(*x, output_final_state=True, backend="triton"), xs)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    ref = grads(lambda x: mdn_chunk(*x, output_final_state=True, backend="torch"), x64)
    errs = {n: rel(a, b) for n, a, b in zip(NAMES, out, ref)}
    record(f"fused_local_{shape}_{dtype}", errs)
    print(shape, dtype, {k: f"{v:.1e}" for k, v in errs.items()})
    for n, a in zip(NAMES, out):
        assert torch.isfinite(a).all(), n
    # bf16: errors of bf16 rounding size (as test_kernels_gpu.py); fp32 inputs keep fp32
    # products throughout (fused parts "ieee", state pass fp32), so fp32 rounding only.
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for n, e in errs.items():
        assert e < tol, f"{n}: {e:.2e}"
