"""Launch parameters (mdn_kernels.mdn.launch, MDN_LAUNCH): the parser's errors, overrides reaching
the launch sites, and every tile candidate of tools/tune_kernels_gpu.py giving the defaults'
results (fp32 under TRITON_INTERPRET=1, where num_warps and num_stages do nothing but the K / V
block loops and their masks run as on the GPU)."""
import json
import os
import sys

import pytest
import torch

from mdn_kernels import mdn_chunk
from mdn_kernels.mdn import chunk, launch
from mdn_kernels.mdn.testing import random_inputs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import tune_kernels_gpu as tune  # noqa: E402


def test_parse_reads_kernels_and_keys():
    got = launch.parse(" state_fwd:BV=32, num_warps=8 ; output_fwd:BK=64,num_stages=2;")
    assert got == {"state_fwd": {"BV": 32, "num_warps": 8}, "output_fwd": {"BK": 64, "num_stages": 2}}
    assert launch.parse("") == {}


@pytest.mark.parametrize("spec, words", [
    ("state_fwdd:BV=32", "kernel one of"),
    ("state_fwd BV=32", "kernel one of"),
    ("state_fwd:BX=32", "key one of"),
    ("state_fwd:BV=3x", "must be an integer"),
    ("state_fwd:BV=48", "power of two"),
    ("state_fwd:BV=8", "power of two"),
    ("output_fwd:num_warps=3", "num_warps must be"),
    ("output_fwd:num_stages=0", "num_stages must be"),
    ("prepare_bwd_decay:f32dot=2", "f32dot must be 0"),
    ("state_bwd:maxnreg=256", "maxnreg must be 32 to 255"),
    ("state_bwd:maxnreg=16", "maxnreg must be 32 to 255"),
])
def test_parse_names_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=words):
        launch.parse(spec)


def test_params_apply_the_override_and_refuse_keys_a_kernel_lacks(monkeypatch):
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd:num_warps=8")
    assert launch.params("state_fwd", BV=32, num_warps=4, num_stages=1) == dict(
        BV=32, num_warps=8, num_stages=1)
    assert launch.params("state_bwd", BV=32, num_warps=4, num_stages=1)["num_warps"] == 4
    monkeypatch.setenv("MDN_LAUNCH", "prepare_a:BV=32")
    with pytest.raises(ValueError, match="prepare_a takes BK, num_warps, num_stages, not BV"):
        launch.params("prepare_a", BK=32, num_warps=8, num_stages=1)
    monkeypatch.delenv("MDN_LAUNCH")
    assert launch.params("state_fwd", BV=32, num_warps=4, num_stages=1)["num_warps"] == 4


def test_maxnreg_is_a_key_of_every_kernel_and_reaches_the_launch(monkeypatch):
    """maxnreg (ptxas's register cap, a compile option) is taken by every launch site without
    being among its defaults; the op runs with it (the interpreter drops compile options, so
    here this checks that the launches accept the keyword), with the defaults' results."""
    monkeypatch.setenv("MDN_LAUNCH", "prepare_a:maxnreg=128")
    assert launch.params("prepare_a", BK=32, num_warps=8, num_stages=1) == dict(
        BK=32, num_warps=8, num_stages=1, maxnreg=128)
    chunk.use_fused_local(True)
    try:
        xs = random_inputs(1, 70, 1, 16, 16, dtype=torch.float32, seed=3, with_state=True)
        monkeypatch.delenv("MDN_LAUNCH")
        ref = _op(xs, chunk_size=16)
        monkeypatch.setenv("MDN_LAUNCH", ";".join(f"{n}:maxnreg=168" for n in launch.KERNELS))
        got = _op(xs, chunk_size=16)
    finally:
        chunk.use_fused_local(None)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_few_programs_values_apply_below_the_sm_count_only(monkeypatch):
    """FEW_PROGRAMS' values (8 warps for the W-making state pass at K = 256) come after TUNED
    where the caller says its grid leaves SMs idle, not otherwise, not at another K, and
    MDN_LAUNCH still has the last word. Off CUDA no grid counts as few."""
    from mdn_kernels.mdn.state_pass import launch_defaults
    monkeypatch.delenv("MDN_LAUNCH", raising=False)
    d = launch_defaults(256, 512)
    plain = launch.params("state_fwd", shape=(256, 512), **d)
    few = launch.params("state_fwd", shape=(256, 512), few_programs=True, **d)
    assert plain == dict(BV=32, num_warps=4, num_stages=1)
    assert few == dict(plain, num_warps=8)
    d128 = launch_defaults(128, 256)
    assert (launch.params("state_fwd", shape=(128, 256), few_programs=True, **d128)
            == launch.params("state_fwd", shape=(128, 256), **d128))
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd:num_warps=4")
    assert launch.params("state_fwd", shape=(256, 512), few_programs=True, **d)["num_warps"] == 4
    assert launch.fewer_programs_than_sms(1, torch.device("cpu")) is False


