"""Benchmark: the mixer's short causal conv + SiLU, eager (mixer.causal_conv, the reference) against
FLA's Triton `causal_conv1d` (fused SiLU, packed documents), side by side in one process; and the
gated output norm, eager (mixer.gated_rmsnorm) against FLA's fused `rms_norm_gated` (sigmoid gate),
as model.mixer_kernels=fla runs them (mdn_scale/model/mixer_kernels.py).

    python tools/bench_conv.py --out benchmarks/results/conv_h100.json [--norm-only | --no-norm]

For each shape: the fused path's output and gradients (x, weight; norm: o, g, w) against the
float64 eager reference (max relative error), then forward and forward+backward times (median of
triton.testing.do_bench) and peak memory of a forward+backward above the inputs, for both paths in
bf16 (conv: packed documents, cu_seqlens; norm: bf16 o and g, fp32 weight, as under autocast).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mdn_scale.model.mixer import causal_conv, gated_rmsnorm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import peak_mib  # noqa: E402  (one peak-memory helper for the bench tools)

# [B, T, C] of the 400M and 1.3B mixers' q|k|v block (C = H·(2K + V)) at 16K tokens per step.
SHAPES = [dict(B=4, T=4096, C=3072, W=4), dict(B=2, T=4096, C=6144, W=4)]
# the gated norm's [tokens, H, V] of the same two models
NORM_SHAPES = [dict(T=16384, H=6, V=256), dict(T=8192, H=6, V=512)]
EPS = 1e-6


def doc_bounds(total: int, gen: torch.Generator) -> torch.Tensor:
    cuts = torch.randint(1, total, (max(1, total // 1500),), generator=gen).unique().tolist()
    return torch.tensor([0] + sorted(cuts) + [total], dtype=torch.int32)


def eager(x, w, cu):
    return F.silu(causal_conv(x, w, cu_seqlens=cu))


def fused(x, w, cu):
    from fla.modules.causal_conv1d import causal_conv1d
    y, _ = causal_conv1d(x, w, activation="silu", cu_seqlens=cu)
    return y


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_shape(s, dtype):
    from triton.testing import do_bench
    B, T, C, W = s["B"], s["T"], s["C"], s["W"]
    gen = torch.Generator().manual_seed(0)
    cu = doc_bounds(B * T, gen)
    x64 = torch.randn(1, B * T, C, dtype=torch.float64, generator=gen)
    w64 = torch.empty(C, W, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen)
    dy64 = torch.randn(1, B * T, C, dtype=torch.float64, generator=gen)
    out = {"shape": s, "dtype": str(dtype), "num_docs": cu.numel() - 1}

    # exactness: float64 eager on the GPU against the fused path in `dtype`
    dev = "cuda"
    cu_d = cu.to(dev)
    xr, wr = x64.to(dev).requires_grad_(), w64.to(dev).requires_grad_()
    yr = eager(xr, wr, cu_d)
    yr.backward(dy64.to(dev))
    xf = x64.to(dev, dtype).requires_grad_()
    wf = w64.to(dev, dtype).requires_grad_()
    yf = fused(xf, wf, cu_d)
    yf.backward(dy64.to(dev, dtype))
    out["fused_vs_fp64"] = {"y": rel(yf, yr), "dx": rel(xf.grad, xr.grad), "dw": rel(wf.grad, wr.grad)}
    xe = x64.to(dev, dtype).requires_grad_()
    we = w64.to(dev, dtype).requires_grad_()
    ye = eager(xe, we, cu_d)
    ye.backward(dy64.to(dev, dtype))
    out["eager_vs_fp64"] = {"y": rel(ye, yr), "dx": rel(xe.grad, xr.grad), "dw": rel(we.grad, wr.grad)}
    del xr, wr, yr, xf, wf, yf, xe, we, ye

    x = x64.to(dev, dtype).requires_grad_()
    w = w64.to(dev, dtype).requires_grad_()
    dy = dy64.to(dev, dtype)
    for name, fn in (("eager", eager), ("fla_triton", fused)):
        def fwd():
            with torch.no_grad():
                fn(x, w, cu_d)

        def fwd_bwd():
            fn(x, w, cu_d).backward(dy)
            x.grad = w.grad = None
        fwd_bwd()
        out[name] = {"fwd_ms": do_bench(fwd), "fwd_bwd_ms": do_bench(fwd_bwd), "peak_mib": peak_mib(fwd_bwd)}
        print(name, s, out[name], flush=True)
    out["speedup_fwd_bwd"] = out["eager"]["fwd_bwd_ms"] / out["fla_triton"]["fwd_bwd_ms"]
    return out


def norm_eager(o, g, w):
    return gated_rmsnorm(o, g, w, EPS)


def norm_fused(o, g, w):
    from mdn_scale.model.mixer_kernels import gated_rmsnorm_fla
    return gated_rmsnorm_fla(o, g, w, EPS)


def run_norm_shape(s, dtype):
    from triton.testing import do_bench
    T, H, V = s["T"], s["H"], s["V"]
    gen = torch.Generator().manual_seed(0)
    o64 = torch.randn(1, T, H, V, dtype=torch.float64, generator=gen)
    # g as the mixer sees it: a strided slice of the in-projection output
    proj64 = torch.randn(1, T, H * V + 4 * H, dtype=torch.float64, generator=gen)
    w64 = 1 + 0.1 * torch.randn(V, dtype=torch.float64, generator=gen)
    dy64 = torch.randn(1, T, H, V, dtype=torch.float64, generator=gen)
    dev = "cuda"
    out = {"shape": s, "dtype": str(dtype)}

    def inputs(dt, wdt):
        o = o64.to(dev, dt).requires_grad_()
        proj = proj64.to(dev, dt).requires_grad_()
        w = w64.to(dev, wdt).requires_grad_()
        return o, proj, w

    def call(fn, o, proj, w):
        return fn(o, proj[..., :H * V].reshape(1, T, H, V), w)

    ref = inputs(torch.float64, torch.float64)
    call(norm_eager, *ref).backward(dy64.to(dev))
    for name, fn in (("fused", norm_fused), ("eager", norm_eager)):
        xs = inputs(dtype, torch.float32)
        call(fn, *xs).backward(dy64.to(dev, dtype))
        y = call(fn, *xs).detach()
        yr = call(norm_eager, *[t.detach() for t in ref])
        out[f"{name}_vs_fp64"] = {"y": rel(y, yr), "do": rel(xs[0].grad, ref[0].grad),
                                  "dg": rel(xs[1].grad, ref[1].grad), "dw": rel(xs[2].grad, ref[2].grad)}
    o, proj, w = inputs(dtype, torch.float32)
    dy = dy64.to(dev, dtype)
    for name, fn in (("eager", norm_eager), ("fla_triton", norm_fused)):
        def fwd():
            with torch.no_grad():
                call(fn, o, proj, w)

        def fwd_bwd():
            call(fn, o, proj, w).backward(dy)
            o.grad = proj.grad = w.grad = None
        fwd_bwd()
        out[name] = {"fwd_ms": do_bench(fwd), "fwd_bwd_ms": do_bench(fwd_bwd), "peak_mib": peak_mib(fwd_bwd)}
        print("gated_norm", name, s, out[name], flush=True)
    out["speedup_fwd_bwd"] = out["eager"]["fwd_bwd_ms"] / out["fla_triton"]["fwd_bwd_ms"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="all", help="comma list of SHAPES indices or 'all'")
    ap.add_argument("--norm-only", action="store_true", help="only the gated norm")
    ap.add_argument("--no-norm", action="store_true", help="only the conv")
    args = ap.parse_args(argv)
    import fla
    import triton
    idx = range(len(SHAPES)) if args.shapes == "all" else [int(i) for i in args.shapes.split(",")]
    res = {"benchmark": "causal conv + SiLU (tools/bench_conv.py)",
           "card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "fla": getattr(fla, "__version__", "?"),
           "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "results": [], "gated_norm": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for i in ([] if args.norm_only else idx):
        res["results"].append(run_shape(SHAPES[i], torch.bfloat16))
        save()
    for i in ([] if args.no_norm else idx):
        res["gated_norm"].append(run_norm_shape(NORM_SHAPES[i], torch.bfloat16))
        save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
