"""Exact memory accounting of one mdn_chunk forward+backward, on CPU, at any shape.

    python tools/mem_accounting.py                       # the bench shape, 16-bit fused path
    MDN_RECOMPUTE_PAIRS=0 python tools/mem_accounting.py # a variant (any MDN_* flag)
    python tools/mem_accounting.py --modes 0,1,2         # each MDN_RECOMPUTE_PAIRS mode, and a
                                                         # summary table of them at the end

Runs the real Python driver (chunk.py, chunk_local_fused.py, state_pass.py) on CPU tensors with
every Triton kernel launch replaced by a no-op: the kernels only fill tensors the Python side
allocated, so every allocation, its dtype and its lifetime are exactly those of the GPU run
(kernel numbers are garbage, which no allocation depends on). It reports

  * every tensor saved for backward (torch.autograd.graph.saved_tensors_hooks, deduplicated by
    storage; the op's inputs marked as such: they exist anyway), and all memory held between
    forward and backward (this also sees tensors kept as ctx attributes, which the hooks miss),
  * the live bytes after every aten op (a TorchDispatchMode, storages tracked by weak
    reference), the peak of forward and of backward, and the tensors alive at the peak with the
    line of kernels/ that made them.

"Live" counts only storages made during the call, as tools/bench_kernels.py's peak counts
memory above the inputs and the output cotangent. The CUDA caching allocator rounds blocks up
to 512 B and may keep freed blocks split; neither changes MiB-level totals.
"""
from __future__ import annotations

import argparse
import os
import linecache
import sys
from collections import defaultdict

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MiB = 2 ** 20


def _no_launch(self, grid):
    return lambda *a, **k: None


def launch_classes():
    """The classes whose kernel[grid] launches: JITFunction, and InterpretedFunction (what
    @triton.jit makes under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return [JITFunction, InterpretedFunction]


def stub_triton_launches():
    """kernel[grid](...) becomes a no-op for every @triton.jit kernel."""
    for cls in launch_classes():
        cls.__getitem__ = _no_launch


def _where() -> str:
    """The innermost frame in kernels/ (or this file) that led to an allocation."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if "/kernels/" in name or "/mdn_kernels/" in name or name.endswith("mem_accounting.py"):
            line = linecache.getline(name, f.f_lineno).strip()[:60]
            return f"{name.split('/')[-1]}:{f.f_lineno} {line}"
        f = f.f_back
    return "?"


class LiveMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}         # storage cdata → (weakref, nbytes, desc)
        self.phase = "forward"
        self.peaks = defaultdict(lambda: (0, []))
        self.timeline = []

    def _bytes(self):
        dead = [c for c, (w, _, _) in self.live.items() if w.expired()]
        for c in dead:
            del self.live[c]
        return sum(n for _, n, _ in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        for t in flat:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in self.live:
                    desc = f"{tuple(t.shape)} {str(t.dtype)[6:]} {func.__name__} @ {_where()}"
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes(), desc)
        now = self._bytes()
        self.timeline.append((self.phase, func.__name__, now))
        if now > self.peaks[self.phase][0]:
            self.peaks[self.phase] = (now, sorted(((n, d) for _, n, d in self.live.values()),
                                                  reverse=True))
        return out