def test_f32dot_is_a_key_of_the_decay_product_kernels_only(monkeypatch):
    from mdn_kernels.mdn import chunk_local_fused as fused
    assert launch.parse("prepare_bwd_decay:f32dot=1") == {"prepare_bwd_decay": {"f32dot": 1}}
    for name in ("prepare_a", "prepare_bwd_k", "prepare_bwd_decay"):
        assert fused.launch_defaults(name, 128, 256, 64)["f32dot"] == 0
    monkeypatch.setenv("MDN_FUSED_FP32_DOT", "tf32x3")   # the process-wide setting is its default
    assert fused.launch_defaults("prepare_bwd_k", 128, 256, 64)["f32dot"] == 1
    assert "f32dot" not in fused.launch_defaults("output_fwd", 128, 256, 64)
    monkeypatch.setenv("MDN_LAUNCH", "output_fwd:f32dot=1")
    with pytest.raises(ValueError, match="output_fwd takes BK, BV, num_warps, num_stages, not f32dot"):
        fused._lp("output_fwd", 128, 256, 64, None)


def test_tuner_candidates_are_valid_launch_strings():
    for shape in tune.SHAPES:
        for i in range(tune.NUM_VARIANTS):
            spec = tune.launch_spec(tune.variant_configs(i, shape["K"], shape["V"]))
            parsed = launch.parse(spec)
            assert set(parsed) == set(tune.CANDIDATES)
    # variant 0 is what the launch sites use for bf16 (their defaults, launch.TUNED applied)
    assert tune.candidate("state_fwd", 0, 256, 512) == dict(BV=32, num_warps=4, num_stages=1)
    assert tune.candidate("state_bwd", 0, 256, 512) == dict(BV=16, num_warps=4, num_stages=1)
    assert tune.candidate("state_pairs", 0, 256, 512) == dict(BK=64, BV=64, num_warps=4, num_stages=2)
    assert tune.candidate("output_fwd", 0, 128, 256)["BK"] == 64
    assert tune.candidate("output_fwd", 2, 128, 256)["BK"] == 128


def test_tuned_values_by_head_size_cut_to_the_tensor():
    assert launch.tuned("state_fwd", 128, 256) == dict(BV=64, num_warps=8, num_stages=2)
    assert launch.tuned("state_fwd", 100, 40) == dict(BV=64, num_warps=8, num_stages=2)  # K → 128
    assert launch.tuned("output_fwd", 256, 100) == dict(BK=64, BV=128, num_warps=4)
    assert launch.tuned("output_fwd", 128, 20) == dict(BK=64, BV=32)     # V = 20: blocks of 32
    assert launch.tuned("state_fwd", 64, 128) == {}                      # not measured
    assert launch.params("prepare_a", shape=(256, 512), BK=32, num_warps=8, num_stages=1)["BK"] == 64
    assert launch.params("prepare_a", shape=None, BK=32, num_warps=8, num_stages=1)["BK"] == 32


def test_pick_takes_the_fastest_matching_variant():
    cfg = lambda i: {k: {"i": i} for k in tune.CANDIDATES}  # noqa: E731
    variants = [
        dict(index=0, configs=cfg(0), kernel_ms={"state_fwd": 1.0, "output_fwd": 2.0},
             rel_diff_vs_default={"o": 0.0}),
        dict(index=1, configs=cfg(1), kernel_ms={"state_fwd": 0.5, "output_fwd": 1.0},
             rel_diff_vs_default={"o": float("nan")}),          # wrong: not picked
        dict(index=2, configs=cfg(2), kernel_ms={"state_fwd": 0.8, "output_fwd": 2.5},
             rel_diff_vs_default={"o": 1e-3}),
        dict(index=3, configs=cfg(3), error="OutOfResources",   # rerun one kernel at a time
             kernel_ms={"output_fwd": 1.5},
             rel_diff_vs_default={"output_fwd:o": 1e-3, "state_fwd:o": 0.5}),
    ]
    best = tune.pick(variants)
    assert best["state_fwd"] == dict(config={"i": 2}, ms=0.8, variant=2, default_ms=1.0)
    assert best["output_fwd"]["variant"] == 3   # its own rerun matched; state_fwd's did not
    assert "output_bwd" not in best


SMALL = dict(B=2, T=45, H=2, K=48, V=40)    # K, V not powers of two: masked block tails


def _op(xs, chunk_size=16):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o, (S, M) = mdn_chunk(*xs[:7], initial_state=(xs[7], xs[8]), output_final_state=True,
                          backend="triton", chunk_size=chunk_size)
    g = torch.Generator().manual_seed(5)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (o, S, M))
    return [o, S, M, *torch.autograd.grad(loss, xs)]


