"""GPU check of the fused chunk-local kernels (kernels/mdn/chunk_local_fused.py).

    python tools/check_fused_gpu.py --out benchmarks/results/fused_local_h100.json

For each shape (B=8, T=4096, H=6, K=128, V=256 and K=256, V=512; bf16 inputs by default):

1. exactness: mdn_chunk with backend "triton", once with the fused local parts and once with the
   torch ones (torch.compile'd), each against the float64 chunkwise torch path (which the CPU
   suite checks against the token loop to 1e-12): outputs, final pair and all seven input
   gradients, relative Frobenius errors; memory is poisoned with NaN before each run;
2. the parts alone: LocalPrepare and LocalOutput against the compiled torch _local_prepare and
   _local_output, forward and forward+backward (triton.testing.do_bench, median);
3. the whole op: forward and forward+backward of both paths.

Results are written as JSON after every shape; the exit status is 1 when an error exceeds
--tol (default 1e-2, the bf16 bound of tests/gpu) or is not finite. Environment knobs are
recorded in the JSON: MDN_FUSED_FP32_DOT=tf32x3 runs the fused kernels' fp32 products on tensor
cores (default "ieee"). tools/compile_fused_sm90.py reports the kernels' registers and spills.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mdn_kernels import mdn_chunk  # noqa: E402
from mdn_kernels.mdn import chunk as chunk_mod  # noqa: E402
from mdn_kernels.mdn.layout import build_layout  # noqa: E402
from mdn_kernels.mdn.testing import random_inputs  # noqa: E402

SHAPES = [dict(B=8, T=4096, H=6, K=128, V=256), dict(B=8, T=4096, H=6, K=256, V=512)]
SMOKE_SHAPES = [dict(B=1, T=70, H=1, K=16, V=16)]   # --cpu-smoke: the script's own check
DEVICE = "cuda"
NAMES = ["o", "S", "M", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]


def poison():
    """Fill most free GPU memory with NaN and hand it back to the caching allocator, so a kernel
    that reads memory it never wrote shows up as a non-finite result."""
    if DEVICE != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    n = max(0, int(free * 0.8) // 4)
    if n:
        buf = torch.empty(n, dtype=torch.float32, device="cuda")
        buf.fill_(float("nan"))
        del buf
    torch.cuda.synchronize()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def outputs_and_grads(fn, xs, seed=0):
    o, (S, M) = fn(xs)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cots = [torch.randn(t.shape, device=DEVICE, dtype=torch.float32, generator=g).to(t.dtype)
            for t in (o, S, M)]
    loss = sum((t * c).sum() for t, c in zip((o, S, M), cots))
    return [t.detach() for t in (o, S, M, *torch.autograd.grad(loss, xs))]


def run_op(xs, fused: bool):
    chunk_mod.use_fused_local(fused)
    try:
        return outputs_and_grads(
            lambda x: mdn_chunk(*x, output_final_state=True, backend="triton"), xs)
    finally:
        chunk_mod.use_fused_local(None)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    if DEVICE != "cuda":   # --cpu-smoke: one timed call, the numbers mean nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def fwd_bwd_fn(fn, inputs):
    """A closure running fn(*inputs) and backward through every floating output."""
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
    return step


def time_parts(xs, sh, dtype):
    """LocalPrepare / LocalOutput against the compiled torch parts, same inputs."""
    from mdn_kernels.mdn.chunk import _local_output, _local_prepare, _maybe_compiled
    from mdn_kernels.mdn.chunk_local_fused import LocalOutput, LocalPrepare
    B, T, H, K, V = sh["B"], sh["T"], sh["H"], sh["K"], sh["V"]
    C = 64
    layout = build_layout(B, T, None, C, xs[0].device)
    mm = torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else None
    pargs = (layout.dest, layout.num_chunks, C, torch.float32, True, True, mm)
    res = {}
    paths = {"fused": (LocalPrepare.apply, LocalOutput.apply),
             "torch": (_maybe_compiled(_local_prepare, xs[0].device),
                       _maybe_compiled(_local_output, xs[0].device))}
    for name, (prep, outp) in paths.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            prep(*xs[:7], *pargs)
        sync()
        first = time.perf_counter() - t0
        prep_fwd = timed(lambda: prep(*(x.detach() for x in xs[:7]), *pargs))
        prep_fb = timed(fwd_bwd_fn(lambda *a: prep(*a, *pargs), list(xs[:7])))
        with torch.no_grad():
            p = prep(*xs[:7], *pargs)
        qc, kc, et, la, g0, gam = (t.detach() for t in p[:6])
        NC = layout.num_chunks
        g = torch.Generator(device=DEVICE).manual_seed(3)
        W = torch.randn(NC, H, C, V, device=DEVICE, generator=g)
        S0s = torch.randn(NC, H, K, V, device=DEVICE, generator=g)
        M0s = torch.randn(NC, H, K, V, device=DEVICE, generator=g)
        oin = [t.requires_grad_() for t in (qc, kc, et, la, g0, gam, W, S0s, M0s)]
        oargs = (layout.dest, K ** -0.5, mm, (B, T, H, V), dtype)
        out_fwd = timed(lambda: outp(*(t.detach() for t in oin), *oargs))
        out_fb = timed(fwd_bwd_fn(lambda *a: outp(*a, *oargs), oin))
        res[name] = dict(first_call_s=first, prepare_fwd_ms=prep_fwd, prepare_fwd_bwd_ms=prep_fb,
                         output_fwd_ms=out_fwd, output_fwd_bwd_ms=out_fb)
        print(f"  parts {name:5s} first {first:6.1f}s  prepare fwd {prep_fwd:7.3f} fwd+bwd "
              f"{prep_fb:7.3f} ms | output fwd {out_fwd:7.3f} fwd+bwd {out_fb:7.3f} ms", flush=True)
        del oin, p, W, S0s, M0s
    return res


def time_op(xs, fused: bool):
    do = None

    def fwd():
        chunk_mod.use_fused_local(fused)
        try:
            return mdn_chunk(*xs, backend="triton")[0]
        finally:
            chunk_mod.use_fused_local(None)

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        nonlocal do
        o = fwd()
        if do is None:
            do = torch.randn_like(o)
        torch.autograd.backward(o, do)
        for x in xs:
            x.grad = None

    fwd_bwd()
    sync()
    return dict(fwd_ms=timed(fwd_only), fwd_bwd_ms=timed(fwd_bwd))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shapes", default="all", help="'all' or comma list of indices into SHAPES")
    ap.add_argument("--tol", type=float, default=1e-2, help="largest relative error accepted")
    ap.add_argument("--skip-exactness", action="store_true", help="timings only")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the script itself at a tiny shape on CPU (Triton interpreter, fp32): "
                         "checks the script, not the kernels' GPU behaviour")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment")
        DEVICE = "cpu"
        dtype = torch.float32
        shapes = SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("check_fused_gpu.py needs a CUDA GPU (no CUDA device here); run it on the "
                     "GPU machine (or use --cpu-smoke with TRITON_INTERPRET=1 to test the script)")
        dtype = getattr(torch, args.dtype)
        shapes = (SHAPES if args.shapes == "all"
                  else [SHAPES[int(i)] for i in args.shapes.split(",")])
    import triton
    meta = dict(
        card=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)",
        torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), dtype=str(dtype).removeprefix("torch."),
        command=" ".join(sys.argv),
        env={k: v for k, v in os.environ.items() if k.startswith("MDN_")},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        reference="float64 chunkwise torch path (backend='torch')",
    )
    results = []
    failed = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results, failed=failed), f, indent=2)

    for sh in shapes:
        print(f"shape {sh} {args.dtype}", flush=True)
        entry = dict(shape=sh)
        results.append(entry)
        xs = random_inputs(sh["B"], sh["T"], sh["H"], sh["K"], sh["V"], dtype=dtype,
                           device=DEVICE, seed=1, requires_grad=True)
        if not args.skip_exactness:
            x64 = [x.detach().double().requires_grad_() for x in xs]
            ref = outputs_and_grads(
                lambda x: mdn_chunk(*x, output_final_state=True, backend="torch"), x64)
            del x64
            for path, fused in (("fused", True), ("torch", False)):
                poison()
                out = run_op(xs, fused)
                errs = {n: rel(a, b) for n, a, b in zip(NAMES, out, ref)}
                entry[f"errors_{path}"] = errs
                print(f"  {path:5s} " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()),
                      flush=True)
                for n, e in errs.items():
                    if not (math.isfinite(e) and e < args.tol):
                        failed.append(f"{sh} {path} {n}: {e:.3e}")
                del out
            del ref
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            save()
        entry["parts"] = time_parts(xs, sh, dtype)
        save()
        for path, fused in (("fused", True), ("torch", False)):
            entry[f"op_{path}"] = time_op(xs, fused)
            print(f"  op {path:5s} fwd {entry[f'op_{path}']['fwd_ms']:7.3f} ms  fwd+bwd "
                  f"{entry[f'op_{path}']['fwd_bwd_ms']:7.3f} ms", flush=True)
        save()
        del xs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
        sys.exit(1)
    print("all errors below", args.tol)


if __name__ == "__main__":
    main()
