"""One mdn_chunk forward+backward on the GPU under the current MDN_RECOMPUTE_PAIRS (default 1),
compared with the earlier path (mode 0) in the same process: the GPU triage of the lean paths.
Run it under CUDA_LAUNCH_BLOCKING=1 or compute-sanitizer to find the launch that fails.

    MDN_RECOMPUTE_PAIRS=2 CUDA_LAUNCH_BLOCKING=1 python tools/check_recompute_pairs_gpu.py --B 8 --T 4096
    MDN_RECOMPUTE_PAIRS=2 python tools/check_recompute_pairs_gpu.py --fuse-variant trans-w4-halfbv

--fuse-variant picks how mode 2's state backward makes the pair cotangents
(mdn_kernels.mdn.state_pass.FUSE_VARIANTS; sets MDN_FUSE_VARIANT). A variant that faults breaks
the process's CUDA context: try one per process. Prints the largest relative difference of o
and of every gradient against mode 0, and the time of one fwd+bwd of each (after a warm-up).
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


def timed(inputs, do, mode: str, reps: int = 3) -> float:
    """ms of one fwd+bwd (the first call above compiled the kernels)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run(inputs, do, mode)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("B", 8), ("T", 4096), ("H", 6), ("K", 128), ("V", 256)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fuse-variant", default=None,
                    help="mode 2's FUSE_VARIANTS name (default: MDN_FUSE_VARIANT, else the "
                         "state pass's DEFAULT_FUSE_VARIANT)")
    ap.add_argument("--no-time", action="store_true", help="skip the timings")
    args = ap.parse_args(argv)
    from mdn_kernels.mdn.chunk import recompute_pairs_mode
    from mdn_kernels.mdn.state_pass import fuse_variant
    if args.fuse_variant:
        os.environ["MDN_FUSE_VARIANT"] = fuse_variant(args.fuse_variant)
    mode = str(recompute_pairs_mode())
    dt = getattr(torch, args.dtype)
    inputs = random_inputs(args.B, args.T, args.H, args.K, args.V, dtype=dt, device="cuda", seed=1)
    do = torch.randn(args.B, args.T, args.H, args.V, device="cuda", dtype=dt)
    extra = f"; fuse variant {fuse_variant()}" if mode == "2" else ""
    print(f"shape B={args.B} T={args.T} H={args.H} K={args.K} V={args.V} {dt}; mode {mode}{extra}",
          flush=True)
    got = run(inputs, do, mode)
    print("mode", mode, "ran", flush=True)
    ref = run(inputs, do, "0")
    worst = 0.0
    for name, a, b in zip(("o",) + NAMES, got, ref):
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"{name}: rel diff vs mode 0 {err:.3e}", flush=True)
    if not args.no_time:
        print(f"fwd+bwd: mode {mode} {timed(inputs, do, mode):.2f} ms, mode 0 "
              f"{timed(inputs, do, '0'):.2f} ms", flush=True)
    print(f"RESULT mode {mode}{extra}: ran, worst rel diff vs mode 0 {worst:.3e}", flush=True)


if __name__ == "__main__":
    main()
