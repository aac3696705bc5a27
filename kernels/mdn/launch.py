"""Launch parameters of the op's Triton kernels: the defaults of each launch site, and a
process-wide override for measuring others (tools/tune_kernels_gpu.py) without editing code.

    MDN_LAUNCH="state_fwd:BV=32,num_warps=8;output_fwd:BK=64,num_stages=2"

Each launch site calls `params(name, shape=(K, V), **defaults)` and launches with what comes
back: its own defaults, then the values measured fastest for 16-bit operands at that head size
(TUNED; the launch site passes shape=None for fp32 operands, whose products need more registers),
then MDN_LAUNCH. Nothing is autotuned: the values are fixed, start fast and run under
TRITON_INTERPRET=1. They change tile sizes and scheduling only: every output element is the same
sum, though the order of its partial sums may differ, so results may move by float rounding.

Key f32dot (the kernels that make the C×C decay products: prepare_a, prepare_bwd_k,
prepare_bwd_decay): how their fp32 products run, 0 "ieee" (exact fp32 FMAs, the default unless
MDN_FUSED_FP32_DOT=tf32x3 sets it for every kernel) or 1 "tf32x3" (three TF32 MMAs on tensor
cores, about fp32 accuracy); the one launch key that changes how an element's sum is formed
(still to about fp32 accuracy), not only its order.

Names: state_fwd, state_bwd (the state pass), state_fwd_kfac (the forward on factored operands,
MDN_STATE_KFAC=1), state_pairs (its pairs re-made from a saved W),
output_fwd, output_bwd, output_bwd_dw (the output and its gradients), prepare_a, prepare_c,
prepare_bwd_t, prepare_bwd_k, prepare_bwd_decay (the chunk-local preparation). Keys: BK, BV
(powers of two, at least 16, where the kernel has them), num_warps (1, 2, 4, 8 or 16),
num_stages (1 to 4), f32dot (0 or 1; above), maxnreg (32 to 255, any kernel: ptxas's cap on
registers per thread, Triton's compile option; unset, ptxas takes up to 255, which at 4 warps
leaves room for two programs per SM). FEW_PROGRAMS (below) holds values for launches
whose grid leaves SMs idle.
"""
from __future__ import annotations

import functools
import os

KERNELS = ("state_fwd", "state_fwd_kfac", "state_pairs", "state_bwd", "output_fwd", "output_bwd",
           "output_bwd_dw", "prepare_a", "prepare_c", "prepare_bwd_t", "prepare_bwd_k",
           "prepare_bwd_decay")
_KEYS = ("BK", "BV", "num_warps", "num_stages", "f32dot", "maxnreg")
# compile options every launch takes, whatever its defaults: ptxas's register cap per thread
_ANY_KERNEL = ("maxnreg",)
_parsed: tuple[str, dict] | None = None

# The launch-parameter sweep on an H100 (tools/tune_kernels_gpu.py, suite plan y, session 8,
# benchmarks/results/tune_kernels_h100_v1_k{128,256}_{a,b}.json): per kernel and head size K (the
# power of two at or above it), the candidates that beat the earlier defaults by at least 3% at
# B=8, T=4096, H=6, V=2K in bf16 and matched their results. Blocks are cut to the tensor's
# size at smaller V; other head sizes keep the launch site's defaults. The output forward at
# K = 256 runs 4 warps since session 10 (sweep v5 of plan z: 1.46 against 1.98 ms; plan s10k on
# an H100: forward 5.27 → 4.76 ms, fwd+bwd 19.30 → 18.82 ms, every output and gradient bitwise
# the default's, the float64 GPU test passed; kernels_h100_v13_k256_out_fwd_w4.json).
TUNED: dict[str, dict[int, dict[str, int]]] = {
    "state_fwd": {128: dict(BV=64, num_warps=8, num_stages=2), 256: dict(BV=32)},
    # the same blocks on factored operands (plan s22n, H200: 0.632 ms against the default
    # pass's 0.592 at K = 128, 1.876 against 2.133 at K = 256; state_fwd_h200_v22_kfac.json)
    "state_fwd_kfac": {128: dict(BV=64, num_warps=8, num_stages=2), 256: dict(BV=32)},
    "state_bwd": {128: dict(num_stages=2)},
    "output_fwd": {128: dict(BK=64, BV=128), 256: dict(BK=64, BV=128, num_warps=4)},
    "output_bwd": {128: dict(BK=64), 256: dict(BK=64, BV=128)},
    "prepare_bwd_t": {128: dict(BK=64, BV=128), 256: dict(BV=128)},
    "prepare_bwd_k": {128: dict(BK=64), 256: dict(BK=64)},
    "prepare_a": {256: dict(BK=64)},
    "prepare_c": {256: dict(BK=64, BV=128)},
}

# Where a launch's grid is smaller than the GPU's SM count (a kernel launched with few programs:
# one sequence per rank, as every CP rank has), values measured faster there, by kernel and K.
# The W-making state pass at K = 256 with one 16K sequence (6 · 16 = 96 programs on an H200's 132
# SMs) ran 13% faster on 8 warps, 1.776 against 2.038 ms, bitwise the same results; with more
# programs than SMs 8 warps were slower (2 × 4K: 0.904 against 0.692 ms; 8 × 4K: 2.782 against
# 2.099). tools/bench_state_pairs.py --kernel state_fwd, plan s20t,
# benchmarks/results/state_fwd_h200_v20_sweep.json.
# On factored operands (MDN_STATE_KFAC=1) 8 warps at K = 256 gave NaN (plan s22n; refused in
# state_pass.state_pass_fwd_triton) and half the value block on 4 warps ran fastest with one 16K
# sequence: 1.281 ms against the default pass's 1.782 on 8 warps.
FEW_PROGRAMS: dict[str, dict[int, dict[str, int]]] = {
    "state_fwd": {256: dict(num_warps=8)},
    "state_fwd_kfac": {256: dict(BV=16)},
}


