"""Benchmark: the state pass's pairs re-made from a saved W (_state_pairs_kernel, what the op's
backward runs first) at several launch blocks, against the pass that makes W (_state_fwd_kernel)
on the same operands, in one process.

    python tools/bench_state_pairs.py --out $OUT/state_pairs.json
    python tools/bench_state_pairs.py --configs "BK=64,BV=64;BK=256,BV=32,num_stages=1" ...
    python tools/bench_state_pairs.py --cpu-smoke --out /tmp/s.json   # tiny, TRITON_INTERPRET=1
    python tools/bench_state_pairs.py --kernel state_fwd --configs "BV=16;BV=32,num_warps=8" ...
    python tools/bench_state_pairs.py --kernel state_bwd --configs "BV=32;BV=16,num_stages=2" ...
    python tools/bench_state_pairs.py --kernel state_bwd_kfac --configs ";BV=32,num_warps=8" ...
    python tools/bench_state_pairs.py --kernel state_fwd_kfac --configs ";BV=16" ...

--kernel state_fwd / state_bwd sweep the other two state-pass kernels the same way (MDN_LAUNCH's
keys for that kernel; "" = the defaults): the W-making pass, and the reverse pass as the lean
backward launches it (dWt over dW, the end cotangents over the pair cotangents; each timed call
starts from fresh copies, whose copying is timed alone and subtracted). Their differences are
to the defaults' results. --kernel state_bwd_kfac times the reverse pass with its operands
loaded as factors (state_pass_bwd_triton's kfac: k̂, T and four row vectors per chunk) at each
config beside the default pass at its default config, on operands made from the same factors;
its differences are to the default pass's results (bf16 rounding: the products round at other
points). --kernel state_fwd_kfac and state_pairs_kfac do the same for the W-making pass and for
the pairs from a saved W (that W the default pass's, read with the factors).

Per shape (the op benchmark's two and the 1.3B model's: one 16K sequence, two of 4K) and
launch config (MDN_LAUNCH's state_pairs keys): the median of do_bench, and the largest
difference of S0s, M0s, S_fin, M_fin from the W-making pass's, relative to their largest
magnitude (0.0: bitwise). Operands are bf16 as in a 16-bit model: U, Y, Z, Kg, Km random (the
keys scaled like l2-normed ones), end decays in (0.9, 1), W the W-making pass's from them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = [dict(B=8, T=4096, H=6, K=128, V=256), dict(B=8, T=4096, H=6, K=256, V=512),
          dict(B=1, T=16384, H=6, K=256, V=512), dict(B=2, T=4096, H=6, K=256, V=512),
          dict(B=4, T=4096, H=6, K=256, V=512)]   # the 1.3B step's forward at 4 × 4K
SMOKE_SHAPES = [dict(B=2, T=40, H=2, K=32, V=48)]
# "" = the defaults (state_pass.pairs_launch_defaults and launch.TUNED); "fwd" = the W-making
# kernel's own blocks (BK = K, its BV, warps and stages): the structure of the pass before K split
CONFIGS = ["", "fwd", "BK=32,BV=32", "BK=32,BV=64", "BK=64,BV=64", "BK=64,BV=64,num_warps=8",
           "BK=128,BV=32,num_warps=8", "BK=64,BV=32,num_stages=2", "BK=16,BV=64"]


def operands(B, T, H, K, V, C, device, seed=0):
    import torch
    from mdn_kernels.mdn.layout import build_layout
    g = torch.Generator(device="cpu").manual_seed(seed)
    layout = build_layout(B, T, None, C, torch.device(device))
    NC = layout.num_chunks

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)
    bf = torch.bfloat16
    U = r(NC, H, C, V, scale=0.1).to(bf)
    Y, Z, Kg, Km = (r(NC, H, C, K, scale=K ** -0.5).to(bf) for _ in range(4))
    a_end = (0.9 + 0.1 * torch.rand(NC, H, generator=g)).to(device)
    g_end = (0.1 * torch.rand(NC, H, generator=g)).to(device)
    u_end = (0.5 + 0.5 * torch.rand(NC, H, generator=g)).to(device)
    return (U, Y, Z, Kg, Km, a_end, g_end, u_end), layout


def factor_operands(B, T, H, K, V, C, device, seed=0):
    """operands() with Y, Z, Kg, Km made from random factors (mdn_kernels.mdn.testing.
    random_state_factors, state_pass.operands_from_factors); returns (operands, the factors
    (k̂, T in bf16, the rest fp32), layout)."""
    import torch
    from mdn_kernels.mdn.state_pass import operands_from_factors
    from mdn_kernels.mdn.testing import random_state_factors
    ops, layout = operands(B, T, H, K, V, C, device, seed)
    bf = torch.bfloat16
    kfac = [t.to(device) for t in random_state_factors(layout.num_chunks, H, C, K, op_dtype=bf,
                                                       seed=seed + 3)]
    made = [t.to(bf).contiguous() for t in operands_from_factors(*kfac)]
    return (ops[0], *made, *ops[5:]), kfac, layout


def fwd_config(K: int, V: int) -> str:
    import triton
    from mdn_kernels.mdn import launch, state_pass
    lp = launch.params("state_fwd", shape=(K, V), **state_pass.launch_defaults(K, V))
    return ",".join(f"{k}={v}" for k, v in dict(BK=triton.next_power_of_2(K), **lp).items())


def _rel_diff(got, want) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def _time(fn, smoke: bool):
    import triton
    return None if smoke else triton.testing.do_bench(fn, warmup=5, rep=50)


def _sweep(kernel, sh, configs, run, want, smoke, *, diff_key, spec_of=None, copy_ms=0.0,
           extra=None, label=None):
    """Each config as MDN_LAUNCH's values for `kernel`: run()'s tensors against `want` and
    run()'s time (less copy_ms, the timed copies that only set run() up). A config that fails
    (a block that does not fit) is recorded with its error; the others go on."""
    rows = []
    for cfg in configs:
        spec = spec_of(cfg) if spec_of else cfg
        os.environ["MDN_LAUNCH"] = f"{kernel}:{spec}" if spec else ""
        row = dict(shape=sh, kernel=label or kernel, config=cfg or "default", launch=spec)
        text = f"B={sh['B']} T={sh['T']} K={sh['K']} V={sh['V']} {label or kernel} {cfg or 'default':28s}"
        try:
            got = [t.clone() for t in run()]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(f"{text} {row['error'][:200]}", flush=True)
            continue
        ms = _time(run, smoke)
        row.update(ms=None if ms is None else ms - copy_ms, **(extra or {}))
        row[diff_key] = _rel_diff(got, want)
        rows.append(row)
        t = "" if ms is None else f"{row['ms']:.3f} ms"
        more = json.dumps(extra) if extra else ""
        print(f"{text} {t} diff {row[diff_key]:.2e} {more}", flush=True)
    os.environ.pop("MDN_LAUNCH", None)
    return rows


def sweep_pairs(sh, ops, layout, configs, smoke, kfac=None):
    """The pairs from the W-making pass's W at each config, against that pass's pairs (with
    kfac: read with the factors, not Kg, Km)."""
    import torch
    from mdn_kernels.mdn.state_pass import state_pass_fwd_triton
    N, K, V = layout.num_seqs, sh["K"], sh["V"]
    S0 = torch.zeros(N, sh["H"], K, V, device=ops[0].device)
    os.environ.pop("MDN_LAUNCH", None)
    W, *want = state_pass_fwd_triton(*ops, S0, S0.clone(), layout)
    t_fwd = _time(lambda: state_pass_fwd_triton(*ops, S0, S0, layout), smoke)
    kg_km = ops[3:5] if kfac is None else (None, None)
    return _sweep("state_pairs", sh, configs,
                  lambda: state_pass_fwd_triton(None, None, None, *kg_km, *ops[5:], S0, S0,
                                                layout, W=W, kfac=kfac)[1:],
                  want, smoke, diff_key="rel_diff_to_w_making_pass",
                  spec_of=lambda cfg: fwd_config(K, V) if cfg == "fwd" else cfg,
                  extra=dict(w_making_pass_ms=t_fwd),
                  label="state_pairs_kfac" if kfac is not None else None)


def sweep_other(kernel, sh, ops, layout, configs, smoke, kfac=None):
    """state_fwd or state_bwd at each launch config: time and difference to the defaults'.
    kfac: the pass with its operands as these factors at each config, against the default pass
    at its defaults."""
    import torch
    from mdn_kernels.mdn.state_pass import state_pass_bwd_triton, state_pass_fwd_triton
    N, K, V, H = layout.num_seqs, sh["K"], sh["V"], sh["H"]
    dev = ops[0].device
    S0 = torch.zeros(N, H, K, V, device=dev)
    os.environ.pop("MDN_LAUNCH", None)
    _, S0s, M0s, _, _ = state_pass_fwd_triton(*ops, S0, S0, layout)
    g = torch.Generator(device="cpu").manual_seed(1)
    dW = (torch.randn(ops[0].shape, generator=g) * 0.1).to(dev, ops[1].dtype)
    dP = [(torch.randn(S0s.shape, generator=g) * 0.01).to(dev, S0s.dtype) for _ in range(2)]
    if kernel == "state_fwd":
        def run(factors=kfac):
            given = ops[1:5] if factors is None else (None,) * 4
            return state_pass_fwd_triton(ops[0], *given, *ops[5:], S0, S0, layout,
                                         kfac=factors)
        copy_ms = 0.0
    else:
        fresh = [dW.clone(), dP[0].clone(), dP[1].clone()]

        def copies():
            for f, src in zip(fresh, (dW, *dP)):
                f.copy_(src)

        def run(factors=kfac):
            copies()
            return state_pass_bwd_triton(*ops[1:], fresh[0], fresh[1], fresh[2], None, None,
                                         S0s, M0s, layout, dWt_out=fresh[0],
                                         end_over_pair_grads=True, kfac=factors)[:3]
        copy_ms = _time(copies, smoke) or 0.0
    want = [t.clone() for t in (run(None) if kfac is not None else run())]
    # the factored forward has its own launch key (launch.KERNELS); the reverse pass shares one
    key = "state_fwd_kfac" if kfac is not None and kernel == "state_fwd" else kernel
    return _sweep(key, sh, configs, run, want, smoke, diff_key="rel_diff_to_default",
                  copy_ms=copy_ms, extra=dict(copies_ms_subtracted=copy_ms),
                  label=f"{kernel}_kfac" if kfac is not None else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="all", help="indices into SHAPES, e.g. 0,1")
    ap.add_argument("--configs", default=None, help="';'-joined MDN_LAUNCH values for --kernel")
    ap.add_argument("--kernel", default="state_pairs",
                    choices=["state_pairs", "state_fwd", "state_bwd", "state_pairs_kfac",
                             "state_fwd_kfac", "state_bwd_kfac"])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes under TRITON_INTERPRET=1 (checks the tool, times nothing)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    if args.cpu_smoke:   # the interpreter's bf16 products, made right (mdn_kernels.mdn.testing)
        from mdn_kernels.mdn.testing import patch_interpreter_bf16_dot
        patch_interpreter_bf16_dot()
    device = "cpu" if args.cpu_smoke else "cuda"
    shapes = SMOKE_SHAPES if args.cpu_smoke else (
        SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")])
    if args.configs is None and not args.kernel.startswith("state_pairs"):
        ap.error(f"--kernel {args.kernel} needs --configs")
    configs = CONFIGS if args.configs is None else args.configs.split(";")
    rows = []
    for sh in shapes:
        C = 64 if not args.cpu_smoke else 16
        if args.kernel.endswith("_kfac"):
            ops, kfac, layout = factor_operands(**sh, C=C, device=device)
            # the default pass at its defaults, then the factored one at each config
            kernel = args.kernel[:-len("_kfac")]
            sweep = sweep_pairs if kernel == "state_pairs" else (
                lambda *a, **kw: sweep_other(kernel, *a, **kw))
            rows += sweep(sh, ops, layout, [""], args.cpu_smoke)
            rows += sweep(sh, ops, layout, configs, args.cpu_smoke, kfac=kfac)
            continue
        ops, layout = operands(**sh, C=C, device=device)
        if args.kernel == "state_pairs":
            rows += sweep_pairs(sh, ops, layout, configs, args.cpu_smoke)
        else:
            rows += sweep_other(args.kernel, sh, ops, layout, configs, args.cpu_smoke)
    out = dict(
        meta=dict(card="cpu (--cpu-smoke: numbers mean nothing)" if args.cpu_smoke
                  else torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  command="python " + " ".join(sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        kernel=args.kernel, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
