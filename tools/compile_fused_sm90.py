"""Compile the fused chunk-local kernels for an H100 (sm_90) on a machine without a GPU, and
report registers, spills and shared memory per kernel (Triton's own compiler and the ptxas it
ships; no CUDA driver needed).

    python tools/compile_fused_sm90.py [--K 128 --V 256] [--json out.json] [kernel names ...]
    python tools/compile_fused_sm90.py --fuse-variants   # the state backward's FUSE_OUT variants

It catches what the interpreter cannot: compile errors of the real Triton pipeline, and
register spills (a spilling kernel is correct but slow). Kernels compile as the JIT specializes
them (16-byte aligned pointers, so vector loads) and, for the reverse state pass, without
wgmma as the op launches it (mdn_kernels.mdn.wgmma). Exit status 1 when a kernel fails to
compile. Block sizes and warps are those LocalPrepare / LocalOutput launch with at chunk 64.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # must precede the kernels' import (jit reads it)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mdn_kernels.mdn import chunk_local_fused as fused  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
BF16_ARGS = ("Q", "KK", "VV", "LA", "LM", "BE", "ET", "DQ", "DK", "DV", "DLA", "DLM", "DBE",
             "DET", "DO", "O")


def arg_types():
    types = {"CS": "*i32", "CL": "*i32", "scale": "fp32", "QS": "i32", "KS": "i32", "VS": "i32"}
    types.update({n: "*bf16" for n in BF16_ARGS})   # 16-bit model inputs; the rest fp32
    return types


def compile_one(fn, consts: dict, num_warps: int, arch: int = 90, override=None,
                maxnreg: int | None = None, mmav2: bool = False) -> dict:
    """ptxas's report for one kernel; mmav2: compiled without Hopper's wgmma, as
    mdn_kernels.mdn.wgmma launches its groups (DISABLE_MMA_V3=1 while compiling)."""
    from mdn_kernels.mdn import wgmma
    with wgmma.mmav2_compile() if mmav2 else contextlib.nullcontext():
        return _compile_one(fn, consts, num_warps, arch, override, maxnreg)


def _compile_one(fn, consts, num_warps, arch, override, maxnreg) -> dict:
    types = arg_types()
    types.update(override or {})
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "*fp32")) for n in names}
    # every pointer 16-byte aligned, as the JIT specializes the pointers it is given (torch's
    # allocations are): without it the loads compile as scalar 2-byte ones
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=num_warps, num_stages=1,
                                     **({} if maxnreg is None else dict(maxnreg=maxnreg))))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    try:
        run = subprocess.run([PTXAS, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    info = run.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else None  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"),
                stack_frame=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"),
                shared_bytes=ck.metadata.shared, num_warps=num_warps)


def jobs(K: int, V: int, C: int = 64, f32p: str = "ieee", raw: bool = True):
    """raw: the backward kernels read the raw bf16 q, k and the l2norm scales (MDN_RAW_QK=1, the
    default), else the fp32 q̂, k̂ chunks."""
    BK, BV = fused._blocks(K, V)
    nw = fused._num_warps(C)
    mm = dict(MMDT=tl.bfloat16, MMPREC="tf32")
    gates = dict(PTA=True, FLOOR=fused.LOG_FLOOR)
    cgm = dict(FACTORS=False)   # the preparation stores Kg, Km, Y, Z (not their factors)
    rw = dict(RAW=raw)
    qk = dict(QC="*bf16", KC="*bf16") if raw else {}
    pairs = dict(W="*bf16", S0S="*bf16", M0S="*bf16", DW="*bf16", DS0S="*bf16", DM0S="*bf16")
    return {
        "prepare_a": (fused._prepare_a_kernel, dict(H=6, K=K, C=C, BK=BK, NORM=True, EPS=1e-6,
                                                    F32P=f32p, **gates, **cgm, **mm), nw),
        "solve": (fused._solve_kernel, dict(C=C, F32P=f32p), 2),
        "prepare_c": (fused._prepare_c_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV, **cgm,
                                                    **mm), nw),
        "bwd_t": (fused._prepare_bwd_t_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV, DAP="tf32",
                                                    **rw, **mm), nw, qk),
        "bwd_k": (fused._prepare_bwd_k_kernel, dict(H=6, K=K, C=C, BK=BK, NORM=True, F32P=f32p,
                                                    SYM=fused.prep_bwd_sym(), **rw, **gates,
                                                    **mm), nw, qk),
        "bwd_decay": (fused._prepare_bwd_decay_kernel, dict(H=6, C=C, F32P=f32p, **gates), nw),
        "out_fwd": (fused._output_fwd_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV, **mm), nw),
        "out_bwd": (fused._output_bwd_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV,
                                                   PAIR_GRAD=True, STORE_DW=True, **rw, **mm), nw,
                    dict(pairs, **qk)),
        # MDN_RECOMPUTE_PAIRS: bf16 state-pass operands out of LocalPrepare; mode 2's kernels
        "prepare_a_bf16op": (fused._prepare_a_kernel, dict(H=6, K=K, C=C, BK=BK, NORM=True,
                                                           EPS=1e-6, F32P=f32p, **gates, **cgm,
                                                           **mm),
                             nw, dict(KGO="*bf16", KMO="*bf16")),
        "prepare_c_bf16op": (fused._prepare_c_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV, **cgm,
                                                           **mm),
                             nw, dict(UO="*bf16", YO="*bf16", ZO="*bf16")),
        # the factored state passes' preparation (chunk.state_kfac): k̂, T, c_g, c_m stored
        # instead of Kg, Km, Y, Z
        "prepare_a_factors": (fused._prepare_a_kernel, dict(H=6, K=K, C=C, BK=BK, NORM=True,
                                                            EPS=1e-6, F32P=f32p, **gates, **mm,
                                                            FACTORS=True),
                              nw, dict(KGO="*bf16", KMO="*bf16", KHO="*bf16")),
        "prepare_c_factors": (fused._prepare_c_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV, **mm,
                                                            FACTORS=True),
                              nw, dict(UO="*bf16", YO="*bf16", ZO="*bf16", TMO="*bf16")),
        "bwd_t_bf16op": (fused._prepare_bwd_t_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV,
                                                           DAP="tf32", **rw, **mm), nw,
                         dict(DU="*bf16", DY="*bf16", DZ="*bf16", **qk)),
        "out_bwd_rest": (fused._output_bwd_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV,
                                                        PAIR_GRAD=False, STORE_DW=False, **rw,
                                                        **mm), nw, dict(pairs, **qk)),
        "out_bwd_dw": (fused._output_bwd_dw_kernel, dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV,
                                                         PAIR_GRAD=True, **rw, **mm),
                       nw, dict(DW="*bf16", **qk)),
        **state_jobs(K, V, C),
    }


def _state_bf16_args():
    bf = {n: "*bf16" for n in ("U", "Y", "Z", "KG", "KM", "W", "S0S", "M0S", "DW", "DS0S", "DM0S",
                               "DWT", "DS_END", "DM_END", "DO")}
    bf.update(OFFSETS="*i64", NCH="i32")
    return bf


def state_jobs(K: int, V: int, C: int = 64):
    """The state pass's kernels as 16-bit models launch them (bf16 operands, tf32 products)."""
    from mdn_kernels.mdn import state_pass as sp
    BK, BV = triton.next_power_of_2(K), sp._block_v(K, V)
    bf = _state_bf16_args()
    base = dict(H=6, K=K, V=V, C=C, BK=BK, BV=BV, PREC="tf32")
    pairs = sp.pairs_launch_defaults(K, V)
    pairs_blocks = dict(BK=pairs["BK"], BV=pairs["BV"])
    bwd = dict(base, HAS_DFIN=True, STORE_DINIT=True, INIT_ONLY=False, FV="strided",
               END_LATE=False, KFAC=False)
    return {
        "state_fwd": (sp._state_fwd_kernel, dict(base, HAS_INIT=True, KFAC=False), 4, bf),
        # StateOutput's backward re-making the pairs from the saved W (MDN_SAVE_W)
        "state_pairs": (sp._state_pairs_kernel, dict(base, HAS_INIT=True, KFAC=False,
                                                     **pairs_blocks), pairs["num_warps"], bf),
        # both on the factors of the four operands (kfac, MDN_STATE_KFAC=1)
        "state_fwd_kfac": (sp._state_fwd_kernel, dict(base, HAS_INIT=True, KFAC=True), 4,
                           dict(bf, KH="*bf16", TM="*bf16")),
        "state_pairs_kfac": (sp._state_pairs_kernel, dict(base, HAS_INIT=True, KFAC=True,
                                                          **pairs_blocks), pairs["num_warps"],
                             dict(bf, KH="*bf16")),
        "state_bwd": (sp._state_bwd_kernel, dict(bwd, FUSE_OUT=False, OMMDT=tl.float32,
                                                 OPREC="ieee"), 4, bf),
        # the lean node's default: dS_end, dM_end written over the output's pair cotangents
        "state_bwd_end_late": (sp._state_bwd_kernel, dict(bwd, FUSE_OUT=False, OMMDT=tl.float32,
                                                          OPREC="ieee", END_LATE=True), 4, bf),
        # the same with its four operands loaded as factors (state_pass_bwd_triton's kfac)
        "state_bwd_kfac": (sp._state_bwd_kernel, dict(bwd, FUSE_OUT=False, OMMDT=tl.float32,
                                                      OPREC="ieee", END_LATE=True, KFAC=True),
                           4, dict(bf, KH="*bf16", TM="*bf16")),
        # MDN_RECOMPUTE_PAIRS=2's kernel as launched by default (sp.DEFAULT_FUSE_VARIANT)
        "state_bwd_fused": fuse_variant_job(K, V, C, sp.DEFAULT_FUSE_VARIANT),
        "state_bwd_init_only": (sp._state_bwd_kernel, dict(bwd, INIT_ONLY=True, FUSE_OUT=False,
                                                           OMMDT=tl.float32, OPREC="ieee"), 4, bf),
    }


