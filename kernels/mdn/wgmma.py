"""Which of our Triton kernels compile without Hopper's asynchronous MMA (wgmma, Triton's MMAv3).

Why: on some lent H100 machines the 16-bit CP op gave NaN or wrong gradients and on others
right ones, with the same code and inputs (BENCHMARKS.md, sessions 4-7). Session 7 found the
switch on a wrong machine: with Triton's DISABLE_MMA_V3=1 (dots as synchronous MMAv2
instructions) the op at CP = 2 matched CP = 1 exactly and the trainer's CP steps were right;
without it, NaN. A fault that depends on the machine and goes away without the asynchronous MMA
is what a timing hazard in generated code looks like; Triton 3.4-3.7.0 mis-compiles some Hopper
dot patterns (DESIGN §9).

DISABLE_MMA_V3 is read by Triton's compiler when a kernel is compiled, for the whole process.
`kernel(k, name)` scopes it to chosen kernels: it returns a twin of the JIT function `k` (the
same source, its own in-memory compile cache) whose launches set DISABLE_MMA_V3=1 around the
call, so the twin's binaries are MMAv2 and everything else (FLA's kernels, torch's) is untouched.
The variable is one of Triton's cache-invalidating ones, so the twin's binaries get their own
entries in Triton's on-disk cache. It is process-wide while a twin launches: a kernel compiled
on another thread at that moment would see it too (the trainer launches from one thread at a
time: autograd's backward thread runs while the main thread waits in backward()).

MDN_NO_WGMMA picks the kernel groups: "default" (DEFAULT_GROUPS), "none", "all", or a list of
GROUPS names joined by "," or "+" (benchmarks and the bisect tool compare choices in one
process). Under TRITON_INTERPRET=1 there is no MMA at all and `kernel` returns `k` itself.
"""
from __future__ import annotations

import contextlib
import functools
import os

GROUPS = (
    "prepare",       # chunk_local_fused: _prepare_a, _solve, _prepare_c
    "prepare_bwd",   # chunk_local_fused: _prepare_bwd_t, _prepare_bwd_k, _prepare_bwd_decay
    "output_fwd",    # chunk_local_fused: _output_fwd
    "output_bwd",    # chunk_local_fused: _output_bwd_dw, _output_bwd
    "state_fwd",     # state_pass: _state_fwd
    "state_bwd",     # state_pass: _state_bwd
    "group_map",     # cp.transition: _group_map
    "level_affine",  # cp.transition: _level_affine (the tree walks)
    "recurrent",     # fused_recurrent: the step kernel
)
# From the bisect on a wrong machine (benchmarks/run_wgmma_bisect_gpu.sh, BENCHMARKS.md session 7;
# benchmarks/results/cp_wgmma_h100x4.json): the op at CP = 2 gave NaN gradients at K = 256 unless
# state_bwd was MMAv2, and 1.21x CP = 1's error at K = 128 unless group_map was; with both, CP
# matched CP = 1 (1.01x). No other group changed anything. Without CP, state_bwd as MMAv2 gave
# bitwise the same results in the same time (8.01 against 8.09 ms forward+backward at K = 128,
# 22.96 against 23.36 at K = 256); group_map runs only under CP.
DEFAULT_GROUPS: frozenset = frozenset({"state_bwd", "group_map"})


@functools.lru_cache(maxsize=None)
def parse(value: str) -> frozenset:
    """MDN_NO_WGMMA's value → the set of GROUPS names (ValueError naming a bad entry)."""
    v = value.strip()
    if v in ("", "default"):
        return DEFAULT_GROUPS
    if v == "none":
        return frozenset()
    if v == "all":
        return frozenset(GROUPS)
    names = [n.strip() for n in v.replace("+", ",").split(",") if n.strip()]
    bad = [n for n in names if n not in GROUPS]
    if bad:
        raise ValueError(f"MDN_NO_WGMMA: unknown kernel group(s) {bad}; expected 'default', "
                         f"'none', 'all' or names from {list(GROUPS)}")
    return frozenset(names)


def no_wgmma(name: str) -> bool:
    """Whether kernel group `name` compiles without wgmma in this process (now)."""
    if name not in GROUPS:
        raise ValueError(f"unknown kernel group {name!r}; expected one of {list(GROUPS)}")
    return name in parse(os.environ.get("MDN_NO_WGMMA", "default"))


class _MMAv2Launch:
    """twin[grid](...) with DISABLE_MMA_V3=1 in the environment during the call (the compile,
    on the first call of a specialization, is what reads it)."""

    def __init__(self, twin):
        self.twin = twin

    def __getitem__(self, grid):
        launch = self.twin[grid]

        def run(*args, **kwargs):
            with mmav2_compile():
                return launch(*args, **kwargs)
        return run


@contextlib.contextmanager
def mmav2_compile():
    """DISABLE_MMA_V3=1 in the environment for the block (what Triton's compiler reads), the
    earlier value restored after; tools/compile_fused_sm90.py compiles the groups with it too."""
    saved = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = saved


_TWINS: dict = {}


def kernel(k, name: str):
    """The launchable for JIT function `k` of kernel group `name`: `k` itself, or its MMAv2
    twin where MDN_NO_WGMMA names the group (see the module docstring). Use as
    `kernel(_my_kernel, "state_bwd")[grid](...)`."""
    if not no_wgmma(name) or os.environ.get("TRITON_INTERPRET") == "1":
        return k
    launch = _TWINS.get(id(k))   # (module-level kernels: the id stays theirs)
    if launch is None:
        import triton
        launch = _TWINS[id(k)] = _MMAv2Launch(triton.jit(k.fn))
    return launch
