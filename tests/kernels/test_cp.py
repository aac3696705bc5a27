"""Context parallelism across real processes (gloo, CPU): CP = R must equal CP = 1.

One process group per world size R runs every case of that R (spawned once per module and R);
each rank saves its slice of the outputs and gradients, and the parent compares them with the
single-process op on the whole sequence: outputs and input gradients concatenated over ranks,
final states and initial-state gradients summed over ranks (DESIGN §8 conventions,
mdn_kernels.cp.api).
"""
from __future__ import annotations

import os
import socket
import tempfile
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mdn_kernels import mdn_chunk
from mdn_kernels.cp import conv_halo, mdn_chunk_cp
from mdn_kernels.mdn.testing import patch_interpreter_bf16_dot, random_inputs, tensors_on_ctx

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter_bf16_dot()   # also in the spawned workers, which import this module

TOL = 1e-5
LEAN_TOL = 1e-6   # the lean node against the default CP path: the same kernels, another graph
H, K, V, C = 2, 8, 16, 16
INPUTS = ["q", "k", "v", "log_alpha", "log_mu", "beta", "eta"]

FUSED = {"MDN_FUSED_LOCAL": "1"}


def fused_lean_cases(T: int, cu: list) -> dict:
    """The fused chunk-local kernels (fp32), and on the same inputs the opt-in lean node
    (MDN_CP_LEAN=1, state_pass_cp.CPStateOutput) and the same in segments of groups (one
    16-token chunk each), every chunk its own group."""
    case = lambda env: (1, T, cu, "allgather", "triton", 16, {"group_chunks": 1, "env": env})  # noqa: E731
    lean = dict(FUSED, MDN_CP_LEAN="1")
    return {"triton_fused": case(FUSED), "triton_fused_lean": case(lean),
            "triton_fused_lean_seg": case(dict(lean, MDN_CP_LEAN_SEGMENT_TOKENS="16"))}


# name → (B, tokens per rank, global cu_seqlens or None, cp_mode, backend, K, extra)
# group_chunks = 1 makes every chunk its own group (the group-parallel passes and scans);
# the other cases have one group per sequence.
CASES = {
    1: {  # a group of one: the CP code path must reduce to the plain op
        "rows_init": (2, 40, None, "allgather", "torch", K, {"group_chunks": 1}),
        "packed": (1, 40, [0, 13, 40], "allgather", "torch", K, {}),
        # the lean node and its segments at one rank (what MDN_CP_EMULATE=1 runs on one GPU)
        **fused_lean_cases(48, [0, 9, 48]),
    },
    2: {
        "rows_init": (2, 24, None, "allgather", "torch", K, {"group_chunks": 1}),
        "rows_init_ring": (2, 24, None, "ring", "torch", K, {}),
        "rows_tree": (1, 40, None, "allgather", "torch", K, {"group_chunks": 1}),
        "packed": (1, 24, [0, 5, 30, 31, 48], "allgather", "torch", K, {"group_chunks": 1}),
        "packed_ring": (1, 24, [0, 5, 30, 31, 48], "ring", "torch", K, {}),
        "triton": (1, 16, None, "allgather", "triton", 16, {}),
        "triton_packed": (1, 32, [0, 9, 64], "allgather", "triton", 16, {"group_chunks": 1}),
        # what a 16-bit model hands the op (bf16 q, k, v; fp32 gates), two groups per rank and a
        # document across the boundary: compared with float64 on the same rounded inputs
        "triton_bf16": (1, 64, [0, 20, 128], "allgather", "triton", 16,
                        {"dtype": torch.bfloat16, "gate_dtype": torch.float32, "group_chunks": 2}),
        # the opt-in lean node (MDN_CP_LEAN=1, state_pass_cp.CPStateOutput) on the same inputs
        # as the case without the suffix: 16-bit, and fp32 with the fused chunk-local kernels
        "triton_bf16_lean": (1, 64, [0, 20, 128], "allgather", "triton", 16,
                             {"dtype": torch.bfloat16, "gate_dtype": torch.float32, "group_chunks": 2,
                              "env": {"MDN_CP_LEAN": "1"}}),
        # fp32 with the fused chunk-local kernels, lean, and lean in segments (two per rank);
        # the bf16 case in segments: 3 chunks at most, so its two 2-chunk groups are two segments
        **fused_lean_cases(32, [0, 9, 64]),
        "triton_bf16_lean_seg": (1, 64, [0, 20, 128], "allgather", "triton", 16,
                                 {"dtype": torch.bfloat16, "gate_dtype": torch.float32, "group_chunks": 2,
                                  "env": {"MDN_CP_LEAN": "1", "MDN_CP_LEAN_SEGMENT_TOKENS": "48"}}),
    },
    3: {
        "rows_init": (2, 20, None, "allgather", "torch", K, {"group_chunks": 1}),
        "rows_init_ring": (2, 20, None, "ring", "torch", K, {}),
        # a document over all three ranks, then short ones
        "packed": (1, 20, [0, 17, 18, 60], "allgather", "torch", K, {}),
        # a document that continues into rank 1 and ends exactly at its last token
        "packed_end_at_boundary": (1, 20, [0, 10, 40, 60], "allgather", "torch", K, {"group_chunks": 1}),
        # float64 end to end: CP must agree to fp64 rounding, not just to the fp32 tolerance
        "packed_fp64": (1, 40, [0, 7, 90, 120], "allgather", "torch", K,
                        {"dtype": torch.float64, "group_chunks": 1}),
        # three ranks: rank 0 keeps a later rank's 𝒯 for the backward (the lean node too)
        **fused_lean_cases(32, [0, 40, 41, 96]),
    },
    4: {
        "rows_init": (1, 16, None, "allgather", "torch", K, {}),
        "rows_init_ring": (1, 16, None, "ring", "torch", K, {}),
        # a document starting exactly at rank 1's first token and spanning ranks 1-3, then one
        # starting inside rank 3
        "packed_boundary": (1, 32, [0, 32, 116, 128], "allgather", "torch", K, {"group_chunks": 1}),
        "packed_boundary_ring": (1, 32, [0, 32, 116, 128], "ring", "torch", K, {}),
    },
}
HALO_W = 4


