"""Benchmark: mdn_chunk against FLA's chunk_gated_delta_rule (GDN), side by side in one process.

    python tools/bench_kernels.py --out benchmarks/results/kernels_h100.json
    python tools/bench_kernels.py --shapes 0 --variant MDN_RECOMPUTE_PAIRS=0 \
        --variant MDN_RECOMPUTE_PAIRS=2+MDN_FUSE_VARIANT=trans-w4-halfbv --out ...
                                                # default and variants side by side

The default path is the environment's (MDN_RECOMPUTE_PAIRS unset: mode 1, the lean path; the
JSON's meta records the mode in effect); MDN_RECOMPUTE_PAIRS=0 records the earlier default.

Forward and forward+backward times (median of triton.testing.do_bench), peak memory of a
forward+backward above the inputs, and the first call's time (compilation). Each --variant
(environment assignments joined by '+', set in this process for that run only) is timed beside
the default in the same process, with its outputs and gradients compared to the default's
(relative difference; 0.0 means bitwise equal). FLA 0.6.0 refuses
its gated backward on Hopper with Triton < 3.7.1 (FLA issue #640, a miscompile); the lent GPU has
Triton 3.6.0, so --lift-fla-guard (default on) disables that check FOR TIMING ONLY: FLA's
gradients in this run are not trusted and not used.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/fla_peer.py

from mdn_kernels import mdn_chunk  # noqa: E402
from mdn_kernels.mdn.chunk import recompute_pairs_mode  # noqa: E402
from mdn_kernels.mdn.testing import random_inputs  # noqa: E402

SHAPES = [dict(B=8, T=4096, H=6, K=128, V=256), dict(B=8, T=4096, H=6, K=256, V=512),
          # the same tokens as one sequence: the long-context case (segments cut it)
          dict(B=1, T=32768, H=6, K=128, V=256)]


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_one(name, fwd, inputs, do):
    from triton.testing import do_bench

    def fwd_only():
        with torch.no_grad():
            fwd(*inputs)

    def fwd_bwd():
        o = fwd(*inputs)
        torch.autograd.backward(o, do)
        for x in inputs:
            x.grad = None

    t0 = time.perf_counter()
    fwd_bwd()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    res = dict(
        first_call_s=first,
        fwd_ms=do_bench(fwd_only, warmup=50, rep=300, return_mode="median"),
        fwd_bwd_ms=do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median"),
        peak_mem_fwd_bwd_mib=peak_mib(fwd_bwd),
    )
    print(f"  {name:10s} first {res['first_call_s']:6.1f}s  fwd {res['fwd_ms']:7.3f} ms  "
          f"fwd+bwd {res['fwd_bwd_ms']:7.3f} ms  peak {res['peak_mem_fwd_bwd_mib']:8.0f} MiB",
          flush=True)
    return res


GRAD_NAMES = ["o", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]


def outputs_and_grads(fwd, inputs, do):
    o = fwd(*inputs)
    grads = torch.autograd.grad(o, inputs, do)
    return [o.detach()] + list(grads)


def profile_table(fwd, inputs, do, path, shape, name="MDN"):
    """Append a torch.profiler table (kernels by CUDA time) of 3 forward+backward calls to path."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            o = fwd(*inputs)
            torch.autograd.backward(o, do)
        torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"== {name} {shape}, 3 forward+backward calls\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-fla", action="store_true", help="skip the FLA GDN peer")
    ap.add_argument("--shapes", default="all",
                    help="'all' (the first two) or comma list of indices into SHAPES")
    ap.add_argument("--profile", default=None,
                    help="append torch.profiler tables of MDN's (and FLA GDN's) fwd+bwd to this file")
    ap.add_argument("--variant", action="append", default=[],
                    help="MDN_X=v[+MDN_Y=w]: also time mdn_chunk under these settings (repeatable)")
    args = ap.parse_args()
    variants = [dict(kv.split("=", 1) for kv in v.split("+")) for v in args.variant]
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (run it on the lent device machine)")
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    chunk_gdn = None
    if not args.no_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk_gdn
        from fla_peer import lift_fla_guard
        lift_fla_guard()  # timing only: see the module docstring
    # 'all': the two shapes (index 2, one long sequence, on request)
    shapes = SHAPES[:2] if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    import triton
    results = []
    meta = dict(
        card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        fla=__import__("fla").__version__ if chunk_gdn is not None else None,
        python=platform.python_version(), dtype=args.dtype, command=" ".join(sys.argv),
        env={k: v for k, v in os.environ.items() if k.startswith("MDN_")},
        recompute_pairs_mode=recompute_pairs_mode(),  # the default path's (unset env: 1)
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        note="FLA's Hopper guard (Triton < 3.7.1, FLA #640) lifted for timing only",
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every shape: a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)

    for sh in shapes:
        print(f"shape {sh} {args.dtype}", flush=True)
        xs = random_inputs(sh["B"], sh["T"], sh["H"], sh["K"], sh["V"], dtype=dtype, device=dev,
                           seed=0, requires_grad=True)
        q, k, v, la, lm, beta, eta = xs
        do = torch.randn_like(v)
        row = dict(shape=sh)

        def mdn(q, k, v, la, lm, beta, eta):
            return mdn_chunk(q, k, v, la, lm, beta, eta)[0]

        row["mdn"] = bench_one("MDN", mdn, xs, do)
        results.append(row)  # saved after every measurement: a variant that crashes the CUDA
        save()               # context (as MDN_RECOMPUTE_PAIRS=2 did on the H100) loses nothing else
        if args.profile:
            profile_table(mdn, xs, do, args.profile, sh)
        if chunk_gdn is not None:  # the peer before the variants, for the same reason
            gin = [q, k, v, la, beta]

            def gdn(q, k, v, g, b):
                return chunk_gdn(q, k, v, g=g, beta=b, use_qk_l2norm_in_kernel=True)[0]

            row["fla_gdn"] = bench_one("FLA GDN", gdn, gin, do)
            if args.profile:
                profile_table(gdn, gin, do, args.profile, sh, name="FLA GDN")
            row["ratio_fwd"] = row["mdn"]["fwd_ms"] / row["fla_gdn"]["fwd_ms"]
            row["ratio_fwd_bwd"] = row["mdn"]["fwd_bwd_ms"] / row["fla_gdn"]["fwd_bwd_ms"]
            row["ratio_peak_mem"] = row["mdn"]["peak_mem_fwd_bwd_mib"] / row["fla_gdn"]["peak_mem_fwd_bwd_mib"]
            print(f"  MDN/GDN: fwd {row['ratio_fwd']:.2f}x  fwd+bwd {row['ratio_fwd_bwd']:.2f}x  "
                  f"peak mem {row['ratio_peak_mem']:.2f}x", flush=True)
            save()
        ref = outputs_and_grads(mdn, xs, do) if variants else None
        for var in variants:
            name = "+".join(f"{k}={v}" for k, v in var.items())
            old = {k: os.environ.get(k) for k in var}
            os.environ.update(var)
            try:
                m = bench_one(name, mdn, xs, do)
                got = outputs_and_grads(mdn, xs, do)
                m["rel_diff_vs_default"] = {
                    n: ((a.double() - b.double()).norm() / b.double().norm()).item()
                    for n, a, b in zip(GRAD_NAMES, got, ref)}
                del got
                print(f"    vs default: " + " ".join(
                    f"{n} {e:.1e}" for n, e in m["rel_diff_vs_default"].items()), flush=True)
                if "fla_gdn" in row:
                    g = row["fla_gdn"]
                    m["ratios_vs_gdn"] = r = dict(
                        fwd=m["fwd_ms"] / g["fwd_ms"], fwd_bwd=m["fwd_bwd_ms"] / g["fwd_bwd_ms"],
                        peak_mem=m["peak_mem_fwd_bwd_mib"] / g["peak_mem_fwd_bwd_mib"])
                    print(f"  {name}/GDN: fwd {r['fwd']:.2f}x  fwd+bwd {r['fwd_bwd']:.2f}x  "
                          f"peak mem {r['peak_mem']:.2f}x", flush=True)
                row[f"mdn[{name}]"] = m
                save()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        del ref
        save()
        del xs, q, k, v, la, lm, beta, eta, do
        torch.cuda.empty_cache()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
