"""GPU benchmark of context parallelism for the MDN op (issue 3; DESIGN §5, §9).

Run on the GPU machine with NCCL, once per world size:

    torchrun --nproc-per-node 1 tools/bench_cp.py --out benchmarks/results/cp_r1.json
    torchrun --nproc-per-node 2 tools/bench_cp.py --out benchmarks/results/cp_r2.json
    torchrun --nproc-per-node 4 tools/bench_cp.py --out benchmarks/results/cp_r4.json

Measures, with the CP group = all ranks (R = world size):
  exact   CP = R against CP = 1 at a real shape, in the benchmark dtype (bf16): relative error of
          the output and of every input gradient, next to the error of CP = 1 itself against an
          fp32 run of the same op (so the CP difference can be read against the op's rounding).
  weak    --weak-tokens per GPU (32K): op forward+backward at CP = 1 on one GPU's tokens and at
          CP = R per rank, for every --modes; efficiency t(CP = 1) / t(CP = R).
  strong  --strong-tokens in total (128K): CP = 1 on all of them (each rank alone) and CP = R.
  memory  per-rank peak CUDA memory of one forward+backward (above the inputs), in every timed
          configuration.
  fla     (--fla-peer) FLA's CP GDN (fla.ops.cp) at the weak-scaling shape, same run, if
          importable.
  profile (--profile PATH) torch.profiler of --profile-steps forward+backward steps at the weak
          shape, CP = 1 and CP = R per mode: rank 0 writes, per run, the top 30 kernels/ops by
          self CUDA time, the CPU-side totals, kernel launches and wall time per step, and every
          rank's wall and GPU-busy time per step (a slow rank holds the collectives).
Timing: the median of triton.testing.do_bench for runs without communication; runs with
collectives use the same method (L2 flush, warm-up and repeat counts from a 5-call estimate) with
the counts agreed across ranks (max of the estimates), since per-rank counts would deadlock.

Results go to --out as JSON (rank 0): card, torch / triton versions, command, date, R, results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:  # tools/profiling.py (also when imported by the tests)
    sys.path.append(TOOLS)

SECTIONS = ("exact", "weak", "strong", "fla")
SMOKE = False   # --cpu-smoke: CPU tensors, gloo, the torch backend, a wall-clock timer


def device() -> torch.device:
    return torch.device("cpu") if SMOKE else torch.device("cuda")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON path (written by rank 0)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dk", type=int, default=128)
    p.add_argument("--dv", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--weak-tokens", type=int, default=32768, help="tokens per GPU (weak scaling)")
    p.add_argument("--strong-tokens", type=int, default=131072, help="total tokens (strong scaling)")
    p.add_argument("--exact-tokens", type=int, default=32768, help="total tokens of the exactness check")
    p.add_argument("--modes", default="allgather,ring", help="comma-separated cp_modes to time")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--fla-peer", action="store_true", help="also time FLA's CP GDN (needs fla)")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repeat time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="also profile the weak-scaling step (CP = 1 and every mode) with "
                        "torch.profiler and write the tables to PATH (rank 0)")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per run")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script's logic on CPU (gloo, torch backend, wall-clock timer, "
                        "no memory figures): use tiny shapes; the numbers mean nothing")
    p.add_argument("--count", default=None, metavar="PATH",
                   help="with --cpu-smoke: count aten ops, Triton launches and FLOPs per rank "
                        "and category (CP = 1 and CP = R per mode, one forward+backward at the "
                        "weak shape) and write a table to PATH (+ .json beside it)")
    p.add_argument("--count-backend", choices=("torch", "triton"), default="torch",
                   help="backend of --count (triton: under TRITON_INTERPRET=1)")
    p.add_argument("--count-group-chunks", type=int, default=None,
                   help="--count: chunks per group of the CP state pass (default: the op's)")
    a = p.parse_args(argv)
    a.modes = [m for m in a.modes.split(",") if m]
    a.skip = {s for s in a.skip.split(",") if s}
    from mdn_kernels.cp import CP_MODES
    bad = [m for m in a.modes if m not in CP_MODES]
    if bad:
        p.error(f"--modes: unknown cp_mode(s) {bad}; choose from {CP_MODES}")
    bad = sorted(a.skip - set(SECTIONS))
    if bad:
        p.error(f"--skip: unknown section(s) {bad}; choose from {SECTIONS}")
    for name in ("heads", "dk", "dv", "chunk_size", "weak_tokens", "strong_tokens", "exact_tokens",
                 "profile_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return a


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------

def init_distributed():
    if "RANK" not in os.environ:  # plain `python tools/bench_cp.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if SMOKE:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return dist.get_rank(), dist.get_world_size()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(total_tokens, a, dtype, seed):
    """Global inputs [1, total, H, ·], identical on every rank (seeded), on this GPU."""
    from mdn_kernels.mdn.testing import layer_like_gates
    dev = device()
    g = torch.Generator(device=dev).manual_seed(seed)
    H, K, V = a.heads, a.dk, a.dv
    q = torch.randn(1, total_tokens, H, K, device=dev, generator=g)
    k = torch.randn(1, total_tokens, H, K, device=dev, generator=g)
    v = torch.randn(1, total_tokens, H, V, device=dev, generator=g)
    gates = layer_like_gates(1, total_tokens, H, generator=torch.Generator().manual_seed(seed))
    xs = [q, k, v, *(t.to(dev) for t in gates)]
    do = torch.randn(1, total_tokens, H, V, device=dev, generator=g)
    return [x.to(dtype) for x in xs], do.to(dtype)


def local_slice(xs, rank, n):
    return [x[:, rank * n:(rank + 1) * n].clone() for x in xs]  # own storage: the global tensors can go


def fwd_bwd(xs, do, a, group=None, mode="allgather"):
    """A closure: one forward+backward of the op; returns (o, grads) when called."""
    from mdn_kernels import mdn_chunk
    leaves = [x.detach().requires_grad_() for x in xs]

    def step():
        for t in leaves:
            t.grad = None
        o, _ = mdn_chunk(*leaves, cp_group=group, cp_mode=mode,
                         backend="torch" if SMOKE else "triton",
                         chunk_size=a.chunk_size)
        o.backward(do)
        return o.detach(), [t.grad for t in leaves]
    return step


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def _flush_buffer():
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")


def bench_collective(fn, warmup_ms, rep_ms, group=None):
    """do_bench's method, with warm-up/repeat counts agreed across the ranks of `group`.

    Returns this rank's median in ms."""
    if SMOKE:
        return _wall_median(fn)
    fn()
    torch.cuda.synchronize()
    cache = _flush_buffer()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = torch.tensor([start.elapsed_time(end) / 5], device="cuda")
    dist.all_reduce(est, op=dist.ReduceOp.MAX, group=group)
    est = max(float(est.item()), 1e-3)
    n_warmup, n_repeat = max(1, int(warmup_ms / est)), max(1, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for _ in range(n_warmup):
        fn()
    for i in range(n_repeat):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _wall_median(fn, n=3):
    import time
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_local(fn, a):
    if SMOKE:
        return _wall_median(fn)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=a.warmup, rep=a.rep, return_mode="median")