def seed_of(name: str) -> int:
    """The same inputs for a case and its _ring and _lean(_seg) twins."""
    return zlib.crc32(name.removesuffix("_ring").split("_lean")[0].encode()) % 10_000


class env_set:
    """Environment variables set for one case (the op reads them at each call)."""

    def __init__(self, env):
        self.env, self.old = env or {}, {}

    def __enter__(self):
        for k, v in self.env.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_inputs(R, B, T, cu, Kd, seed, dtype=torch.float32, gate_dtype=None):
    N = B if cu is None else len(cu) - 1
    xs = random_inputs(B, R * T, H, Kd, V, dtype=dtype, seed=seed, with_state=True,
                       num_states=N)
    if gate_dtype is not None:
        xs = xs[:3] + [random_inputs(B, R * T, H, Kd, V, dtype=gate_dtype, seed=seed)[i]
                       for i in range(3, 7)] + xs[7:]
    g = torch.Generator().manual_seed(seed + 1)
    cot_o = torch.randn(B, R * T, H, V, generator=g, dtype=dtype)
    cot_S, cot_M = torch.randn(2, N, H, Kd, V, generator=g, dtype=dtype)
    return xs, (cot_o, cot_S, cot_M)


def run_case(xs, cots, fn, ctx_report=None):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o, (S, M) = fn(xs)
    if ctx_report is not None:
        ctx_report += tensors_on_ctx(o)
    loss = (o * cots[0]).sum() + (S * cots[1]).sum() + (M * cots[2]).sum()
    grads = torch.autograd.grad(loss, xs)
    return {"o": o, "S": S, "M": M, **{"d" + n: g for n, g in zip(INPUTS + ["S0", "M0"], grads)}}


def halo_inputs(R, T, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, R * T, 3, generator=g)
    w = torch.randn(3, 1, HALO_W, generator=g)
    cot = torch.randn(2, R * T, 3, generator=g)
    return x, w, cot


def causal_conv(x_padded, w):
    """Depthwise conv, 'valid' over [B, T + W − 1, D] → [B, T, D]."""
    return F.conv1d(x_padded.transpose(1, 2), w, groups=w.shape[0]).transpose(1, 2)


