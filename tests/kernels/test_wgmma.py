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