def peak_memory(fn):
    """Peak CUDA memory of one call above what was allocated before it (bytes)."""
    if SMOKE:
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gather_floats(x: float, world: int) -> list[float]:
    t = torch.tensor([x], dtype=torch.float64, device=device())
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]


def timed(fn, a, world, collective: bool):
    """{median_ms per rank, max over ranks, peak memory per rank}."""
    ms = bench_collective(fn, a.warmup, a.rep) if collective else bench_local(fn, a)
    mem = peak_memory(fn)
    per_rank = gather_floats(ms, world)
    return {"median_ms_per_rank": per_rank, "median_ms": max(per_rank),
            "peak_mem_bytes_per_rank": [int(m) for m in gather_floats(float(mem), world)]}


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------

def sq_err_and_norm(a, b):
    a, b = a.double(), b.double()
    return torch.stack([((a - b) ** 2).sum(), (b ** 2).sum()])


def global_rel(parts):
    """parts: [2] tensor (sum of squared error, squared norm) on this rank → global relative error."""
    dist.all_reduce(parts)
    return float((parts[0] / parts[1].clamp_min(1e-300)).sqrt().item())


def section_exact(a, rank, world, dtype):
    T = a.exact_tokens
    if T % world:
        raise SystemExit(f"--exact-tokens {T} must be divisible by the world size {world}")
    n = T // world
    xs, do = make_inputs(T, a, dtype, a.seed)
    names = ["o", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta"]
    o1, g1 = fwd_bwd(xs, do, a)()                              # CP = 1, benchmark dtype
    o32, g32 = fwd_bwd([x.float() for x in xs], do.float(), a)()  # CP = 1, fp32 (ieee state pass)
    sl = slice(rank * n, (rank + 1) * n)
    out = {"tokens": T, "tokens_per_rank": n, "dtype": a.dtype}
    for mode in a.modes:
        oR, gR = fwd_bwd(local_slice(xs, rank, n), do[:, sl].contiguous(), a, dist.group.WORLD, mode)()
        res = {}
        for name, x, y, z in zip(names, [oR] + gR, [o1] + g1, [o32] + g32):
            res[name] = {
                "cp_vs_cp1": global_rel(sq_err_and_norm(x, y[:, sl])),
                "cp1_vs_fp32": global_rel(sq_err_and_norm(y[:, sl], z[:, sl])),
                "cp_vs_fp32": global_rel(sq_err_and_norm(x, z[:, sl])),
            }
        out[mode] = res
    return out


def section_scaling(a, rank, world, dtype, tokens_per_rank, label):
    total = tokens_per_rank * world
    xs, do = make_inputs(total, a, dtype, a.seed + 1)
    mine = local_slice(xs, rank, tokens_per_rank)
    do_mine = do[:, rank * tokens_per_rank:(rank + 1) * tokens_per_rank].contiguous()
    out = {"tokens_total": total, "tokens_per_rank": tokens_per_rank}
    cp1_inputs = (mine, do_mine) if label == "weak" else (xs, do)
    # weak: CP = 1 on this rank's own tokens (no communication); strong: all the tokens, each
    # rank alone. The default CP = 1 path (MDN_RECOMPUTE_PAIRS=1) runs the serial state pass
    # twice; the CP path runs StatePass + LocalOutput (mode 0's) on group-parallel scans, so
    # CP = 1 is also timed under mode 0: efficiency_vs_mode0 compares like with like.
    out["cp1"] = timed(fwd_bwd(*cp1_inputs, a), a, world, collective=False)
    saved_mode = os.environ.get("MDN_RECOMPUTE_PAIRS")
    os.environ["MDN_RECOMPUTE_PAIRS"] = "0"
    try:
        out["cp1_mode0"] = timed(fwd_bwd(*cp1_inputs, a), a, world, collective=False)
    finally:
        if saved_mode is None:
            os.environ.pop("MDN_RECOMPUTE_PAIRS")
        else:
            os.environ["MDN_RECOMPUTE_PAIRS"] = saved_mode
    del xs, do
    if not SMOKE:
        torch.cuda.empty_cache()
    for mode in a.modes:
        r = timed(fwd_bwd(mine, do_mine, a, dist.group.WORLD, mode), a, world, collective=True)
        r["efficiency"] = out["cp1"]["median_ms"] / r["median_ms"]
        r["efficiency_vs_mode0"] = out["cp1_mode0"]["median_ms"] / r["median_ms"]
        if label == "strong":
            r["speedup"] = r["efficiency"]
            r["efficiency"] = r["speedup"] / world
            r["speedup_vs_mode0"] = r["efficiency_vs_mode0"]
            r["efficiency_vs_mode0"] = r["speedup_vs_mode0"] / world
        out[mode] = r
    return out


def section_fla(a, rank, world, dtype, use_cp: bool, cp1_ms=None):
    """FLA's GDN on one rank's tokens without CP (use_cp False) or over the group with its CP
    (fla.ops.cp), weak-scaling shape: the peer of DESIGN §9. Two sections, so the first is saved
    before the second starts: FLA autotunes on its first call of each shape (minutes on a fresh
    machine), and a device call's limit must not take both numbers."""
    try:
        import torch.nn.functional as F
        from fla.ops.cp import build_cp_context
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - report why the peer is missing, keep the run
        return {"error": f"fla not importable: {e!r}"}
    from fla_peer import lift_fla_guard
    guard = lift_fla_guard()  # timing only (tools/fla_peer.py); the session-3 run was refused by it
    n = a.weak_tokens
    total = n * world
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(a.seed + 2)
    H, K, V = a.heads, a.dk, a.dv
    q = F.normalize(torch.randn(1, total, H, K, device=dev, generator=g), dim=-1).to(dtype)
    k = F.normalize(torch.randn(1, total, H, K, device=dev, generator=g), dim=-1).to(dtype)
    v = torch.randn(1, total, H, V, device=dev, generator=g).to(dtype)
    gate = F.logsigmoid(torch.randn(1, total, H, device=dev, generator=g)).to(dtype)
    beta = torch.sigmoid(torch.randn(1, total, H, device=dev, generator=g)).to(dtype)
    do = torch.randn(1, total, H, V, device=dev, generator=g).to(dtype)
    sl = slice(rank * n, (rank + 1) * n)

    def make(ctx):
        leaves = [t[:, sl].contiguous().requires_grad_() for t in (q, k, v, gate, beta)]

        def step():
            for t in leaves:
                t.grad = None
            kw = {"cp_context": ctx} if ctx is not None else {}
            o, _ = chunk_gated_delta_rule(*leaves, **kw)
            o.backward(do[:, sl])
        return step
    out = {}
    try:
        ctx = None
        if use_cp:
            cu = torch.tensor([0, total], dtype=torch.long, device=dev)
            ctx = build_cp_context(cu, group=dist.group.WORLD)
        step = make(ctx)
        t0 = time.perf_counter()
        step()  # the first call autotunes; its time says where a slow run's time went
        torch.cuda.synchronize()
        out["first_call_s"] = time.perf_counter() - t0
        if rank == 0:
            print(f"[bench_cp] FLA GDN {'CP' if use_cp else 'without CP'}: first call "
                  f"{out['first_call_s']:.1f} s", flush=True)
        out.update(timed(step, a, world, collective=use_cp))
        if use_cp and cp1_ms:
            out["efficiency"] = cp1_ms / out["median_ms"]
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)
    out.update(guard)
    return out


