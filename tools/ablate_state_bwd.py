"""Where the reverse state pass's time goes: the kernel timed with parts of its chunk step cut out.

    python tools/ablate_state_bwd.py --out $OUT/ablate.json            # on a GPU
    python tools/ablate_state_bwd.py --cpu-smoke --out /tmp/a.json     # tiny, TRITON_INTERPRET=1

The reverse pass (state_pass._state_bwd_kernel, as the lean backward launches it: factored
operands at K = 256, end cotangents over the pair cotangents) is latency-bound: its time moves in
whole waves of programs (BENCHMARKS.md, session 24), about 11.7 µs per chunk step on an H200.
Each variant here is the kernel's own source with some statements replaced (ABLATIONS; two,
early_loads and gates_last, are reorderings with the same results, not cuts), written
to a temporary module (Triton's JIT reads a kernel's source from its file), launched through
state_pass_bwd_triton in the kernel's place. The results of a cut are wrong by design: only
its time means something (the reorderings' results are compared with the kernel's), against the unchanged kernel's time in the same process (variant
"none"). Shapes: one 4K sequence (the 1.3B step's launch per backward segment: one wave) and
2 × 4K (two waves), K = 256, V = 512, H = 6.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import os
import platform
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

SHAPES = [dict(B=1, T=4096, H=6, K=256, V=512), dict(B=2, T=4096, H=6, K=256, V=512)]
SMOKE_SHAPES = [dict(B=2, T=40, H=2, K=32, V=48)]

_GATES = ("""            s0 = tl.load(S0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
            m0 = tl.load(M0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
            gofs = i_v * NCH * H + ch
            tl.store(DGATES + gofs, tl.sum(tl.sum(ds * s0, 1), 0))
            tl.store(DGATES + NCH * H * tl.num_programs(0) + gofs, -tl.sum(tl.sum(ds * m0, 1), 0))
            tl.store(DGATES + 2 * NCH * H * tl.num_programs(0) + gofs, tl.sum(tl.sum(dm * m0, 1), 0))
""", "            pass\n")
_END_STORES = ("""            tl.debug_barrier()
            tl.store(DS_END + ch * K * V + kv, ds.to(DS_END.dtype.element_ty), mask=m_kv)
            tl.store(DM_END + ch * K * V + kv, dm.to(DM_END.dtype.element_ty), mask=m_kv)
""", "            pass\n")
_PAIR_GRADS = ("""            ds0 = tl.load(DS0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
            dm0 = tl.load(DM0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
""", """            ds0 = tl.zeros([BK, BV], dtype=tl.float32)
            dm0 = tl.zeros([BK, BV], dtype=tl.float32)
""")
_DWT_STORE = ("""            tl.store(DWT + ch * C * V + cv, dw.to(DWT.dtype.element_ty), mask=m_v[None, :])
""", "            pass\n")
_T_DOT = ("""            x = tl.dot(t_t, dw.to(t_t.dtype), input_precision=PREC)
""", "            x = dw\n")
_BACK_DOTS = ("""            y_dw = tl.dot(kh_t, (tl.load(ELE + ch * C + o_c)[:, None] * x).to(kh.dtype),
                          input_precision=PREC)
            z_dw = tl.dot(kh_t, (tl.load(G0R + ch * C + o_c)[:, None] * x).to(kh.dtype),
                          input_precision=PREC)
""", """            y_dw = tl.zeros([BK, BV], dtype=tl.float32) + tl.sum(x)
            z_dw = tl.zeros([BK, BV], dtype=tl.float32) - tl.sum(x)
""")
_FWD_DOTS = ("""            dw = (dw - cg[:, None] * tl.dot(kh, ds.to(kh.dtype), input_precision=PREC)
                  + cm[:, None] * tl.dot(kh, dm.to(kh.dtype), input_precision=PREC))
""", """            dw = dw - cg[:, None] * tl.sum(ds) + cm[:, None] * tl.sum(dm)
""")
# Not cuts: the chunk step of the model's path (KFAC, END_LATE, no FUSE_OUT, not INIT_ONLY)
# reordered, with the same results. Both begin and end alike: the gate sums of the leaving
# cotangent after the products, then its store over dS0's tile.
_LOOP_START = "    for i in range(0, c_end - c_start):\n"
_LOOP_END = "    if STORE_DINIT:\n"
_STEP_HEAD = """    for i in range(0, c_end - c_start):
        c = c_end - 1 - i
        ch = c * H + i_h
        s0 = tl.load(S0S + ch * K * V + kv, mask=m_kv, other=0.0)
        m0 = tl.load(M0S + ch * K * V + kv, mask=m_kv, other=0.0)
"""
_STEP_TAIL = """        s0f = s0.to(tl.float32)
        m0f = m0.to(tl.float32)
        gofs = i_v * NCH * H + ch
        tl.store(DGATES + gofs, tl.sum(tl.sum(ds * s0f, 1), 0))
        tl.store(DGATES + NCH * H * tl.num_programs(0) + gofs, -tl.sum(tl.sum(ds * m0f, 1), 0))
        tl.store(DGATES + 2 * NCH * H * tl.num_programs(0) + gofs, tl.sum(tl.sum(dm * m0f, 1), 0))
        tl.debug_barrier()
        tl.store(DS_END + ch * K * V + kv, ds.to(DS_END.dtype.element_ty), mask=m_kv)
        tl.store(DM_END + ch * K * V + kv, dm.to(DM_END.dtype.element_ty), mask=m_kv)
        ds = ds_prev
        dm = dm_prev
"""
REORDERINGS = {
    # every load issued first, so that their latencies overlap the products
    "early_loads": _STEP_HEAD + """        ds0 = tl.load(DS0S + ch * K * V + kv, mask=m_kv, other=0.0)
        dm0 = tl.load(DM0S + ch * K * V + kv, mask=m_kv, other=0.0)
        kh = tl.load(KH + ch * C * K + ck, mask=m_k[None, :], other=0.0)
        cg = tl.load(CG + ch * C + o_c)
        cm = tl.load(CM + ch * C + o_c)
        dw = tl.load(DW + ch * C * V + cv, mask=m_v[None, :], other=0.0).to(tl.float32)
        t_t = tl.load(TM + ch * C * C + o_c[None, :] * C + o_c[:, None])
        ele = tl.load(ELE + ch * C + o_c)
        g0r = tl.load(G0R + ch * C + o_c)
        a = tl.load(A_END + ch)
        g = tl.load(G_END + ch)
        uu = tl.load(U_END + ch)
        dw = (dw - cg[:, None] * tl.dot(kh, ds.to(kh.dtype), input_precision=PREC)
              + cm[:, None] * tl.dot(kh, dm.to(kh.dtype), input_precision=PREC))
        tl.store(DWT + ch * C * V + cv, dw.to(DWT.dtype.element_ty), mask=m_v[None, :])
        x = tl.dot(t_t, dw.to(t_t.dtype), input_precision=PREC)
        kh_t = tl.trans(kh)
        y_dw = tl.dot(kh_t, (ele[:, None] * x).to(kh.dtype), input_precision=PREC)
        z_dw = tl.dot(kh_t, (g0r[:, None] * x).to(kh.dtype), input_precision=PREC)
        ds_prev = a * ds + y_dw + ds0.to(tl.float32)
        dm_prev = uu * dm - g * ds - z_dw + dm0.to(tl.float32)
""" + _STEP_TAIL,
    # only S0, M0 loaded first (the other loads where the products need them)
    "gates_last": _STEP_HEAD + """        kh = tl.load(KH + ch * C * K + ck, mask=m_k[None, :], other=0.0)
        cg = tl.load(CG + ch * C + o_c)
        cm = tl.load(CM + ch * C + o_c)
        dw = tl.load(DW + ch * C * V + cv, mask=m_v[None, :], other=0.0).to(tl.float32)
        dw = (dw - cg[:, None] * tl.dot(kh, ds.to(kh.dtype), input_precision=PREC)
              + cm[:, None] * tl.dot(kh, dm.to(kh.dtype), input_precision=PREC))
        tl.store(DWT + ch * C * V + cv, dw.to(DWT.dtype.element_ty), mask=m_v[None, :])
        t_t = tl.load(TM + ch * C * C + o_c[None, :] * C + o_c[:, None])
        x = tl.dot(t_t, dw.to(t_t.dtype), input_precision=PREC)
        kh_t = tl.trans(kh)
        y_dw = tl.dot(kh_t, (tl.load(ELE + ch * C + o_c)[:, None] * x).to(kh.dtype),
                      input_precision=PREC)
        z_dw = tl.dot(kh_t, (tl.load(G0R + ch * C + o_c)[:, None] * x).to(kh.dtype),
                      input_precision=PREC)
        a = tl.load(A_END + ch)
        g = tl.load(G_END + ch)
        uu = tl.load(U_END + ch)
        ds0 = tl.load(DS0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
        dm0 = tl.load(DM0S + ch * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
        ds_prev = a * ds + y_dw + ds0
        dm_prev = uu * dm - g * ds - z_dw + dm0
""" + _STEP_TAIL,
}
# name → the (statement, replacement) pairs it cuts ("none": the kernel unchanged), or the
# reordered chunk step that replaces the kernel's
ABLATIONS = {
    "none": (),
    "no_gate_sums": (_GATES,),
    "no_end_stores": (_END_STORES,),
    "no_pair_grad_loads": (_PAIR_GRADS,),
    "no_dwt_store": (_DWT_STORE,),
    "no_t_product": (_T_DOT,),
    "no_kt_products": (_BACK_DOTS,),
    "no_k_products": (_FWD_DOTS,),
    "memory_only": (_T_DOT, _BACK_DOTS, _FWD_DOTS),
    "products_only": (_GATES, _END_STORES, _PAIR_GRADS, _DWT_STORE),
    **REORDERINGS,
}


def ablated_kernel(name: str, tmpdir: str):
    """The reverse pass's kernel with ABLATIONS[name] applied, as a JIT function of a module
    written to tmpdir (ValueError when a statement is not found: the kernel changed)."""
    import triton
    from mdn_kernels.mdn import state_pass
    src = textwrap.dedent(inspect.getsource(state_pass._state_bwd_kernel.fn))
    if name in REORDERINGS:   # the whole chunk step replaced
        start, end = src.index(_LOOP_START), src.index(_LOOP_END)
        src = src[:start] + REORDERINGS[name] + src[end:]
    for old, new in () if name in REORDERINGS else ABLATIONS[name]:
        if old not in src:
            raise ValueError(f"ablation {name}: statement not in _state_bwd_kernel:\n{old}")
        src = src.replace(old, new)
    path = os.path.join(tmpdir, f"ablated_{name}.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n\n" + src.replace(
            "@triton.jit\n", "") .replace("def _state_bwd_kernel(", "def _state_bwd_kernel(", 1))
    spec = importlib.util.spec_from_file_location(f"ablated_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return triton.jit(mod._state_bwd_kernel)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ablations", default=",".join(ABLATIONS))
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes under TRITON_INTERPRET=1 (checks the tool, times nothing)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    from bench_state_pairs import factor_operands
    from mdn_kernels.mdn import state_pass
    device = "cpu" if args.cpu_smoke else "cuda"
    names = args.ablations.split(",")
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        ap.error(f"unknown ablations {bad}; known: {list(ABLATIONS)}")
    original = state_pass._state_bwd_kernel
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {n: ablated_kernel(n, tmp) for n in names}
        for sh in (SMOKE_SHAPES if args.cpu_smoke else SHAPES):
            C = 16 if args.cpu_smoke else 64
            ops, kfac, layout = factor_operands(**sh, C=C, device=device)
            N, H, K, V = layout.num_seqs, sh["H"], sh["K"], sh["V"]
            S0 = torch.zeros(N, H, K, V, device=device)
            _, S0s, M0s, _, _ = state_pass.state_pass_fwd_triton(*ops, S0, S0, layout, kfac=kfac)
            g = torch.Generator(device="cpu").manual_seed(1)
            dW = (torch.randn(ops[0].shape, generator=g) * 0.1).to(device, ops[1].dtype)
            dP = [(torch.randn(S0s.shape, generator=g) * 0.01).to(device, S0s.dtype)
                  for _ in range(2)]
            fresh = [dW.clone(), dP[0].clone(), dP[1].clone()]

            def copies():
                for f, src in zip(fresh, (dW, *dP)):
                    f.copy_(src)

            def run():
                copies()
                return state_pass.state_pass_bwd_triton(
                    *ops[1:], fresh[0], fresh[1], fresh[2], None, None, S0s, M0s, layout,
                    dWt_out=fresh[0], end_over_pair_grads=True, kfac=kfac)

            copy_ms = None if args.cpu_smoke else triton.testing.do_bench(copies, warmup=5, rep=50)
            want = [t.clone() for t in run()[:6]]   # the unchanged kernel's results
            for n in names:
                state_pass._state_bwd_kernel = kernels[n]
                try:
                    got = [t.clone() for t in run()[:6]]
                    ms = None if args.cpu_smoke else triton.testing.do_bench(run, warmup=5, rep=50)
                finally:
                    state_pass._state_bwd_kernel = original
                row = dict(shape=sh, ablation=n, ms=None if ms is None else ms - copy_ms,
                           copies_ms_subtracted=copy_ms)
                if n == "none" or n in REORDERINGS:   # the same results expected
                    row["max_rel_diff_to_kernel"] = max(
                        ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                        for a, b in zip(got, want))
                rows.append(row)
                t = "" if ms is None else f"{row['ms']:.3f} ms"
                d = f" diff {row['max_rel_diff_to_kernel']:.1e}" if "max_rel_diff_to_kernel" in row else ""
                print(f"B={sh['B']} T={sh['T']} K={K} V={V} {n:20s} {t}{d}", flush=True)
    out = dict(meta=dict(card="cpu (--cpu-smoke: numbers mean nothing)" if args.cpu_smoke
                         else torch.cuda.get_device_name(), torch=torch.__version__,
                         triton=triton.__version__, python=platform.python_version(),
                         command="python " + " ".join(sys.argv),
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                             timespec="seconds")),
               note="ablated variants compute wrong results by design: their times only",
               rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
