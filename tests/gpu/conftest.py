import json
import os

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU: run tests/gpu on the lent device")


def poison_allocator(fraction: float = 0.5) -> None:
    """Fill free cached GPU memory with NaN, so a kernel output that is never written shows up."""
    free, _ = torch.cuda.mem_get_info()
    x = torch.empty(int(free * fraction) // 4, dtype=torch.float32, device="cuda")
    x.fill_(float("nan"))
    del x


_RESULTS: dict = {}


@pytest.fixture(scope="session")
def record():
    """record(name, dict): kept in $MDN_RESULTS_DIR/gpu_tests.json when that is set."""
    def _record(name, values):
        _RESULTS[name] = values
    yield _record
    out = os.environ.get("MDN_RESULTS_DIR")
    if out and _RESULTS:
        os.makedirs(out, exist_ok=True)
        meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__)
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            pass
        with open(os.path.join(out, "gpu_tests.json"), "w") as f:
            json.dump(dict(meta=meta, results=_RESULTS), f, indent=2)


# Shared by the op's GPU tests: the real shapes, result names, error and gradients.
SHAPES = {"K128_V256": (8, 4096, 6, 128, 256), "K256_V512": (8, 4096, 6, 256, 512)}
NAMES = ["o", "S", "M", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def grads(fn, xs, cot_seed=0):
    o, (S, M) = fn(xs)
    g = torch.Generator(device="cuda").manual_seed(cot_seed)
    cots = [torch.randn(t.shape, device="cuda", dtype=torch.float32, generator=g).to(t.dtype)
            for t in (o, S, M)]
    loss = sum((t * c).sum() for t, c in zip((o, S, M), cots))
    return [o, S, M, *torch.autograd.grad(loss, xs)]