def _sync():
    if not SMOKE:
        torch.cuda.synchronize()


def _profile_one(fn, steps):
    """(profiler, wall ms per step) of `steps` calls after 2 warm-up calls."""
    from profiling import profile_steps
    for _ in range(2):
        fn()
    _sync()
    dist.barrier()
    return profile_steps(fn, steps, cuda=not SMOKE)


def _profile_summary(prof, steps):
    """Per step: GPU-busy ms (sum of kernel/memcpy self time), device events (kernel launches,
    copies, collectives), self CPU ms of the ops (tools/profiling.py)."""
    from profiling import profile_summary
    return profile_summary(prof, steps)


def section_profile(a, rank, world, dtype, path):
    n = a.weak_tokens
    xs, do = make_inputs(n * world, a, dtype, a.seed + 1)
    mine = local_slice(xs, rank, n)
    do_mine = do[:, rank * n:(rank + 1) * n].contiguous()
    del xs, do
    runs = [("CP=1 (this rank's tokens alone)", fwd_bwd(mine, do_mine, a))]
    runs += [(f"CP={world} {mode}", fwd_bwd(mine, do_mine, a, dist.group.WORLD, mode))
             for mode in a.modes]
    steps = a.profile_steps
    sort = "self_cpu_time_total" if SMOKE else "self_cuda_time_total"
    text = [f"tools/bench_cp.py --profile: weak shape, {n} tokens per rank, H={a.heads} K={a.dk} "
            f"V={a.dv} C={a.chunk_size} {a.dtype}, world {world}; {steps} steps per run, "
            f"times per step; tables of rank 0 (totals over the {steps} steps)\n"]
    summary = {}
    for name, fn in runs:
        prof, wall = _profile_one(fn, steps)
        s = _profile_summary(prof, steps)
        s["wall_ms"] = wall
        per_rank = {k: gather_floats(v, world) for k, v in s.items()}
        summary[name] = per_rank
        if rank == 0:
            text.append("=" * 100)
            text.append(name)
            for k, v in per_rank.items():
                text.append(f"  {k:>15} per step, per rank: " + ", ".join(f"{x:.3f}" for x in v))
            text.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(text) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# count (CPU): host-side op counts and FLOPs per rank, by where in kernels/ they come from