# Value blocks chosen by waves, by kernel and K (16-bit operands, 4 warps): the state passes' time is
# their programs' chunk steps, latency-bound, so a program takes about the same time whether it
# shares its SM or not, up to the programs that fit on an SM at once (`per_sm`: two at ~255
# registers). A launch runs ceil(programs / (per_sm · SMs)) rounds, each costing `cost[BV]`
# relative to the largest block. wave_bv picks the block with the fewest rounds × cost.
# The factored forward pass at K = 256 on an H200 (132 SMs), ms, in
# state_fwd_h200_v22_kfac{,_few}.json, state_fwd_kfac_2x4k_h200_v22p.json and
# state_fwd_kfac_4x4k_h200_v24e.json:
#
#   | shape   | BV = 32 (rounds) | BV = 16 (rounds) |
#   |---------|------------------|------------------|
#   | 8 × 4K  | 1.876 (3)        | 1.975 (6)        |
#   | 4 × 4K  | 1.171 (2)        | 0.991 (3)        |
#   | 2 × 4K  | 0.579–0.592 (1)  | 0.632–0.639 (2)  |
#   | 1 × 16K | 1.655 (1)        | 1.270 (1)        |
#
# That is 0.59–0.63 ms per round at BV = 32 and 0.32–0.33 at BV = 16 for 64 chunks: cost 0.55.
# The rule picks the faster block at all four shapes.
WAVE_BV: dict[str, dict[int, dict]] = {
    "state_fwd_kfac": {256: dict(per_sm=2, cost={32: 1.0, 16: 0.55})},
}


def wave_bv(name: str, K: int, V: int, rows: int, sm_count: int) -> int | None:
    """WAVE_BV's value block for kernel `name` at head sizes K, V with `rows` programs per value
    block (sequences × heads) on `sm_count` SMs, or None where the table has no entry. Ties go
    to the larger block."""
    entry = WAVE_BV.get(name, {}).get(_pow2(K))
    if entry is None or sm_count < 1 or rows < 1:
        return None
    slots = entry["per_sm"] * sm_count

    def time(bv: int) -> float:
        programs = -(-V // bv) * rows
        return -(-programs // slots) * entry["cost"][bv]
    return min(sorted(entry["cost"], reverse=True), key=time)


def sm_count(device) -> int:
    """The CUDA device's SM count (0 off CUDA)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


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
    if key == "maxnreg" and not 32 <= v <= 255:
        raise ValueError(f"MDN_LAUNCH: {name}: maxnreg must be 32 to 255, got {v}")
    if key == "f32dot" and v not in (0, 1):
        raise ValueError(f"MDN_LAUNCH: {name}: f32dot must be 0 (ieee) or 1 (tf32x3), got {v}")


def overrides() -> dict[str, dict[str, int]]:
    """The parsed MDN_LAUNCH (re-read when the variable changes: the tuner sets it in-process)."""
    global _parsed
    spec = os.environ.get("MDN_LAUNCH", "")
    if _parsed is None or _parsed[0] != spec:
        _parsed = (spec, parse(spec))
    return _parsed[1]


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tuned(name: str, K: int, V: int) -> dict[str, int]:
    """TUNED's values for kernel `name` at head sizes K, V (16-bit operands), blocks cut to
    max(16, the power of two at or above K resp. V); {} where nothing was measured."""
    got = dict(TUNED.get(name, {}).get(_pow2(K), {}))
    for key, n in (("BK", K), ("BV", V)):
        if key in got:
            got[key] = min(got[key], max(16, _pow2(n)))
    return got


def params(name: str, shape: tuple[int, int] | None = None, few_programs: bool = False,
           chosen: dict | None = None, **defaults: int) -> dict[str, int]:
    """The launch parameters of kernel `name`: `defaults`, then tuned(name, *shape) where a
    shape (K, V) is given, then (few_programs: the launch would leave SMs idle) FEW_PROGRAMS'
    values for it, then `chosen` (the launch site's pick for this call, e.g. wave_bv's), then
    MDN_LAUNCH's values. A key the kernel does not take (not among `defaults`) is an error that
    names it."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}")
    got = dict(defaults)
    if shape is not None:
        got.update({k: v for k, v in tuned(name, *shape).items() if k in defaults})
        if few_programs:
            got.update({k: v for k, v in FEW_PROGRAMS.get(name, {}).get(_pow2(shape[0]), {}).items()
                        if k in defaults})
    got.update({k: v for k, v in (chosen or {}).items() if k in defaults})
    for key, v in overrides().get(name, {}).items():
        if key not in defaults and key not in _ANY_KERNEL:
            raise ValueError(f"MDN_LAUNCH: {name} takes {', '.join(defaults)}, not {key}")
        got[key] = v
    return got


def fewer_programs_than_sms(programs: int, device) -> bool:
    """Whether a grid of `programs` leaves some of the GPU's SMs without a program (False off
    CUDA)."""
    n = sm_count(device)
    return n > 0 and programs < n


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(index).multi_processor_count