def worker(rank, R, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=R)
    torch.set_num_threads(1)
    group = dist.new_group(list(range(R)))
    results = {}
    for name, (B, T, cu, mode, backend, Kd, extra) in CASES[R].items():
        extra = dict(extra)
        env = extra.pop("env", None)
        xs, cots = case_inputs(R, B, T, cu, Kd, seed_of(name), extra.pop("dtype", torch.float32),
                               extra.pop("gate_dtype", None))
        sl = slice(rank * T, (rank + 1) * T)
        local = [x[:, sl] for x in xs[:7]] + list(xs[7:])
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)

        def fn(x):
            return mdn_chunk_cp(*x[:7], scale=None, initial_state=(x[7], x[8]),
                                output_final_state=True, cu_seqlens=cu_t, use_qk_l2norm=True,
                                p_times_alpha=True, cp_group=group, cp_mode=mode,
                                backend=backend, chunk_size=C, **extra)
        on_ctx = results.setdefault("tensors_on_ctx", {}).setdefault(name, [])
        with env_set(env):
            results[name] = run_case(local, (cots[0][:, sl], cots[1], cots[2]), fn, on_ctx)
    # Conv halo, forward and backward.
    T = 12
    x, w, cot = halo_inputs(R, T)
    xl = x[:, rank * T:(rank + 1) * T].clone().requires_grad_()
    wl = w.clone().requires_grad_()
    y = causal_conv(conv_halo(xl, HALO_W, group), wl)
    dx, dw = torch.autograd.grad((y * cot[:, rank * T:(rank + 1) * T]).sum(), (xl, wl))
    results["halo"] = {"y": y, "dx": dx, "dw": dw}
    if R == 2:
        results["errors"] = misuse(rank, group)
        results["agree"] = agree_counts(group)
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def agree_counts(group):
    """How many input agreements (api._agree: one all-gather and host copy each) three calls on
    one cu_seqlens tensor make under MDN_CP_AGREE=every and =once, then one call on a new tensor
    and one with other fields (a changed scale) under 'once'; and the outputs of each mode."""
    from mdn_kernels.cp import api

    calls = []
    real = api._agree

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    api._agree = counting
    xs = random_inputs(1, 16, H, K, V, seed=3)
    cu = torch.tensor([0, 5, 21, 32], dtype=torch.int32)
    out = {}
    try:
        for mode in ("every", "once"):
            calls.clear()
            with env_set({"MDN_CP_AGREE": mode}):
                ys = [mdn_chunk(*xs, cu_seqlens=cu, cp_group=group, chunk_size=C)[0] for _ in range(3)]
                out[mode] = dict(calls=len(calls), y=ys)
                if mode == "once":
                    calls.clear()
                    mdn_chunk(*xs, cu_seqlens=cu.clone(), cp_group=group, chunk_size=C)
                    out["new_tensor_calls"] = len(calls)
                    calls.clear()
                    mdn_chunk(*xs, cu_seqlens=cu, cp_group=group, chunk_size=C, scale=0.5)
                    mdn_chunk(*xs, cu_seqlens=cu, cp_group=group, chunk_size=C, scale=0.5)
                    out["other_fields_calls"] = len(calls)
    finally:
        api._agree = real
    return out


