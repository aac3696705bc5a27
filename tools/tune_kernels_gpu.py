"""Launch-parameter sweep of the op's Triton kernels on a GPU (issue 2): which block sizes,
warps and pipeline stages make each kernel fastest at the benchmark shapes.

    python tools/tune_kernels_gpu.py --shape 0 --variants 0-4 --out $OUT/tune_k128_a.json
    python tools/tune_kernels_gpu.py --dry-run            # the candidates' MDN_LAUNCH strings
    python tools/tune_kernels_gpu.py --best-of a.json b.json   # the winners' MDN_LAUNCH

Variant i sets candidate i of every tuned kernel at once (mdn_kernels.mdn.launch, MDN_LAUNCH):
the kernels run one after another inside mdn_chunk's forward+backward, so one profiled run
times all of them, each from the profiler's device time of its own launches. Variant 0 is the
defaults (launch.TUNED included), run in the same process as the reference: every variant's output and gradients are
compared with it (relative norm difference; tiles change the order of partial sums only, so
anything above bf16 rounding — or a NaN — marks a variant wrong). Each variant runs in a process
of its own (variant 0 beside it, from Triton's cache after the first): an illegal memory access
kills a CUDA context, which in one process took every later variant down with it (session 8).
A variant that fails (a tile that does not fit, a fault) is rerun one kernel's candidate at a
time, each in its own process, to tell which candidate failed. --in-process runs them all in one.

Output: JSON with, per variant, the MDN_LAUNCH string, each kernel's device time per
forward+backward (ms), the whole op's fwd+bwd time (do_bench median), the differences, and the
per-kernel best (`best`, picked by `pick`) among the variants that matched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = [dict(B=8, T=4096, H=6, K=128, V=256), dict(B=8, T=4096, H=6, K=256, V=512)]
CHUNK = 64
# Kernel → the profiler name of its launches.
PROFILER_NAME = {
    "state_fwd": "_state_fwd_kernel", "state_bwd": "_state_bwd_kernel",
    "state_pairs": "_state_pairs_kernel",
    "output_fwd": "_output_fwd_kernel", "output_bwd": "_output_bwd_kernel",
    "prepare_a": "_prepare_a_kernel", "prepare_c": "_prepare_c_kernel",
    "prepare_bwd_t": "_prepare_bwd_t_kernel", "prepare_bwd_k": "_prepare_bwd_k_kernel",
}
MAX_REL_DIFF = 2e-2   # bf16 rounding of intermediates moved by other partial-sum orders


def defaults(kernel: str, K: int, V: int) -> dict[str, int]:
    """What the launch sites (state_pass.py, chunk_local_fused.py) use at this K, V for bf16
    operands: their own defaults with launch.TUNED applied."""
    from mdn_kernels.mdn import chunk_local_fused, launch, state_pass
    if kernel in ("state_fwd", "state_bwd"):
        d = state_pass.launch_defaults(K, V)
    elif kernel == "state_pairs":
        d = state_pass.pairs_launch_defaults(K, V)
    else:
        d = chunk_local_fused.launch_defaults(kernel, K, V, CHUNK)
    d.update({k: v for k, v in launch.tuned(kernel, K, V).items() if k in d})
    return d


# Candidates as changes to the defaults (index 0 = the defaults themselves). "2x" doubles,
# "/2" halves (floor 16); plain ints are set as they are.
_STATE = [{}, {"num_stages": 2}, {"BV": "2x"}, {"BV": "2x", "num_warps": 8},
          {"BV": "2x", "num_warps": 8, "num_stages": 2}, {"num_warps": 8}, {"BV": "4x", "num_warps": 8},
          {"num_warps": 2}, {"BV": "/2"}]
_TILED = [{}, {"num_stages": 2}, {"BK": "2x"}, {"BV": "2x"}, {"BK": "2x", "BV": "2x"},
          {"num_warps": 4}, {"BV": "/2", "num_warps": 4}, {"BK": "/2"}, {"BV": "4x"}]
_NO_BV = [{}, {"num_stages": 2}, {"BK": "2x"}, {"num_warps": 4}, {"BK": "2x", "num_warps": 4},
          {"BK": "/2"}, {"BK": "/2", "num_warps": 4}, {"num_stages": 3}, {"BK": "4x"}]
_PAIRS = [{}, {"num_stages": 3}, {"BV": "/2"}, {"BK": "/2"}, {"BV": "2x", "num_warps": 8},
          {"num_warps": 8}, {"BK": "2x", "num_warps": 8}, {"num_stages": 1}, {"BK": "/2", "BV": "2x"}]
CANDIDATES = {"state_fwd": _STATE, "state_bwd": _STATE, "state_pairs": _PAIRS,
              "output_fwd": _TILED, "output_bwd": _TILED,
              "prepare_c": _TILED, "prepare_bwd_t": _TILED, "prepare_a": _NO_BV, "prepare_bwd_k": _NO_BV}
NUM_VARIANTS = len(_STATE)
assert all(len(c) == NUM_VARIANTS for c in CANDIDATES.values())


def candidate(kernel: str, i: int, K: int, V: int) -> dict[str, int]:
    d = defaults(kernel, K, V)
    for key, change in CANDIDATES[kernel][i].items():
        if key not in d:
            continue
        if change == "2x":
            d[key] *= 2
        elif change == "4x":
            d[key] *= 4
        elif change == "/2":
            d[key] = max(16, d[key] // 2)
        else:
            d[key] = int(change)
    return d


def launch_spec(configs: dict[str, dict[str, int]]) -> str:
    """{kernel: params} → the MDN_LAUNCH string."""
    return ";".join(f"{k}:" + ",".join(f"{a}={b}" for a, b in v.items()) for k, v in configs.items())


def variant_configs(i: int, K: int, V: int, kernels=None) -> dict[str, dict[str, int]]:
    return {k: candidate(k, i, K, V) for k in (kernels or CANDIDATES)}


def pick(variants: list[dict], max_rel_diff: float = MAX_REL_DIFF) -> dict:
    """Per kernel, the fastest config among the variants whose every compared quantity is
    finite and within max_rel_diff of the defaults' (variant 0's), with its time and the
    defaults' time. Variants without a time for a kernel (failed) do not count."""
    ref = next((v for v in variants if v["index"] == 0 and "kernel_ms" in v), None)
    best = {}
    for kern in CANDIDATES:
        rows = []
        for v in variants:
            if kern not in v.get("configs", {}):   # a run of some kernels' candidates only
                continue
            t = v.get("kernel_ms", {}).get(kern)
            # a failed variant's kernels were rerun alone: their differences are "kernel:name"
            diffs = {n: d for n, d in v.get("rel_diff_vs_default", {}).items()
                     if ":" not in n or n.startswith(kern + ":")}
            ok = all(d == d and d <= max_rel_diff for d in diffs.values())  # d == d: not NaN
            if t is not None and ok:
                rows.append((t, v["index"], v["configs"][kern]))
        if rows:
            t, i, cfg = min(rows, key=lambda r: r[0])
            best[kern] = dict(config=cfg, ms=t, variant=i,
                              default_ms=ref["kernel_ms"].get(kern) if ref else None)
    return best