# ---------------------------------------------------------------------------------------------
#
# `--count PATH` (with --cpu-smoke, under torchrun with R processes, gloo): one forward+backward
# of the op at CP = 1 (this rank's tokens alone) and at CP = R per mode, under a
# TorchDispatchMode that counts every aten op (each is one host dispatch, and on CUDA mostly
# one kernel launch) and the FLOPs of the matrix products, attributed to the innermost function
# of kernels/ on the Python stack ("file:function"; "autograd" when none: derivatives of torch
# ops). Triton launches are counted too (backend "triton" under TRITON_INTERPRET=1: the same
# launches the GPU makes; their FLOPs are not visible, use backend "torch" for FLOPs). Ops that
# read a device value on the host (item, nonzero, is_nonzero, equal) are listed as host syncs.

_MM_OPS = {"mm": 0, "bmm": 0, "addmm": 1, "baddbmm": 1}
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item")


def _category():
    """The innermost frame of the kernels package on the stack, as 'file:function'."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename.replace(os.sep, "/")
        if "/kernels/" in fn and "/site-packages/" not in fn:
            return fn.rsplit("/", 1)[-1][:-3] + ":" + f.f_code.co_name
        f = f.f_back
    return "autograd"


def _mm_flops(name, args, out):
    """2·m·n·k (× batch) of a matrix product; 0 for anything else."""
    if name not in _MM_OPS:
        return 0
    a = args[_MM_OPS[name]]
    return 2 * out.numel() * a.shape[-1]


class OpCounter:
    """Counts aten ops (and Triton launches) per (phase, category); FLOPs of the products."""

    def __init__(self):
        from collections import defaultdict
        self.ops = defaultdict(int)
        self.flops = defaultdict(int)
        self.launches = defaultdict(int)
        self.syncs = defaultdict(int)
        self.phase = "fwd"
        self.in_kernel = False   # inside an interpreted Triton launch: its host work is not counted

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if counter.in_kernel:
                    return out
                name = func.overloadpacket.__name__
                if name in ("detach", "alias", "view", "_unsafe_view", "as_strided",
                            "t", "transpose", "expand", "slice", "select", "unsqueeze",
                            "squeeze", "permute", "split", "split_with_sizes", "unbind"):
                    return out  # views: no kernel launch
                key = (counter.phase, _category())
                counter.ops[key] += 1
                counter.flops[key] += _mm_flops(name, args, out)
                if name in _SYNC_OPS:
                    counter.syncs[key + (name,)] += 1
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        self._unpatch = self._patch_triton()
        return self

    def __exit__(self, *exc):
        self._unpatch()
        return self._mode.__exit__(*exc)

    def _patch_triton(self):
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except Exception:  # noqa: BLE001 - no Triton: nothing to count
            return lambda: None
        orig, counter = InterpretedFunction.run, self

        def run(fn_self, *args, **kwargs):
            counter.launches[(counter.phase, fn_self.fn.__name__)] += 1
            counter.in_kernel = True
            try:
                return orig(fn_self, *args, **kwargs)
            finally:
                counter.in_kernel = False
        InterpretedFunction.run = run

        def undo():
            InterpretedFunction.run = orig
        return undo

    def summary(self) -> dict:
        def total(d, phase):
            return sum(v for (p, *_), v in d.items() if p == phase)
        cats = sorted({c for _, c in self.ops})
        return {
            "aten_ops": {ph: total(self.ops, ph) for ph in ("fwd", "bwd")},
            "triton_launches": {ph: total(self.launches, ph) for ph in ("fwd", "bwd")},
            "mm_gflop": {ph: total(self.flops, ph) / 1e9 for ph in ("fwd", "bwd")},
            "host_syncs": {f"{p} {c} {n}": v for (p, c, n), v in sorted(self.syncs.items())},
            "by_category": {c: {"ops_fwd": self.ops.get(("fwd", c), 0),
                                "ops_bwd": self.ops.get(("bwd", c), 0),
                                "mflop_fwd": self.flops.get(("fwd", c), 0) / 1e6,
                                "mflop_bwd": self.flops.get(("bwd", c), 0) / 1e6} for c in cats},
            "triton_by_kernel": {f"{p} {k}": v for (p, k), v in sorted(self.launches.items())},
        }


def count_step(xs, do, a, backend, group=None, mode="allgather", group_chunks=None):
    """One forward+backward under an OpCounter (after one uncounted warm-up: plans, caches)."""
    from mdn_kernels import mdn_chunk
    from mdn_kernels.cp import mdn_chunk_cp

    def run(counter=None):
        leaves = [x.detach().requires_grad_() for x in xs]
        if group is None:
            o, _ = mdn_chunk(*leaves, backend=backend, chunk_size=a.chunk_size)
        else:
            o, _ = mdn_chunk_cp(*leaves, scale=None, initial_state=None, output_final_state=False,
                                cu_seqlens=None, use_qk_l2norm=True, p_times_alpha=True,
                                cp_group=group, cp_mode=mode, backend=backend,
                                chunk_size=a.chunk_size, group_chunks=group_chunks)
        if counter is not None:
            counter.phase = "bwd"
        o.backward(do)

    run()
    with OpCounter() as c:
        run(c)
    return c.summary()


def section_count(a, rank, world, path):
    """Op and launch counts, FLOPs per category, per rank (see OpCounter); writes JSON + text."""
    if "TRITON_INTERPRET" not in os.environ and a.count_backend == "triton":
        raise SystemExit("--count-backend triton on CPU needs TRITON_INTERPRET=1")
    n = a.weak_tokens
    dtype = torch.float32   # CPU: the fp32 torch path / the interpreted kernels
    xs, do = make_inputs(n * world, a, dtype, a.seed + 1)
    mine = local_slice(xs, rank, n)
    do_mine = do[:, rank * n:(rank + 1) * n].contiguous()
    gc = a.count_group_chunks
    runs = {"CP=1": count_step(mine, do_mine, a, a.count_backend)}
    for mode in a.modes:
        runs[f"CP={world} {mode}"] = count_step(mine, do_mine, a, a.count_backend,
                                                dist.group.WORLD, mode, gc)
    every = [None] * world
    dist.all_gather_object(every, runs)
    if rank != 0:
        return None
    chunks = -(-n // a.chunk_size)
    text = [f"tools/bench_cp.py --count: {n} tokens per rank ({chunks} chunks of {a.chunk_size}, "
            f"groups of {gc} chunks), H={a.heads} K={a.dk} V={a.dv}, fp32, backend "
            f"{a.count_backend}, world {world}; one forward+backward; per rank"]
    for name in runs:
        text.append("=" * 100)
        text.append(name)
        for key in ("aten_ops", "triton_launches", "mm_gflop"):
            text.append(f"  {key:>16} fwd / bwd per rank: " + ", ".join(
                f"{every[r][name][key]['fwd']:.4g} / {every[r][name][key]['bwd']:.4g}"
                for r in range(world)))
        syncs = [sum(every[r][name]["host_syncs"].values()) for r in range(world)]
        text.append(f"  {'host_syncs':>16} per rank: {syncs}  (rank 0: {every[0][name]['host_syncs']})")
        cats = sorted({c for r in range(world) for c in every[r][name]["by_category"]})
        text.append(f"  {'category':<44} " + " ".join(f"{'r' + str(r) + ' ops f/b':>13} {'MFLOP f/b':>15}"
                                                       for r in range(world)))
        for c in cats:
            cells = []
            for r in range(world):
                d = every[r][name]["by_category"].get(c, {"ops_fwd": 0, "ops_bwd": 0,
                                                          "mflop_fwd": 0, "mflop_bwd": 0})
                cells.append(f"{d['ops_fwd']:>6}/{d['ops_bwd']:<6} "
                             f"{d['mflop_fwd']:>7.3g}/{d['mflop_bwd']:<7.3g}")
            text.append(f"  {c[:44]:<44} " + " ".join(cells))
    body = "\n".join(text) + "\n"
    print(body)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(body)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"world": world, "tokens_per_rank": n, "backend": a.count_backend,
                   "group_chunks": gc, "per_rank": every}, f, indent=1)
    return {name: {"aten_ops_per_rank": [every[r][name]["aten_ops"] for r in range(world)]}
            for name in runs}


def main(argv=None):
    global SMOKE
    a = parse_args(argv)
    SMOKE = a.cpu_smoke
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench_cp.py needs CUDA GPUs and NCCL; run it on the GPU machine, e.g. "
                 "`torchrun --nproc-per-node 4 tools/bench_cp.py --out results.json`")
    rank, world = init_distributed()
    import triton
    dtype = DTYPES[a.dtype]
    for name, tokens in (("--weak-tokens", a.weak_tokens), ("--strong-tokens", a.strong_tokens // world)):
        if tokens % a.chunk_size:
            print(f"note: {name} gives {tokens} tokens per rank, not a multiple of the chunk size "
                  f"{a.chunk_size} (padded)", file=sys.stderr)
    if a.strong_tokens % world:
        sys.exit(f"--strong-tokens {a.strong_tokens} must be divisible by the world size {world}")
    results = {}

    def record():
        return {
            "benchmark": "mdn context parallelism (tools/bench_cp.py)",
            "card": "cpu (--cpu-smoke: numbers mean nothing)" if SMOKE else torch.cuda.get_device_name(),
            "num_gpus": world,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "command": (f"torchrun --nproc-per-node {world} " if "TORCHELASTIC_RUN_ID" in os.environ
                        else "python ") + " ".join(sys.argv),
            "torchrun_world": world,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shape": {"H": a.heads, "K": a.dk, "V": a.dv, "chunk_size": a.chunk_size,
                      "dtype": a.dtype},
            "timing": "median ms of do_bench (collective runs: do_bench's method with counts "
                      "agreed across ranks); forward+backward of one op",
            "results": results,
        }

    def run(name, fn, *args):
        """One section; rank 0 prints a progress line and rewrites the JSON after each, so a run
        cut short (a device call's limit) keeps the sections it finished."""
        t0 = time.perf_counter()
        if rank == 0:
            print(f"[bench_cp] {name}: started", flush=True)
        results[name] = fn(*args)
        if rank == 0:
            print(f"[bench_cp] {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(record(), f, indent=2)

    if "exact" not in a.skip:
        run("exact", section_exact, a, rank, world, dtype)
    if "weak" not in a.skip:
        run("weak", section_scaling, a, rank, world, dtype, a.weak_tokens, "weak")
    if "strong" not in a.skip:
        run("strong", section_scaling, a, rank, world, dtype, a.strong_tokens // world, "strong")
    if a.profile:
        run("profile", section_profile, a, rank, world, dtype, a.profile)
    if a.count:
        if not SMOKE:
            sys.exit("--count runs on CPU: add --cpu-smoke")
        run("count", section_count, a, rank, world, a.count)
    if a.fla_peer and "fla" not in a.skip and not SMOKE:
        run("fla_gdn_cp1", section_fla, a, rank, world, dtype, False)
        run("fla_gdn_cp", section_fla, a, rank, world, dtype, True,
            results["fla_gdn_cp1"].get("median_ms"))
    if rank == 0:
        print(json.dumps(record(), indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
