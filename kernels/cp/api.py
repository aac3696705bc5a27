"""`mdn_chunk(..., cp_group=group)`: MDN with the sequence split over a context-parallel group.

Contract (DESIGN §5, §8). Rank r of R passes tokens [r·T, (r+1)·T) of the sequence(s) and gets
the matching slice of the CP = 1 output.

* Without cu_seqlens: each of the B rows is one sequence split over the ranks.
* With cu_seqlens: the offsets are GLOBAL (over all R·T tokens, the same tensor on every rank)
  and B == 1. A document that spans ranks continues; one that starts inside a rank (or exactly
  at its first token) starts from its own initial state.
* initial_state (S0, M0), each [N, H, K, V] (N = B, or the number of global documents): the
  state entering each global sequence. Pass the same value on every rank (or None on every
  rank). Only the rank where a sequence starts reads its row (rank 0 for batched rows); its
  gradient appears there and is zero on the other ranks, so a sum over the CP group gives the
  CP = 1 gradient.
* final state (output_final_state=True): [N, H, K, V] on every rank; row n holds sequence n's
  final pair on the rank where sequence n ends (the last rank for batched rows) and zeros on the
  others, so a sum over the group gives the CP = 1 final state. Gradients on the zero rows are
  ignored.
* cp_mode: "allgather" (default; one all-gather of per-rank affine maps, ranks work in
  parallel) or "ring" (point-to-point relay, ranks' state passes run one after another).

Before it works, the op all-gathers a few integers (shapes, flags, a checksum of cu_seqlens) so
that ranks that disagree fail with a message instead of hanging or returning garbage. By default
(MDN_CP_AGREE=once) that happens once per cu_seqlens tensor and set of fields: the layers of a
micro-batch pass the same tensor, so one agreement per micro-batch, and a call whose fields
differ from every set agreed for that tensor agrees again. Every rank of a correct program makes
the same calls, so all ranks skip or agree together; a rank whose inputs diverge mid-micro-batch
then waits in the agreement while the others go on (a hang until the collective times out)
instead of every rank raising. MDN_CP_AGREE=every agrees at every call (use it to debug such a
hang); batched inputs (no cu_seqlens) agree at every call in either mode. Every call costs a
rendezvous of every rank's host per layer call: on 4 H200s the 400M step at 64K tokens took
704.7 ms with it against 629.9 ms once per micro-batch (BENCHMARKS.md, session 18), which is
why 'once' is the default.
"""
from __future__ import annotations

import os
from contextlib import nullcontext as _nullcontext

import torch
import torch.distributed as dist

from mdn_kernels.mdn.api import check_cu_seqlens, check_initial_state, validate_inputs
from mdn_kernels.mdn.chunk import chunk_mdn
from mdn_kernels.mdn.layout import PerTensorCache, device_copy_of_host, host_cu_seqlens

from .layout import batched_view, packed_view
from .state_pass_cp import CPStateOutput, CPStatePass

CP_MODES = ("allgather", "ring")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every rank must agree on, in the order of the agreement vector.
_FIELDS = ("local validation (see that rank's error)", "B (batch)", "T (tokens per rank)",
           "H (heads)", "K (key dim)", "V (value dim)", "dtype", "number of sequences N",
           "initial_state given", "output_final_state", "chunk_size", "cp_mode", "backend",
           "use_qk_l2norm", "p_times_alpha", "cu_seqlens checksum", "scale (×1e6)")