def misuse(rank, group):
    """Each misuse → ValueError message (or None if nothing was raised)."""
    errs = {}

    def catch(key, f):
        try:
            f()
            errs[key] = None
        except ValueError as e:
            errs[key] = str(e)

    T = 16 if rank == 0 else 24
    xs = random_inputs(1, T, H, K, V, seed=0)
    catch("shapes", lambda: mdn_chunk(*xs, cp_group=group, chunk_size=C))
    xs = random_inputs(1, 16, H, K, V, seed=0)
    bad_cu = torch.tensor([0, 5, 32] if rank == 0 else [0, 5, 16])  # rank 1 passes local offsets
    catch("cu_local", lambda: mdn_chunk(*xs, cu_seqlens=bad_cu, cp_group=group, chunk_size=C))
    catch("mode", lambda: mdn_chunk(*xs, cp_group=group, cp_mode="tree"))
    catch("not_a_group", lambda: mdn_chunk(*xs, cp_group=0))
    only_0 = dist.new_group([0])
    if rank == 1:
        catch("not_member", lambda: mdn_chunk(*xs, cp_group=only_0, chunk_size=C))
    catch("halo_short", lambda: conv_halo(torch.zeros(1, 2, 3), 4, group))
    # After all that, the group still works (no rank was left inside a collective).
    o, _ = mdn_chunk(*xs, cp_group=group, chunk_size=C)
    errs["still_works"] = bool(torch.isfinite(o).all())
    return errs


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda r: f"R{r}")
def world(request):
    R = request.param
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(R, free_port(), d), nprocs=R, join=True)
        yield R, [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(R)]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference(R, B, T, cu, backend, Kd, seed, dtype, gate_dtype=None, upcast=False):
    """The single-process op on the whole sequence; upcast: the same (rounded) inputs in float64
    on the torch backend."""
    xs, cots = case_inputs(R, B, T, cu, Kd, seed, dtype, gate_dtype)
    if upcast:
        xs, cots, backend = [x.double() for x in xs], [c.double() for c in cots], "torch"
    cu_t = None if cu is None else torch.tensor(cu)
    return run_case(xs, cots, lambda x: mdn_chunk(
        *x[:7], initial_state=(x[7], x[8]), output_final_state=True, cu_seqlens=cu_t,
        backend=backend, chunk_size=C))


def test_cp_equals_single_process(world):
    R, ranks = world
    for name, (B, T, cu, mode, backend, Kd, extra) in CASES[R].items():
        dtype, gdt = extra.get("dtype", torch.float32), extra.get("gate_dtype")
        tol = 1e-12 if dtype == torch.float64 else TOL
        with env_set(extra.get("env")):
            ref = reference(R, B, T, cu, backend, Kd, seed_of(name), dtype, gdt)
        if dtype == torch.bfloat16:
            exact = reference(R, B, T, cu, backend, Kd, seed_of(name), dtype, gdt, upcast=True)
        for key, want in ref.items():
            parts = [r[name][key] for r in ranks]
            if key in ("S", "M", "dS0", "dM0"):
                got = sum(parts)   # each lives on the rank where its sequence ends / starts
            else:
                got = torch.cat(parts, dim=1)
            if dtype == torch.bfloat16:   # CP's rounding may exceed CP = 1's by half
                e_cp, e_1 = rel_err(got, exact[key]), rel_err(want, exact[key])
                assert torch.isfinite(got).all() and e_cp <= 1.5 * e_1 + 1e-3, \
                    f"R={R} {name} ({mode}, {backend}): {key} error {e_cp:.2e} against CP = 1's {e_1:.2e}"
                continue
            err = rel_err(got, want)
            assert err <= tol, f"R={R} {name} ({mode}, {backend}): {key} relative error {err:.2e}"


def test_no_tensor_kept_on_ctx(world):
    """The CP op's Functions keep their tensors through save_for_backward only: under activation
    recompute a tensor on ctx (the kept 𝒯 parts did) stays alive for every layer."""
    R, ranks = world
    for rank, r in enumerate(ranks):
        for name, found in r["tensors_on_ctx"].items():
            assert not found, f"R={R} rank {rank} {name}: {found}"


def test_final_state_lives_where_the_sequence_ends(world):
    R, ranks = world
    for name, (B, T, cu, *_rest) in CASES[R].items():
        for r, res in enumerate(ranks):
            S = res[name]["S"]
            if cu is None:
                ends_here = [r == R - 1] * B
            else:
                ends_here = [r * T < cu[n + 1] <= (r + 1) * T for n in range(len(cu) - 1)]
            for n, e in enumerate(ends_here):
                assert (S[n].abs().sum() > 0) == e, f"{name}: rank {r}, sequence {n}"


def test_ring_equals_allgather(world):
    R, ranks = world
    for name in CASES[R]:
        if name.endswith("_ring"):
            for r in ranks:
                for key, t in r[name].items():
                    want = r[name.removesuffix("_ring")][key]
                    if want.abs().max() == 0:  # e.g. a final state that lives on another rank
                        assert t.abs().max() == 0, f"{name} {key}"
                        continue
                    err = rel_err(t, want)
                    assert err <= TOL, f"{name} {key}: relative error {err:.2e}"


