"""Launch parameters of the op's Triton kernels: the defaults of each launch site, and a
process-wide override for measuring others (tools/tune_kernels_gpu.py) without editing code.

    MDN_LAUNCH="state_fwd:BV=32,num_warps=8;output_fwd:BK=64,num_stages=2"

Each launch site calls `params(name, K, V, **defaults)` and launches with what comes back. The
defaults are fixed per (kernel, K, V), never autotuned: they start fast, run under
TRITON_INTERPRET=1, and each one was picked from measurements on an H100 (BENCHMARKS.md). The
values change tile sizes and scheduling only: every output element is the same sum, though the
order of the partial sums may differ (tiles along a contracted dimension), so results may move
by float rounding.

Names: state_fwd, state_bwd (the state pass), output_fwd, output_bwd, output_bwd_dw (the output
and its gradients), prepare_a, prepare_c, prepare_bwd_t, prepare_bwd_k, prepare_bwd_decay (the
chunk-local preparation). Keys: BK, BV (powers of two, at least 16, where the kernel has them),
num_warps (1, 2, 4, 8 or 16), num_stages (1 to 4).
"""
from __future__ import annotations

import os

KERNELS = ("state_fwd", "state_bwd", "output_fwd", "output_bwd", "output_bwd_dw", "prepare_a",
           "prepare_c", "prepare_bwd_t", "prepare_bwd_k", "prepare_bwd_decay")
_KEYS = ("BK", "BV", "num_warps", "num_stages")
_parsed: tuple[str, dict] | None = None


def parse(spec: str) -> dict[str, dict[str, int]]:
    """'name:key=int,key=int;name:...' → {name: {key: int}}, checked (ValueError naming what is
    wrong). Empty → {}."""
    out: dict[str, dict[str, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or name not in KERNELS:
            raise ValueError(f"MDN_LAUNCH: {part!r} must be 'kernel:key=value,...' with kernel "
                             f"one of {', '.join(KERNELS)}")
        vals = out.setdefault(name, {})
        for kv in filter(None, (x.strip() for x in body.split(","))):
            key, eq, val = (s.strip() for s in kv.partition("="))
            if not eq or key not in _KEYS:
                raise ValueError(f"MDN_LAUNCH: {name}: {kv!r} must be key=value with key one of "
                                 f"{', '.join(_KEYS)}")
            try:
                v = int(val)
            except ValueError:
                raise ValueError(f"MDN_LAUNCH: {name}: {key} must be an integer, got {val!r}") from None
            _check(name, key, v)
            vals[key] = v
    return out


def _check(name: str, key: str, v: int) -> None:
    if key in ("BK", "BV") and (v < 16 or v & (v - 1)):
        raise ValueError(f"MDN_LAUNCH: {name}: {key} must be a power of two of at least 16, got {v}")
    if key == "num_warps" and v not in (1, 2, 4, 8, 16):
        raise ValueError(f"MDN_LAUNCH: {name}: num_warps must be 1, 2, 4, 8 or 16, got {v}")
    if key == "num_stages" and not 1 <= v <= 4:
        raise ValueError(f"MDN_LAUNCH: {name}: num_stages must be 1 to 4, got {v}")


def overrides() -> dict[str, dict[str, int]]:
    """The parsed MDN_LAUNCH (re-read when the variable changes: the tuner sets it in-process)."""
    global _parsed
    spec = os.environ.get("MDN_LAUNCH", "")
    if _parsed is None or _parsed[0] != spec:
        _parsed = (spec, parse(spec))
    return _parsed[1]


def params(name: str, **defaults: int) -> dict[str, int]:
    """The launch parameters of kernel `name`: `defaults` with MDN_LAUNCH's values for it. A key
    the kernel does not take (not among `defaults`) is an error that names it."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}")
    got = dict(defaults)
    for key, v in overrides().get(name, {}).items():
        if key not in defaults:
            raise ValueError(f"MDN_LAUNCH: {name} takes {', '.join(defaults)}, not {key}")
        got[key] = v
    return got