def check_cp_group(cp_group) -> tuple[int, int]:
    """(rank, world size) of this process in cp_group; ValueError if it cannot be used."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_group given but torch.distributed is not initialized")
    if cp_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of cp_group")
    if not isinstance(cp_group, dist.ProcessGroup):
        raise ValueError(f"cp_group must be a torch.distributed ProcessGroup, got {type(cp_group).__name__}")
    rank = dist.get_rank(cp_group)
    world = dist.get_world_size(cp_group)
    if rank < 0 or rank >= world:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of cp_group")
    return rank, world


def _local_checks(q, k, v, log_alpha, log_mu, beta, eta, initial_state, cu_seqlens, backend,
                  cp_mode, world):
    """Checks one rank can make alone. Returns (backend, N)."""
    if cp_mode not in CP_MODES:
        raise ValueError(f"cp_mode must be one of {CP_MODES}, got {cp_mode!r}")
    backend = validate_inputs(q, k, v, log_alpha, log_mu, beta, eta, None, None, backend)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else check_cu_seqlens(
        cu_seqlens, B, world * T, "GLOBAL offsets",
        f"holds GLOBAL offsets under context parallelism: it must start at 0 and end at "
        f"cp_size * T = {world} * {T} = {world * T}")
    check_initial_state(initial_state, (N, H, K, V), "[N, H, K, V] (N = global sequences)",
                        k.device)
    return backend, N


_SIDE: dict = {}
_VIEWS = PerTensorCache()


def _cu_checksum(cu_seqlens) -> int:
    c = host_cu_seqlens(cu_seqlens)
    return int((c * torch.arange(1, c.numel() + 1)).sum() % (2 ** 61 - 1))


def _local_view(cu_seqlens, T: int, rank: int, world: int, device):
    """(CPLocalView, its local offsets on `device` or None) of GLOBAL offsets, made once per
    cu_seqlens tensor (PerTensorCache): every layer passes the same tensor. Made per call, the
    host copy of a device cu_seqlens, the local offsets' copy back to the device and the layout
    the op then builds from that fresh tensor (another host copy) each waited for the GPU queue
    to drain: four host syncs per layer and forward, which kept the host from running ahead of
    the GPU (session 9: the whole-model CP step, BENCHMARKS.md). Read-only, shared."""
    def build():
        view = packed_view(host_cu_seqlens(cu_seqlens), T, rank, world)
        return view, (None if view.cu_local is None else device_copy_of_host(view.cu_local, device))
    return _VIEWS.get(cu_seqlens, (T, rank, world, str(device)), build)


def _side_stream(device):
    """One side stream per CUDA device for the agreement collective (nothing is queued on it
    but that collective and its copies)."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=key)
    return _SIDE[key]


def _agree(fields: list[int], device, group, rank: int, world: int, local_error):
    """All-gather the agreement vector and raise ValueError (on every rank) on any mismatch.

    One collective and one device→host copy. On CUDA both run on a side stream: the host then
    waits only for the other ranks to reach this call, not for the GPU work already queued on
    the current stream (a copy on the current stream would drain it on every call, so the host
    could never launch ahead of the GPU)."""
    side = _side_stream(device) if device.type == "cuda" else None
    with (torch.cuda.stream(side) if side is not None else _nullcontext()):
        mine = torch.tensor(fields, dtype=torch.int64).to(device, non_blocking=False)
        every = mine.new_empty(world * mine.numel())
        dist.all_gather_into_tensor(every, mine, group=group)
        every = every.view(world, -1).tolist()
    bad = [r for r in range(world) if every[r][0] != 0]
    if bad:
        if local_error is not None:
            raise local_error
        raise ValueError(f"mdn_chunk under context parallelism: the inputs of cp_group rank(s) "
                         f"{bad} are invalid (see the error raised there)")
    for i, name in enumerate(_FIELDS[1:], start=1):
        col = [row[i] for row in every]
        if any(c != col[0] for c in col):
            j = next(j for j, c in enumerate(col) if c != col[0])
            raise ValueError(f"cp_group ranks disagree on {name}: rank 0 has {col[0]}, "
                             f"rank {j} has {col[j]} (this is rank {rank} of {world})")


# Entries go when their tensor is freed; never emptied wholesale (PerTensorCache's max_entries),
# since ranks whose caches emptied at different moments would disagree on whether to agree.
_AGREED = PerTensorCache(max_entries=1 << 20)


def agree_mode() -> str:
    """MDN_CP_AGREE: 'once' (default) agrees on the inputs once per cu_seqlens tensor and set of
    fields, 'every' at every call (module docstring)."""
    env = os.environ.get("MDN_CP_AGREE", "once")
    if env not in ("every", "once"):
        raise ValueError(f"MDN_CP_AGREE must be 'every' or 'once', got {env!r}")
    return env


def cp_lean() -> bool:
    """MDN_CP_LEAN=1: the all-gather mode runs the lean node (state_pass_cp.CPStateOutput: the
    per-chunk pairs recomputed in the backward instead of kept, as MDN_RECOMPUTE_PAIRS=1 without
    CP) where the lean path applies (fused 16-bit chunk-local kernels, Triton). Default 0;
    equal to the default path on the CPU (tests/kernels/test_cp.py) and, on GPUs (session 10),
    to CP = 1's error against float64 (benchmarks/results/cp_kernels_lean_seg_v10.json). The
    trainer sets it from parallel.cp_lean."""
    env = os.environ.get("MDN_CP_LEAN", "0")
    if env not in ("0", "1"):
        raise ValueError(f"MDN_CP_LEAN must be 0 or 1, got {env!r}")
    return env == "1"