def fuse_variant_job(K: int, V: int, C: int, name: str):
    """The state backward with FUSE_OUT as state_pass_bwd_triton launches FUSE_VARIANTS[name]."""
    from mdn_kernels.mdn import state_pass as sp
    BK, BV = triton.next_power_of_2(K), sp._block_v(K, V)
    fv, num_warps, bv_div = sp.FUSE_VARIANTS[name]
    consts = dict(H=6, K=K, V=V, C=C, BK=BK, BV=max(16, BV // bv_div), PREC="tf32",
                  HAS_DFIN=True, STORE_DINIT=True, INIT_ONLY=False, FUSE_OUT=True,
                  OMMDT=tl.bfloat16, OPREC="tf32", FV=fv, END_LATE=False, KFAC=False)
    return sp._state_bwd_kernel, consts, num_warps, _state_bf16_args()


def fuse_variant_jobs(K: int, V: int, C: int = 64):
    from mdn_kernels.mdn import state_pass as sp
    return {f"fused:{n}": fuse_variant_job(K, V, C, n) for n in sp.FUSE_VARIANTS}


def _mmav2(name: str) -> bool:
    """Whether the job's kernel compiles without wgmma in the op (wgmma.DEFAULT_GROUPS: the
    reverse state pass)."""
    from mdn_kernels.mdn import wgmma
    return (name.startswith("state_bwd") or name.startswith("fused:")) and wgmma.no_wgmma("state_bwd")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=256)
    ap.add_argument("--fp32-dot", default="ieee", choices=["ieee", "tf32x3"],
                    help="precision of the fp32 products (MDN_FUSED_FP32_DOT)")
    ap.add_argument("--chunk-qk", action="store_true",
                    help="the backward kernels as MDN_RAW_QK=0 launches them (fp32 q̂, k̂ chunks)")
    ap.add_argument("--json", default=None, help="write the table here")
    ap.add_argument("--fuse-variants", action="store_true",
                    help="compile the state backward's FUSE_OUT variants (state_pass.FUSE_VARIANTS, "
                         "MDN_RECOMPUTE_PAIRS=2) instead of the kernels")
    ap.add_argument("--maxnreg", type=int, default=None,
                    help="ptxas's register cap per thread (MDN_LAUNCH's maxnreg key)")
    ap.add_argument("kernels", nargs="*", help="names to compile (default: all)")
    args = ap.parse_args(argv)
    table, failed = {}, []
    all_jobs = (fuse_variant_jobs(args.K, args.V) if args.fuse_variants
                else jobs(args.K, args.V, f32p=args.fp32_dot, raw=not args.chunk_qk))
    unknown = set(args.kernels) - set(all_jobs)
    if unknown:
        sys.exit(f"unknown kernel names {sorted(unknown)}; known: {sorted(all_jobs)}")
    for name, (fn, consts, nw, *override) in all_jobs.items():
        if args.kernels and name not in args.kernels:
            continue
        try:
            table[name] = res = compile_one(fn, consts, nw, override=override[0] if override else None,
                                            maxnreg=args.maxnreg, mmav2=_mmav2(name))
            print(f"{name:10s} warps {nw} regs {res['registers']:3d} spill "
                  f"{res['spill_stores']:5d}/{res['spill_loads']:5d} B  stack "
                  f"{res['stack_frame']:5d} B  shared {res['shared_bytes']:6d} B", flush=True)
        except Exception as e:  # report every kernel, then fail
            failed.append(name)
            print(f"{name:10s} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(triton=triton.__version__, command="python " + " ".join(sys.argv),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        note="compiled on a machine without a GPU (Triton's compiler and ptxas)")
            json.dump(dict(K=args.K, V=args.V, arch="sm_90", maxnreg=args.maxnreg,
                           kernels=table, failed=failed,
                           meta=meta), f, indent=2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
