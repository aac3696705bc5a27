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