def mdn_chunk_cp(q, k, v, log_alpha, log_mu, beta, eta, *, scale, initial_state,
                 output_final_state, cu_seqlens, use_qk_l2norm, p_times_alpha, cp_group,
                 cp_mode="allgather", backend="auto", chunk_size=64, group_chunks=None):
    """See the module docstring; shapes as mdn_kernels.mdn_chunk with T = tokens per rank."""
    rank, world = check_cp_group(cp_group)
    local_error = None
    N = -1
    try:
        backend, N = _local_checks(q, k, v, log_alpha, log_mu, beta, eta, initial_state,
                                   cu_seqlens, backend, cp_mode, world)
        if backend == "triton" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
            raise ValueError(f"chunk_size must be a power of two >= 16 for the triton backend, got {chunk_size}")
    except ValueError as e:
        local_error = e
    if local_error is None:
        B, T, H, K = k.shape
        cs = 0 if cu_seqlens is None else _cu_checksum(cu_seqlens)
        fields = [0, B, T, H, K, v.shape[-1], _DTYPES.index(v.dtype), N,
                  int(initial_state is not None), int(bool(output_final_state)), chunk_size,
                  CP_MODES.index(cp_mode), ("torch", "triton").index(backend),
                  int(bool(use_qk_l2norm)), int(bool(p_times_alpha)), cs,
                  round((scale if scale is not None else K ** -0.5) * 1e6)]
    else:
        fields = [1] + [-1] * (len(_FIELDS) - 1)
    device = k.device if isinstance(k, torch.Tensor) else torch.device("cpu")
    if dist.get_backend(cp_group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if local_error is None and cu_seqlens is not None and agree_mode() == "once":
        # stored only once the agreement returned (it raises on disagreement): a hit means every
        # rank agreed on exactly these fields for this tensor
        _AGREED.get(cu_seqlens, (id(cp_group), world) + tuple(fields),
                    lambda: _agree(fields, device, cp_group, rank, world, local_error) or True)
    else:
        _agree(fields, device, cp_group, rank, world, local_error)

    B, T, H, K = k.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if cu_seqlens is None:
        view, cu_local = batched_view(B, T, rank, world), None
    else:
        view, cu_local = _local_view(cu_seqlens, T, rank, world, k.device)

    # Initial pairs of the local sequences: a sequence that starts here reads its global row;
    # carried-in rows are placeholders (CPStatePass fills them and gives them zero gradient).
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    if initial_state is None:   # (no index tensors then: a host→device copy waits for the stream)
        init = None
    else:
        rows = torch.tensor([max(i, 0) for i in view.init_rows], dtype=torch.int64, device=k.device)
        starts_here = torch.tensor([i >= 0 for i in view.init_rows], device=k.device)
        keep = starts_here.to(cdt)[:, None, None, None]
        init = tuple(s.to(cdt)[rows] * keep for s in initial_state)

    def state_pass(U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout, be, allow_tf32):
        return CPStatePass.apply(U, Y, Z, Kg, Km, a_end, g_end, u_end, S_init, M_init, layout,
                                 be, allow_tf32, view, cp_group, cp_mode, group_chunks)

    state_output = None
    if cp_mode == "allgather" and cp_lean():
        def state_output(*args):
            return CPStateOutput.apply(*args, view, cp_group, group_chunks)

    o, fin = chunk_mdn(q, k, v, log_alpha, log_mu, beta, eta, scale=scale, initial_state=init,
                       output_final_state=output_final_state, cu_seqlens=cu_local,
                       use_qk_l2norm=use_qk_l2norm, p_times_alpha=p_times_alpha, backend=backend,
                       chunk_size=chunk_size, state_pass=state_pass, state_output=state_output)
    if not output_final_state:
        return o, None
    # Local finals → global rows: rows of sequences that end on this rank, zeros elsewhere.
    dest = [(i, n) for i, n in enumerate(view.final_rows) if n >= 0]
    out = []
    for t in fin:
        g = t.new_zeros((view.num_global,) + tuple(t.shape[1:]))
        if dest:
            src = torch.tensor([i for i, _ in dest], dtype=torch.int64, device=t.device)
            dst = torch.tensor([n for _, n in dest], dtype=torch.int64, device=t.device)
            g = g.index_put((dst,), t[src])
        out.append(g)
    return o, tuple(out)
