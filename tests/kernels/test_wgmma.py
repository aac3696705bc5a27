"""mdn_kernels.mdn.wgmma: which kernel groups compile without Hopper's wgmma (MDN_NO_WGMMA).

CPU: the parsing, the error that names a bad group, that the interpreter gets the kernel itself,
and that a twin's launch sets DISABLE_MMA_V3=1 only for its call (with triton.jit replaced by a
recorder: no GPU here). tests/gpu/test_wgmma_gpu.py checks on the H100 that the twin's PTX has
no wgmma where the kernel's has."""
from __future__ import annotations

import os
import types

import pytest

from mdn_kernels.mdn import wgmma


def test_parse_values():
    assert wgmma.parse("none") == frozenset()
    assert wgmma.parse("all") == frozenset(wgmma.GROUPS)
    assert wgmma.parse("default") == wgmma.DEFAULT_GROUPS == wgmma.parse("")
    assert wgmma.parse("state_bwd+group_map") == {"state_bwd", "group_map"}
    assert wgmma.parse(" state_fwd, output_bwd ") == {"state_fwd", "output_bwd"}
    assert wgmma.DEFAULT_GROUPS <= frozenset(wgmma.GROUPS)


def test_bad_group_is_named(monkeypatch):
    with pytest.raises(ValueError, match=r"MDN_NO_WGMMA: unknown kernel group\(s\) \['stat_bwd'\]"):
        wgmma.parse("stat_bwd")
    with pytest.raises(ValueError, match="unknown kernel group 'nope'"):
        wgmma.no_wgmma("nope")
    monkeypatch.setenv("MDN_NO_WGMMA", "state_bwd,bogus")
    with pytest.raises(ValueError, match="bogus"):
        wgmma.kernel(object(), "state_bwd")


def test_interpreter_gets_the_kernel_itself(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MDN_NO_WGMMA", "all")
    k = object()
    assert wgmma.kernel(k, "state_bwd") is k


def test_twin_sets_the_variable_only_during_its_launch(monkeypatch):
    import triton
    seen = []

    class FakeJit:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((grid, a, kw, os.environ.get("DISABLE_MMA_V3"))) or "compiled"

    monkeypatch.setattr(triton, "jit", FakeJit)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    k = types.SimpleNamespace(fn=lambda: None)
    monkeypatch.setattr(wgmma, "_TWINS", {})
    monkeypatch.setenv("MDN_NO_WGMMA", "none")
    assert wgmma.kernel(k, "state_fwd") is k               # not chosen: the kernel itself
    monkeypatch.setenv("MDN_NO_WGMMA", "state_fwd")
    twin = wgmma.kernel(k, "state_fwd")
    assert twin is not k and wgmma.kernel(k, "state_fwd") is twin   # one twin per kernel
    assert twin[(3, 2)](1, 2, BK=64) == "compiled"
    assert seen == [((3, 2), (1, 2), {"BK": 64}, "1")]
    assert "DISABLE_MMA_V3" not in os.environ              # restored (was unset)
    monkeypatch.setenv("DISABLE_MMA_V3", "0")
    twin[(1,)]()
    assert seen[-1][3] == "1" and os.environ["DISABLE_MMA_V3"] == "0"   # restored (was set)


_AOT = r'''
import os, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton._C.libtriton import get_cache_invalidating_env_vars


@triton.jit
def dot_kernel(A, B, C, N: tl.constexpr):
    o = tl.arange(0, N)
    a = tl.load(A + o[:, None] * N + o[None, :])
    b = tl.load(B + o[:, None] * N + o[None, :])
    tl.store(C + o[:, None] * N + o[None, :], tl.dot(a, b))


def wgmma_in_ptx(fn):
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}   # as the JIT specialises
    src = triton.compiler.ASTSource(fn=fn, signature={"A": "*bf16", "B": "*bf16", "C": "*fp32",
                                    "N": "constexpr"}, constexprs={"N": 64}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return "wgmma.mma_async" in k.asm["ptx"], "mma.sync" in k.asm["ptx"]


print("plain", *wgmma_in_ptx(dot_kernel))
os.environ["DISABLE_MMA_V3"] = "1"            # what a twin's launch sets, after a compile
print("twin", *wgmma_in_ptx(triton.jit(dot_kernel.fn)))
print("keyed", "DISABLE_MMA_V3" in get_cache_invalidating_env_vars())
del os.environ["DISABLE_MMA_V3"]
print("after", *wgmma_in_ptx(dot_kernel))
'''


def test_triton_honours_disable_mma_v3_set_mid_process(tmp_path):
    """The mechanism the twins rely on, in the pinned Triton: compiled for sm_90 ahead of time
    (no GPU: PTX and ptxas only), a dot is wgmma without DISABLE_MMA_V3 and mma.sync with it
    set in the process after an earlier compile, and the variable is part of the cache key."""
    import subprocess
    import sys
    script = tmp_path / "aot_dot.py"
    script.write_text(_AOT)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DISABLE_MMA_V3")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert lines == {"plain": "True False", "twin": "False True", "keyed": "True",
                     "after": "True False"}, run.stdout