def _one_rank_group() -> bool:
    """A gloo process group of this one process for the CP op; True if made here."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    return True


def _cp_op(xs, T):
    """The CP op (mdn_kernels.cp) on a group of this one process, as a layer under
    MDN_CP_EMULATE=1 calls it: one document, q·k l2-normed, p_times_alpha."""
    import torch.distributed as dist
    from mdn_kernels.cp import mdn_chunk_cp

    cu = torch.tensor([0, T], dtype=torch.int32)
    return mdn_chunk_cp(*xs, scale=None, initial_state=None, output_final_state=False, cu_seqlens=cu,
                        use_qk_l2norm=True, p_times_alpha=True, cp_group=dist.group.WORLD,
                        backend="triton", chunk_size=64)


def account(B, T, H, K, V, dtype, chunk_size=64, verbose=True, cp=False):
    from mdn_kernels import mdn_chunk
    from mdn_kernels.mdn.testing import random_inputs

    xs = [x.detach().requires_grad_() for x in
          random_inputs(B, T, H, K, V, dtype=dtype, seed=0)]
    if cp:   # the model's dtypes: 16-bit q, k, v, fp32 gates
        xs = [(x.detach().float() if i >= 3 else x.detach()).requires_grad_() for i, x in enumerate(xs)]
    do = torch.randn(B, T, H, V, dtype=dtype)
    inputs = {x.untyped_storage()._cdata: n for x, n in
              zip(xs, ["q", "k", "v", "log_alpha", "log_mu", "beta", "eta"])}
    saved = {}

    mode = LiveMemory()
    for x in [*xs, do]:  # exist before the call: never counted (views of them share storage)
        mode.live[x.untyped_storage()._cdata] = (StorageWeakRef(x.untyped_storage()), 0, "input")

    def pack(t):
        st = t.untyped_storage()
        made = mode.live.get(st._cdata, (None, None, "? ?"))[2].split(" @ ")[-1]
        saved.setdefault(st._cdata, (st.nbytes(), tuple(t.shape), t.dtype,
                                     inputs.get(st._cdata), made))
        return t

    made_group = cp and _one_rank_group()
    try:
        with mode:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                o, _ = _cp_op(xs, T) if cp else mdn_chunk(*xs, backend="triton")
            held = mode._bytes() - o.untyped_storage().nbytes()
            mode.phase = "backward"
            torch.autograd.backward(o, do)
            mode.phase = "after"
            mode._bytes()
    finally:
        if made_group:
            import torch.distributed as dist
            dist.destroy_process_group()
    res = dict(
        saved=sorted(saved.values(), key=lambda r: -r[0]),
        saved_bytes=sum(r[0] for r in saved.values() if r[3] is None),
        held_bytes=held,
        peak_fwd=mode.peaks["forward"][0], peak_bwd=mode.peaks["backward"][0],
        peak_fwd_live=mode.peaks["forward"][1], peak_bwd_live=mode.peaks["backward"][1],
    )
    if verbose:
        from mdn_kernels.mdn.chunk import recompute_pairs_mode
        print(f"B={B} T={T} H={H} K={K} V={V} {dtype}  flags "
              f"{ {k: v for k, v in os.environ.items() if k.startswith('MDN_')} }  "
              f"MDN_RECOMPUTE_PAIRS in effect: {recompute_pairs_mode()}")
        print("\nsaved for backward (dedup by storage; inputs marked):")
        small = [r for r in res["saved"] if r[0] < MiB / 2]
        for n, shape, dt, inp, where in res["saved"]:
            if n < MiB / 2:
                continue
            tag = f"input {inp}" if inp else where
            print(f"  {n / MiB:9.2f} MiB  {str(shape):26s} {str(dt)[6:]:9s} {tag}")
        print(f"  {sum(r[0] for r in small) / MiB:9.2f} MiB  in {len(small)} tensors < 0.5 MiB")
        print(f"  total beyond inputs: {res['saved_bytes'] / MiB:.1f} MiB")
        print(f"held between forward and backward (all live storages after the forward but o: "
              f"saved tensors, tensors kept on ctx, final states): {held / MiB:.1f} MiB")
        for ph in ("forward", "backward"):
            peak, live = mode.peaks[ph]
            print(f"\npeak live in {ph}: {peak / MiB:.1f} MiB; tensors alive then (≥ 1 MiB):")
            for n, d in live:
                if n >= MiB:
                    print(f"  {n / MiB:9.2f} MiB  {d}")
        print(f"\nPEAK fwd+bwd (above inputs and do): "
              f"{max(res['peak_fwd'], res['peak_bwd']) / MiB:.1f} MiB")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8,4096,6,128,256", help="B,T,H,K,V")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default=None,
                    help="comma-separated MDN_RECOMPUTE_PAIRS modes to account one after the other "
                         "(default: the environment's, 1 when unset)")
    ap.add_argument("--cp", action="store_true",
                    help="the CP op at one rank (gloo), B = 1, as MDN_CP_EMULATE=1 runs it; "
                         "MDN_CP_LEAN and MDN_CP_LEAN_SEGMENT_TOKENS pick its node")
    args = ap.parse_args()
    B, T, H, K, V = (int(x) for x in args.shape.split(","))
    stub_triton_launches()
    modes = args.modes.split(",") if args.modes else [None]
    summary = []
    for m in modes:
        if m is not None:
            os.environ["MDN_RECOMPUTE_PAIRS"] = m
            print(f"\n===== MDN_RECOMPUTE_PAIRS={m} =====")
        torch.manual_seed(0)
        r = account(B, T, H, K, V, getattr(torch, args.dtype), cp=args.cp)
        summary.append((m, r))
    if len(summary) > 1:
        print("\nmode  held fwd→bwd  peak fwd  peak bwd  (MiB)")
        for m, r in summary:
            print(f"{m:>4}  {r['held_bytes'] / MiB:12.1f}  {r['peak_fwd'] / MiB:8.1f}  "
                  f"{r['peak_bwd'] / MiB:8.1f}")


if __name__ == "__main__":
    main()
