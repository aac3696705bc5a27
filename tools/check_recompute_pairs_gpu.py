"""One mdn_chunk forward+backward on the GPU under the current MDN_RECOMPUTE_PAIRS, compared with
the default path (mode 0) in the same process: the GPU triage of the lean paths. Run it under
CUDA_LAUNCH_BLOCKING=1 or compute-sanitizer to find the launch that fails.

    MDN_RECOMPUTE_PAIRS=2 CUDA_LAUNCH_BLOCKING=1 python tools/check_recompute_pairs_gpu.py --B 8 --T 4096

Prints the largest relative difference of o and of every gradient against mode 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mdn_kernels import mdn_chunk  # noqa: E402
from mdn_kernels.mdn.testing import random_inputs  # noqa: E402

NAMES = ("q", "k", "v", "log_alpha", "log_mu", "beta", "eta")


def run(inputs, do, mode: str):
    os.environ["MDN_RECOMPUTE_PAIRS"] = mode
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    o, _ = mdn_chunk(*xs, use_qk_l2norm=True)
    o.backward(do)
    torch.cuda.synchronize()
    return [o.detach()] + [x.grad for x in xs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("B", 8), ("T", 4096), ("H", 6), ("K", 128), ("V", 256)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    mode = os.environ.get("MDN_RECOMPUTE_PAIRS", "0")
    dt = getattr(torch, args.dtype)
    inputs = random_inputs(args.B, args.T, args.H, args.K, args.V, dtype=dt, device="cuda", seed=1)
    do = torch.randn(args.B, args.T, args.H, args.V, device="cuda", dtype=dt)
    print(f"shape B={args.B} T={args.T} H={args.H} K={args.K} V={args.V} {dt}; mode {mode}", flush=True)
    got = run(inputs, do, mode)
    print("mode", mode, "ran", flush=True)
    ref = run(inputs, do, "0")
    for name, a, b in zip(("o",) + NAMES, got, ref):
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        print(f"{name}: rel diff vs mode 0 {err:.3e}", flush=True)


if __name__ == "__main__":
    main()