def best_spec(results: list[dict], min_gain: float = 0.03) -> str:
    """The MDN_LAUNCH string of the per-kernel best over several runs' results of one shape
    (each run has its own variant 0, so a kernel's gain is measured against the default of the
    run its best came from): only kernels whose best is at least min_gain faster than that
    default."""
    shapes = {json.dumps(r["meta"]["shape"], sort_keys=True) for r in results}
    if len(shapes) != 1:
        raise ValueError(f"results of one shape expected, got {sorted(shapes)}")
    picks: dict[str, tuple[float, dict]] = {}
    for r in results:
        for kern, b in pick(r["variants"]).items():
            if b["default_ms"] and b["ms"] <= (1 - min_gain) * b["default_ms"]:
                gain = b["ms"] / b["default_ms"]
                if kern not in picks or gain < picks[kern][0]:
                    picks[kern] = (gain, b["config"])
    return launch_spec({k: cfg for k, (_, cfg) in sorted(picks.items())})


def _parse_range(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def run(shape: dict, indices: list[int], out_path: str, iters: int = 5, kernels=None) -> dict:
    """All the variants in this process (see the module docstring); `kernels`: set only these
    kernels' candidates (the others keep their defaults)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from mdn_kernels import mdn_chunk
    from mdn_kernels.mdn.testing import random_inputs

    B, T, H, K, V = (shape[k] for k in "BTHKV")
    xs = random_inputs(B, T, H, K, V, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=True)
    do = torch.randn(B, T, H, V, dtype=torch.bfloat16, device="cuda",
                     generator=torch.Generator("cuda").manual_seed(1))

    def fwd_bwd():
        o = mdn_chunk(*xs)[0]
        return [o.detach()] + list(torch.autograd.grad(o, xs, do))

    def kernel_times() -> dict[str, float]:
        for _ in range(2):
            fwd_bwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fwd_bwd()
            torch.cuda.synchronize()
        tot: dict[str, float] = {}
        for e in prof.key_averages():
            for kern, name in PROFILER_NAME.items():
                if e.key == name:
                    tot[kern] = tot.get(kern, 0.0) + e.device_time_total / 1e3 / iters
        return tot

    names = ["o", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, python=platform.python_version(),
                shape=shape, command=" ".join(sys.argv), dtype="bfloat16", iters=iters,
                env={k: v for k, v in os.environ.items() if k.startswith("MDN_")},
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    variants: list[dict] = []
    result = dict(meta=meta, variants=variants)

    def save():
        result["best"] = pick(variants)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)

    def measure(configs) -> dict:
        os.environ["MDN_LAUNCH"] = launch_spec(configs)
        rec: dict = dict(launch=os.environ["MDN_LAUNCH"])
        try:
            got = fwd_bwd()
            torch.cuda.synchronize()
            rec["kernel_ms"] = kernel_times()
            rec["fwd_bwd_ms"] = do_bench(lambda: fwd_bwd(), warmup=20, rep=100, return_mode="median")
            rec["_got"] = got
        except Exception as e:  # noqa: BLE001 — recorded; a CUDA fault ends the process anyway
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            os.environ.pop("MDN_LAUNCH", None)
        return rec

    ref = None
    for i in sorted(set([0] + indices)):
        configs = variant_configs(i, K, V, kernels)
        rec = measure(configs)
        rec.update(index=i, configs=configs)
        if "error" in rec:  # which kernel's candidate failed: one kernel at a time
            rec["per_kernel"] = {}
            for kern, cfg in configs.items():
                one = measure({kern: cfg})
                rec["per_kernel"][kern] = one.get("error", "ok")
                if "error" not in one:
                    rec.setdefault("kernel_ms", {})[kern] = one["kernel_ms"].get(kern)
                    if ref is not None:
                        rec.setdefault("rel_diff_vs_default", {}).update({
                            f"{kern}:{n}": _rel(a, b) for n, a, b in zip(names, one["_got"], ref)})
        got = rec.pop("_got", None)
        if i == 0:
            ref = got
        if got is not None and ref is not None:
            rec["rel_diff_vs_default"] = {n: _rel(a, b) for n, a, b in zip(names, got, ref)}
        variants.append(rec)
        print(f"[tune] K={K} variant {i}: {rec.get('error') or ''} fwd+bwd "
              f"{rec.get('fwd_bwd_ms', float('nan')):.3f} ms; " + " ".join(
                  f"{k} {v:.3f}" for k, v in rec.get("kernel_ms", {}).items()), flush=True)
        save()
    return result


def _child(shape_index: int, i: int, kernels, out_path: str) -> dict | None:
    """Variant i (with variant 0 as its reference) in a process of its own: a fault (an illegal
    memory access kills the CUDA context) then ends only that process. None if it wrote nothing."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--shape", str(shape_index), "--variants",
           str(i), "--in-process", "--out", out_path]
    if kernels:
        cmd += ["--kernels", ",".join(kernels)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    if r.returncode:
        sys.stdout.write(r.stderr[-2000:])
    return json.load(open(out_path)) if os.path.exists(out_path) else None


def run_isolated(shape_index: int, indices: list[int], out_path: str, child=_child) -> dict:
    """Each variant in its own process; a variant that fails or faults is rerun one kernel's
    candidate at a time, each in its own process, so the failing candidate is named and the
    others still count. Same JSON as run() (each child's variant 0 is the reference of its own
    differences; the first one's is recorded as variant 0)."""
    shape = SHAPES[shape_index]
    work = os.path.splitext(out_path)[0] + "_runs"
    os.makedirs(work, exist_ok=True)
    variants: list[dict] = []
    result = dict(meta=dict(shape=shape, command=" ".join(sys.argv), isolated=True,
                            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
                  variants=variants)

    def save():
        result["best"] = pick(variants)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)

    def record(res, i):
        return next((v for v in (res or {}).get("variants", []) if v["index"] == i), None)

    for i in [v for v in indices if v != 0] or [0]:
        res = child(shape_index, i, None, os.path.join(work, f"v{i}.json"))
        if res and not variants:
            result["meta"].update({k: v for k, v in res["meta"].items() if k not in result["meta"]})
            ref = record(res, 0)
            if ref is not None:
                variants.append(ref)
        rec = record(res, i)
        # the child reran a failed variant kernel by kernel itself; after a fault (a dead CUDA
        # context: every rerun failed with a CUDA error) that must happen in fresh processes
        faulted = rec is None or ("error" in rec and (not rec.get("per_kernel") or any(
            "CUDA" in str(e) for e in rec["per_kernel"].values())))
        if i != 0 and faulted:
            rec = dict(index=i, configs={}, kernel_ms={}, rel_diff_vs_default={}, per_kernel={},
                       error=(rec or {}).get("error", "the process ended without a result"))
            for kern in CANDIDATES:
                one = record(child(shape_index, i, [kern], os.path.join(work, f"v{i}_{kern}.json")), i)
                if one is None or "error" in one:
                    rec["per_kernel"][kern] = (one or {}).get("error", "the process ended without a result")
                    continue
                rec["per_kernel"][kern] = "ok"
                rec["configs"][kern] = one["configs"][kern]
                rec["kernel_ms"][kern] = one["kernel_ms"].get(kern)
                rec["rel_diff_vs_default"].update(
                    {f"{kern}:{n}": d for n, d in one.get("rel_diff_vs_default", {}).items()})
            print(f"[tune] variant {i} one kernel at a time: {rec['per_kernel']}", flush=True)
        if rec is not None and i != 0:
            variants.append(rec)
        save()
    return result


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, default=0, help=f"index into {SHAPES}")
    ap.add_argument("--variants", default=f"0-{NUM_VARIANTS - 1}", help="e.g. 0-4 or 1,3,5")
    ap.add_argument("--out", default=None, help="JSON to write")
    ap.add_argument("--dry-run", action="store_true", help="print the variants' MDN_LAUNCH and stop")
    ap.add_argument("--kernels", default=None,
                    help="comma list: set only these kernels' candidates (the others keep their defaults)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every variant in this process (default: each in its own, so that a "
                         "fault ends only its own; a failed variant is rerun kernel by kernel)")
    ap.add_argument("--best-of", nargs="+", metavar="JSON",
                    help="print the MDN_LAUNCH of the per-kernel best in these results (one shape) "
                         "and stop")
    args = ap.parse_args(argv)
    if args.best_of:
        results = [json.load(open(f)) for f in args.best_of if os.path.exists(f)]
        print(best_spec(results) if results else "")
        return 0
    shape = SHAPES[args.shape]
    indices = _parse_range(args.variants)
    if any(not 0 <= i < NUM_VARIANTS for i in indices):
        ap.error(f"--variants must lie in 0-{NUM_VARIANTS - 1}, got {args.variants}")
    kernels = args.kernels.split(",") if args.kernels else None
    if kernels and not set(kernels) <= set(CANDIDATES):
        ap.error(f"--kernels must name some of {', '.join(CANDIDATES)}")
    if args.dry_run:
        from mdn_kernels.mdn import launch
        for i in indices:
            spec = launch_spec(variant_configs(i, shape["K"], shape["V"], kernels))
            launch.parse(spec)  # a candidate the launch sites would refuse fails here
            print(f"{i}: {spec}")
        return 0
    import torch
    if not torch.cuda.is_available():
        sys.exit("tune_kernels_gpu.py needs a CUDA GPU (run it on the lent device machine)")
    if not args.out:
        ap.error("--out is required")
    if args.in_process:
        run(shape, indices, args.out, kernels=kernels)
    else:
        run_isolated(args.shape, indices, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