@pytest.mark.parametrize("variant", range(1, tune.NUM_VARIANTS))
def test_every_tile_candidate_gives_the_defaults_results(variant, monkeypatch):
    """The candidates at the small shape, scaled down so that the blocks cut K and V into
    several (masked) pieces: the op's outputs, final pair and all gradients equal the defaults'
    to fp32 rounding (the fused local kernels and the lean path, as on the GPU)."""
    chunk.use_fused_local(True)
    try:
        B, T, H, K, V = SMALL.values()
        xs = random_inputs(B, T, H, K, V, dtype=torch.float32, seed=11, with_state=True)
        monkeypatch.delenv("MDN_LAUNCH", raising=False)
        ref = _op(xs)
        configs = tune.variant_configs(variant, K, V)
        for cfg in configs.values():   # the small shape's blocks: at most 32 wide
            for key in ("BK", "BV"):
                if key in cfg:
                    cfg[key] = min(cfg[key], 32)
        monkeypatch.setenv("MDN_LAUNCH", tune.launch_spec(configs))
        got = _op(xs)
    finally:
        chunk.use_fused_local(None)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max().item()


def test_best_spec_keeps_real_gains_from_each_run():
    shape = dict(B=1, T=64, H=1, K=128, V=256)
    cfg = lambda i: {k: {"BV": 16 * (i + 1)} for k in tune.CANDIDATES}  # noqa: E731
    run_a = dict(meta=dict(shape=shape), variants=[
        dict(index=0, configs=cfg(0), kernel_ms={"state_fwd": 1.0, "output_fwd": 2.0},
             rel_diff_vs_default={"o": 0.0}),
        dict(index=1, configs=cfg(1), kernel_ms={"state_fwd": 0.6, "output_fwd": 1.99},
             rel_diff_vs_default={"o": 1e-3})])
    run_b = dict(meta=dict(shape=shape), variants=[
        dict(index=0, configs=cfg(0), kernel_ms={"state_fwd": 1.1, "output_fwd": 2.0},
             rel_diff_vs_default={"o": 0.0}),
        dict(index=5, configs=cfg(5), kernel_ms={"state_fwd": 0.55, "output_fwd": 2.1},
             rel_diff_vs_default={"o": 1e-3})])
    # state_fwd: run b's 0.55 / 1.1 = 0.50 beats run a's 0.6 / 1.0; output_fwd: 0.5% is noise
    assert tune.best_spec([run_a, run_b]) == "state_fwd:BV=96"
    with pytest.raises(ValueError, match="one shape"):
        tune.best_spec([run_a, dict(run_b, meta=dict(shape=dict(shape, K=256)))])


@pytest.mark.parametrize("K, V", [(128, 256)])
def test_tuned_blocks_at_their_head_size(K, V, monkeypatch):
    """The tuned blocks run on the GPU for bf16 only; here the same block sizes (forced through
    MDN_LAUNCH) at the real head size, fp32 under the interpreter, against the fp32 defaults:
    chunk 64, two chunks and a ragged tail."""
    chunk.use_fused_local(True)
    try:
        xs = random_inputs(1, 150, 1, K, V, dtype=torch.float32, seed=12, with_state=True)
        monkeypatch.delenv("MDN_LAUNCH", raising=False)
        ref = _op(xs, chunk_size=64)
        blocks = {n: {k: v for k, v in launch.tuned(n, K, V).items() if k in ("BK", "BV")}
                  for n in launch.TUNED}
        monkeypatch.setenv("MDN_LAUNCH", tune.launch_spec({n: b for n, b in blocks.items() if b}))
        got = _op(xs, chunk_size=64)
    finally:
        chunk.use_fused_local(None)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max().item()


