"""The CP op alone on the GPU with the model's dtypes (bf16 q, k, v; fp32 gates): CP = R against
the float64 op on the whole sequence, beside the same-dtype op without CP (CP = 1), forward and
every input gradient. The whole-model CP step gave wrong gradients on some H100 machines and
right ones on others, with the same code (BENCHMARKS.md, session 6); this isolates the op's CP
kernels (group maps, tree walks, the state passes with initial pairs and the INIT_ONLY reverse
pass) so they can run under compute-sanitizer in one process:

    python tools/check_cp_kernels_gpu.py --K 128 --V 256                      # world 1
    torchrun --nproc-per-node 2 tools/check_cp_kernels_gpu.py --K 256 --V 512   # CP = 2
    compute-sanitizer --tool memcheck python tools/check_cp_kernels_gpu.py --T 1024 --H 1 --dist-backend gloo
    torchrun --nproc-per-node 2 tools/check_cp_kernels_gpu.py --dist-backend gloo   # 2 ranks, 1 GPU

--group-chunks small splits each rank's tokens into several groups (the tree and the INIT_ONLY
pass run even at world 1). Runs on CPU too (gloo, TRITON_INTERPRET=1, small shapes). Prints one
`RESULT {json}` line on rank 0: per tensor, the relative error of CP and of CP = 1 against
float64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdn_kernels import mdn_chunk  # noqa: E402
from mdn_kernels.cp import mdn_chunk_cp  # noqa: E402
from mdn_kernels.mdn.testing import patch_interpreter_bf16_dot, random_inputs  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter_bf16_dot()   # on CPU: the interpreter's bf16 dot is wrong without it

NAMES = ("o", "dq", "dk", "dv", "dlog_alpha", "dlog_mu", "dbeta", "deta")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fwd_bwd(fn, xs, do):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    o, _ = fn(leaves)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("T", 8192), ("H", 6), ("K", 128), ("V", 256), ("C", 64)):
        ap.add_argument(f"--{name}", type=int, default=default, help=f"{name} (T: whole sequence)")
    ap.add_argument("--group-chunks", type=int, default=None,
                    help="chunks per serial group (default: the op's, ~16·K tokens)")
    ap.add_argument("--docs", default=None,
                    help="document starts in the whole sequence (packed documents; '' for one); "
                         "default 0,3000,5000,5001 at T = 8192, scaled to T")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dist-backend", choices=("nccl", "gloo"), default=None,
                    help="process group (default: nccl on CUDA, gloo on CPU); gloo on CUDA keeps "
                         "NCCL out of a compute-sanitizer run (its init hung there in session 6)")
    ap.add_argument("--no-wgmma", action="append", default=None, metavar="GROUPS",
                    help="an MDN_NO_WGMMA value (kernel groups compiled without Hopper's wgmma, "
                         "mdn_kernels.mdn.wgmma); repeat it to run the CP op once per value in "
                         "one process, one RESULT line each (default: the environment's)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:   # one process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # more ranks than GPUs share them (gloo only: NCCL refuses two ranks on one GPU), so one GPU
    # can run the CP = 2 check: its numbers, not its speed, are what this script measures
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    backend = args.dist_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise SystemExit("--dist-backend nccl needs CUDA")
    dist.init_process_group(backend, rank=rank, world_size=world,
                            **({"device_id": dev} if backend == "nccl" else {}))
    T, H, K, V = args.T, args.H, args.K, args.V
    if T % world:
        raise SystemExit(f"--T {T} must divide by the world size {world}")
    if args.docs is None:   # the op GPU test's documents (tests/gpu/test_cp_gpu.py), scaled
        b = T * 5000 // 8192
        args.docs = ",".join(str(x) for x in sorted({0, T * 3000 // 8192, b, b + 1}) if x < T)
    starts = [int(s) for s in args.docs.split(",") if s.strip()] or [0]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= T:
        raise SystemExit(f"--docs must start at 0 and increase below T = {T}, got {args.docs!r}")
    cu = torch.tensor(starts + [T], dtype=torch.int32, device=dev)

    xs = random_inputs(1, T, H, K, V, dtype=torch.float32, seed=args.seed)
    xs = [x.to(torch.bfloat16) if i < 3 else x for i, x in enumerate(xs)]   # the model's dtypes
    do = torch.randn(1, T, H, V, generator=torch.Generator().manual_seed(args.seed + 1))
    do = do.to(torch.bfloat16)
    xs, do = [x.to(dev) for x in xs], do.to(dev)
    n = T // world
    sl = slice(rank * n, (rank + 1) * n)
    kw = dict(use_qk_l2norm=True, chunk_size=args.C)
    cp1 = ref = None
    if rank == 0:   # the references, with the environment's MDN_NO_WGMMA
        cp1 = fwd_bwd(lambda x: mdn_chunk(*x, cu_seqlens=cu, backend="triton", **kw), xs, do)
        ref = fwd_bwd(lambda x: mdn_chunk(*x, cu_seqlens=cu, backend="torch", **kw),
                      [x.double() for x in xs], do.double())
    results = []
    for choice in args.no_wgmma or [None]:
        if choice is not None:
            os.environ["MDN_NO_WGMMA"] = choice
        cp = fwd_bwd(lambda x: mdn_chunk_cp(*x, scale=None, initial_state=None, output_final_state=False,
                                            cu_seqlens=cu, p_times_alpha=True, cp_group=dist.group.WORLD,
                                            backend="triton", group_chunks=args.group_chunks, **kw),
                     [x[:, sl] for x in xs], do[:, sl].contiguous())
        parts = []
        for t in cp:   # every rank's slice → the whole sequence (dim 1)
            got = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(got, t.contiguous())
            parts.append(torch.cat(got, 1))
        if rank == 0:
            result = dict(world=world, T=T, H=H, K=K, V=V, C=args.C, group_chunks=args.group_chunks,
                          docs=starts, device=torch.cuda.get_device_name(dev) if cuda else "cpu",
                          no_wgmma=os.environ.get("MDN_NO_WGMMA", "default"),
                          errors={name: dict(cp=rel(a, r), cp1=rel(b, r),
                                             nonfinite=int((~torch.isfinite(a)).sum()))
                                  for name, a, b, r in zip(NAMES, parts, cp1, ref)})
            print("RESULT " + json.dumps(result), flush=True)
            results.append(result)
    dist.barrier()
    dist.destroy_process_group()
    return results   # rank 0: one result per --no-wgmma choice; other ranks: []


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