def test_lean_node_equals_the_default_path(world):
    """MDN_CP_LEAN=1 (CPStateOutput: the per-chunk pairs recomputed in the backward), and the same
    in segments of groups (MDN_CP_LEAN_SEGMENT_TOKENS), give the default CP path's (CPStatePass +
    LocalOutput) output, final pairs and every gradient on the same fp32 inputs, per rank
    (measured: bitwise, at R = 2 and 3). The 16-bit lean case is held
    to float64 in test_cp_equals_single_process instead: its chunk-local kernels write the state
    pass's operands in bf16 where the default path rounds them later, which moves results by
    bf16 rounding (5e-3 under the interpreter, as mode 1 against mode 0 without CP)."""
    R, ranks = world
    lean = [n for n in CASES[R] if "_lean" in n and "dtype" not in CASES[R][n][-1]]
    for name in lean:
        for r in ranks:
            for key, t in r[name].items():
                want = r[name.split("_lean")[0]][key]
                if want.abs().max() == 0:
                    assert t.abs().max() == 0, f"{name} {key}"
                    continue
                err = rel_err(t, want)
                assert err <= LEAN_TOL, f"R={R} {name} {key}: relative error {err:.2e}"


def test_agreement_once_per_cu_tensor(world):
    """MDN_CP_AGREE=once: one input agreement per cu_seqlens tensor and set of fields (3 calls on
    one tensor: 1, against 3 by default; a new tensor or other fields agree again, once), with
    the default's outputs bit for bit."""
    R, ranks = world
    if R != 2:
        pytest.skip("run by the R = 2 workers")
    for r in ranks:
        a = r["agree"]
        assert a["every"]["calls"] == 3 and a["once"]["calls"] == 1, a
        assert a["new_tensor_calls"] == 1 and a["other_fields_calls"] == 1, a
        for y_every, y_once in zip(a["every"]["y"], a["once"]["y"]):
            assert torch.equal(y_every, y_once)


def test_agreement_once_is_the_default(monkeypatch):
    """Unset, MDN_CP_AGREE means 'once' (session 18: 629.9 against 704.7 ms per 400M step at
    CP = 4); anything but 'once' or 'every' is refused by name."""
    from mdn_kernels.cp import api

    monkeypatch.delenv("MDN_CP_AGREE", raising=False)
    assert api.agree_mode() == "once"
    monkeypatch.setenv("MDN_CP_AGREE", "sometimes")
    with pytest.raises(ValueError, match="MDN_CP_AGREE must be 'every' or 'once', got 'sometimes'"):
        api.agree_mode()
    assert api._AGREED.max_entries >= 1 << 20   # never emptied wholesale (ranks would diverge)


def test_conv_halo_equals_unsplit_conv(world):
    R, ranks = world
    T = 12
    x, w, cot = halo_inputs(R, T)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = causal_conv(F.pad(x, (0, 0, HALO_W - 1, 0)), w)
    dx, dw = torch.autograd.grad((y * cot).sum(), (x, w))
    torch.testing.assert_close(torch.cat([r["halo"]["y"] for r in ranks], 1), y)
    torch.testing.assert_close(torch.cat([r["halo"]["dx"] for r in ranks], 1), dx)
    torch.testing.assert_close(sum(r["halo"]["dw"] for r in ranks), dw)


@pytest.mark.parametrize("world", [2], indirect=True, ids=["R2"])  # one group is enough
def test_misuse_errors(world):
    R, ranks = world
    e0, e1 = ranks[0]["errors"], ranks[1]["errors"]
    for e in (e0, e1):
        assert "disagree on T (tokens per rank)" in e["shapes"]
        assert "cp_mode must be" in e["mode"]
        assert "ProcessGroup" in e["not_a_group"]
        assert "width − 1 = 3" in e["halo_short"]
        assert e["still_works"]
    assert "GLOBAL offsets" in e1["cu_local"] and "rank(s) [1]" in e0["cu_local"]
    assert "not a member of cp_group" in e1["not_member"]