def test_isolated_runs_name_the_candidate_that_faults(tmp_path):
    """run_isolated with a stand-in for the child processes: variant 1 runs; variant 2 faults as
    a whole (its in-process reruns all hit the dead context) and is rerun one kernel at a time,
    where only output_fwd's candidate faults; variant 3's process dies without a result."""
    calls = []

    def child(shape_index, i, kernels, out_path):
        calls.append((i, tuple(kernels or ())))
        ref = dict(index=0, configs=tune.variant_configs(0, 128, 256),
                   kernel_ms={k: 1.0 for k in tune.CANDIDATES}, rel_diff_vs_default={"o": 0.0})
        meta = dict(shape=tune.SHAPES[shape_index], card="stand-in")
        cfgs = tune.variant_configs(i, 128, 256, kernels)
        if i == 1:
            rec = dict(index=1, configs=cfgs, kernel_ms={k: 0.9 for k in cfgs},
                       rel_diff_vs_default={"o": 1e-4})
        elif i == 2 and kernels is None:
            rec = dict(index=2, configs=cfgs, error="RuntimeError: illegal memory access",
                       per_kernel={k: "RuntimeError: CUDA error" for k in cfgs})
        elif i == 2 and kernels == ["output_fwd"]:
            return None                                    # the process died
        elif i == 2:
            rec = dict(index=2, configs=cfgs, kernel_ms={k: 0.5 for k in tune.CANDIDATES},
                       rel_diff_vs_default={"o": 1e-4})
        else:
            return None
        return dict(meta=meta, variants=[ref, rec])

    out = tmp_path / "tune.json"
    res = tune.run_isolated(0, [0, 1, 2, 3], str(out), child=child)
    assert [c for c in calls if not c[1]] == [(1, ()), (2, ()), (3, ())]
    assert sorted(k for i, (k,) in ((i, k) for i, k in calls if k) if i == 2) == sorted(tune.CANDIDATES)
    v = {r["index"]: r for r in res["variants"]}
    assert set(v) == {0, 1, 2, 3} and res["meta"]["card"] == "stand-in"
    assert v[2]["per_kernel"]["output_fwd"] == "the process ended without a result"
    assert v[2]["kernel_ms"]["state_fwd"] == 0.5 and "output_fwd" not in v[2]["kernel_ms"]
    assert v[3]["per_kernel"]["state_fwd"] == "the process ended without a result"
    best = res["best"]
    assert best["state_fwd"]["variant"] == 2 and best["output_fwd"]["variant"] == 1
    assert json.loads(out.read_text())["best"] == best


@pytest.mark.parametrize("B, T, want", [(8, 4096, 32), (4, 4096, 16), (2, 4096, 32), (1, 16384, 16)])
def test_wave_bv_picks_the_measured_faster_block(B, T, want):
    """The factored forward pass at K = 256, V = 512, H = 6 on an H200's 132 SMs: the block
    that ran faster at each of the four measured shapes (launch.WAVE_BV's table)."""
    assert launch.wave_bv("state_fwd_kfac", 256, 512, B * 6, 132) == want
    assert launch.wave_bv("state_fwd_kfac", 128, 256, B * 6, 132) is None   # not measured
    assert launch.wave_bv("state_fwd", 256, 512, B * 6, 132) is None
    assert launch.wave_bv("state_fwd_kfac", 256, 512, B * 6, 0) is None     # not CUDA


def test_chosen_values_come_after_tuned_and_before_mdn_launch(monkeypatch):
    monkeypatch.delenv("MDN_LAUNCH", raising=False)
    d = dict(BV=16, num_warps=4, num_stages=1)
    assert launch.params("state_fwd_kfac", shape=(256, 512), **d)["BV"] == 32   # TUNED
    assert launch.params("state_fwd_kfac", shape=(256, 512), chosen=dict(BV=16), **d)["BV"] == 16
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd_kfac:BV=64")
    assert launch.params("state_fwd_kfac", shape=(256, 512), chosen=dict(BV=16), **d)["BV"] == 64


def test_the_forward_pass_launches_with_the_wave_block(monkeypatch):
    """state_pass_fwd_triton with bf16 factors at K = 256 (interpreted; the SM count faked to
    one, so that the table prefers BV = 16 here): it launches with wave_bv's block, and its
    results are those of the same block forced through MDN_LAUNCH."""
    from mdn_kernels.mdn import state_pass
    from mdn_kernels.mdn.testing import patch_interpreter_bf16_dot, random_state_factors
    from tests.kernels.test_cp_transition import prepared
    patch_interpreter_bf16_dot()
    H, C, K, V = 2, 16, 200, 48
    args, layout = prepared(1, 40, H, K, V, C, torch.float64, seed=3)
    kfac = random_state_factors(layout.num_chunks, H, C, K, op_dtype=torch.bfloat16, seed=4)
    U = args[0].to(torch.bfloat16)
    gates = [t.float() for t in args[5:8]]
    seen = []
    params = launch.params

    def spy(name, *a, **kw):
        got = params(name, *a, **kw)
        seen.append((name, got["BV"]))
        return got
    monkeypatch.setattr(launch, "params", spy)
    monkeypatch.delenv("MDN_LAUNCH", raising=False)
    monkeypatch.setattr(launch, "sm_count", lambda device: 1)
    assert launch.wave_bv("state_fwd_kfac", K, V, H, 1) == 16
    got = state_pass.state_pass_fwd_triton(U, None, None, None, None, *gates, None, None, layout,
                                           kfac=kfac)
    assert seen[-1] == ("state_fwd_kfac", 16)
    monkeypatch.setattr(launch, "sm_count", lambda device: 0)
    monkeypatch.setenv("MDN_LAUNCH", "state_fwd_kfac:BV=16")
    want = state_pass.state_pass_fwd_triton(U, None, None, None, None, *gates, None, None,
                                            layout, kfac=kfac)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
