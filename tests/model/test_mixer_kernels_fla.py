"""FLA's kernels behind model.mixer_kernels=fla (mixer_kernels.conv_silu_fla, gated_rmsnorm_fla)
against the eager reference on CPU, under the Triton interpreter, on packed documents of 1 and 2
tokens (shorter than the conv width − 1) starting at every offset mod W, a document longer than
FLA's 64-token conv tile, a strided input view (the in-projection slice) and rows split over
several programs in the norm's backward (as on a GPU's SMs); and the whole mixer in fp32 on
tests/gpu/test_mixer_kernels_gpu.py's document pattern.

FLA autotunes every kernel, which asks Triton's driver for a benchmarker: the interpreter has none,
so each autotuner is pinned to one config here (the production gate mixer_kernels.use_fla still
refuses CPU tensors). fp32 is compared to rounding. bf16 only to a loose bound: the interpreter
(triton 3.6) truncates fp32 → bf16 where the GPU rounds to nearest even, so FLA's bf16 outputs are
biased here by up to one bf16 ulp; the bound still catches masking or indexing faults (O(1)).

CI runs it (fla-core is in the dev extra since session 11; tests/conftest.py sets
TRITON_INTERPRET=1 where there is no GPU). Skipped where fla-core does not import or the
interpreter is off; by hand: `TRITON_INTERPRET=1 python -m pytest tests/model/test_mixer_kernels_fla.py`
(~40 s). The CP = 2 test at the end runs FLA's conv over the halo-padded slice on two gloo
processes against the CP = 1 mixer in float64."""
import os

import pytest
import torch
import torch.nn.functional as F

from mdn_scale.model import mixer_kernels as mk
from mdn_scale.model.mixer import causal_conv, gated_rmsnorm

pytestmark = [
    pytest.mark.skipif(mk.fla_import_error() is not None,
                       reason=f"fla-core does not import: {mk.fla_import_error()}"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="runs FLA's kernels on CPU tensors: needs TRITON_INTERPRET=1 (set by "
                              "tests/conftest.py where there is no GPU)"),
]

W = 4
# starts 0,1,3,4,6,7,9,10,11,14,15,82,83: every offset mod W; lengths 1, 2, 3, 17 and 67 (> 64)
DOCS = [0, 1, 3, 4, 6, 7, 9, 10, 11, 14, 15, 82, 83, 100]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pin_fla(monkeypatch):
    """Pin FLA's conv and gated-norm autotuners to one config each (BD = 16, BT = 16: several
    channel blocks and row tiles at these sizes) and split the norm's backward rows over 3
    programs (FLA sizes that split by the SM count, 1 without a driver)."""
    from triton.runtime.autotuner import Autotuner
    import fla.modules.causal_conv1d.ops as conv_ops
    import fla.modules.norm.fused_norm_gate as norm_ops

    pinned = 0
    for mod in (conv_ops, norm_ops):
        for obj in list(vars(mod).values()):
            for _ in range(4):  # heuristics wrap the autotuner: walk .fn down to it
                if isinstance(obj, Autotuner) or obj is None:
                    break
                obj = getattr(obj, "fn", None)
            if isinstance(obj, Autotuner):
                monkeypatch.setattr(obj, "configs", obj.configs[:1])
                pinned += 1
    assert pinned >= 4, pinned  # conv fwd/bwd, norm fwd/bwd at least
    monkeypatch.setattr(norm_ops, "get_multiprocessor_count", lambda *a, **k: 3)


@pytest.fixture
def fla_on_cpu(monkeypatch):
    _pin_fla(monkeypatch)


def _conv(fla, dtype, wdtype=torch.float32, D=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = DOCS[-1]
    base = torch.randn(1, T, D + 5, generator=g).to(dtype).requires_grad_(True)
    w = (torch.rand(D, W, generator=g) - 0.5).to(wdtype).requires_grad_(True)
    ct = torch.randn(1, T, D, generator=g, dtype=torch.float64)
    x = base[..., :D]  # a strided view, like the in-projection's q|k|v columns
    cu = torch.tensor(DOCS, dtype=torch.int32)
    y = mk.conv_silu_fla(x, w, cu) if fla else F.silu(causal_conv(x, w, cu_seqlens=cu))
    (y.double() * ct).sum().backward()
    return y.detach(), base.grad[..., :D], w.grad


@pytest.mark.parametrize("docs", [DOCS, [0, 64, 128, 129, 300], [0, 0, 5, 5, 200], [0, 4096]],
                         ids=["short", "multiples-of-64", "empty-documents", "one"])
def test_conv_chunk_indices_are_flas(docs):
    """Our host-made chunk indices (no host sync) are exactly those FLA's prepare_chunk_indices
    makes from the device offsets, dtype included, and are made once per offsets tensor."""
    from fla.ops.utils import prepare_chunk_indices
    for dtype in (torch.int32, torch.int64):
        cu = torch.tensor(docs, dtype=dtype)
        got = mk.conv_chunk_indices(cu)
        want = prepare_chunk_indices(cu, mk.FLA_CONV_CHUNK)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want), (got, want)
        assert mk.conv_chunk_indices(cu) is got
    assert mk.conv_chunk_indices(None) is None


def test_conv_silu_fp32_matches_eager(fla_on_cpu):
    got, want = _conv(True, torch.float32), _conv(False, torch.float32)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == b.dtype == torch.float32, name
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_conv_silu_bf16_input_fp32_weight(fla_on_cpu):
    """The trainer's case: bf16 activations, fp32 weights (weight gradient in fp32)."""
    got, want = _conv(True, torch.bfloat16), _conv(False, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1.5e-2, (name, _rel(a, b))


def _norm(fla, dtype, T=37, H=3, V=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(1, T, H, V, generator=g).to(dtype).requires_grad_(True)
    gb = torch.randn(1, T, H * V + 3, generator=g).to(dtype).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(V, generator=g)).requires_grad_(True)
    ct = torch.randn(1, T, H, V, generator=g, dtype=torch.float64)
    gate = gb[..., :H * V].reshape(1, T, H, V)  # strided, like the in-projection's g columns
    y = (mk.gated_rmsnorm_fla if fla else gated_rmsnorm)(o, gate, w, 1e-5)
    (y.double() * ct).sum().backward()
    return y.detach(), o.grad, gb.grad[..., :H * V], w.grad


@pytest.mark.parametrize("V", [32, 48])  # 48: a feature dim below its power-of-2 tile
def test_gated_rmsnorm_fp32_matches_eager(fla_on_cpu, V):
    got, want = _norm(True, torch.float32, V=V), _norm(False, torch.float32, V=V)
    for name, a, b in zip(("y", "do", "dg", "dw"), got, want):
        assert a.dtype == b.dtype == torch.float32, name
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gated_rmsnorm_bf16(fla_on_cpu):
    got, want = _norm(True, torch.bfloat16), _norm(False, torch.bfloat16)
    for name, a, b in zip(("y", "do", "dg", "dw"), got, want):
        assert a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1.5e-2, (name, _rel(a, b))


class _MixerCase:
    """One spawned process's setup for the mixer tests: FLA pinned and allowed on CPU fp32
    tensors, Megatron's groups (CP = cp), the input, cotangent and packed documents, and the
    mixer built from the spec at seed 0 (the same weights for every kernel choice)."""

    def __init__(self, cfg, docs, cp=1):
        from megatron.core.packed_seq_params import PackedSeqParams
        from model_workers import init_parallel

        self.mp = pytest.MonkeyPatch()
        _pin_fla(self.mp)  # the fixture's pins, in this spawned process
        # let model.mixer_kernels=fla take FLA's kernels for CPU fp32 tensors in this process only
        self.mp.setattr(mk, "check_fla_usable", lambda choice, cuda: None)
        self.mp.setattr(mk, "use_fla", lambda choice, x: choice == "fla" and x.dtype == torch.float32)
        init_parallel(cp=cp)
        self.cfg = cfg
        T, d = (docs[-1] if docs else cfg["seq_len"]), cfg["hidden_size"]
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(T, 1, d, generator=g)
        self.ct = torch.randn(T, 1, d, generator=g, dtype=torch.float64)
        self.psp = None  # docs None: one unpacked sequence
        if docs:
            cu = torch.tensor(docs, dtype=torch.int32)
            self.psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)

    def build(self, kernels, dtype):
        from megatron.core.transformer.spec_utils import build_module
        from mdn_scale.model import ModelConfig, to_transformer_config
        from mdn_scale.model.specs import mdn_mixer_spec

        mc = ModelConfig(**dict(self.cfg, mixer_kernels=kernels))
        torch.manual_seed(0)
        return build_module(mdn_mixer_spec(mc), config=to_transformer_config(mc, params_dtype=dtype),
                            layer_number=1)

    def run(self, mixer, dtype, sl=slice(None)):
        """Output and input gradient of tokens sl, every parameter's gradient, in float64."""
        xi = self.x[sl].to(dtype).clone().requires_grad_(True)
        y, _ = mixer(xi, packed_seq_params=self.psp)
        (y.double() * self.ct[sl]).sum().backward()
        out = {"y": y.detach(), "dx": xi.grad}
        out.update({f"d{n}": p.grad for n, p in mixer.named_parameters()})
        return {k: v.double() for k, v in out.items()}


def _mixer_worker(rank, world, cfg, docs):
    """tests/gpu/test_mixer_kernels_gpu.py's worker in fp32 on CPU: the mixer with FLA's kernels
    and with the eager code, same weights, against the eager mixer in float64."""
    case = _MixerCase(cfg, docs)
    ref = case.run(case.build("eager", torch.float64), torch.float64)
    eager = case.build("eager", torch.float32)
    fused = case.build("fla", torch.float32)
    fused.load_state_dict(eager.state_dict())
    out = ref, case.run(eager, torch.float32), case.run(fused, torch.float32)
    case.mp.undo()
    return out


def test_fla_mixer_fp32_matches_eager_on_cpu():
    from model_dist import run_jobs

    cfg = dict(hidden_size=64, num_layers=1, num_heads=2, head_k_dim=16, vocab_size=61,
               ffn_hidden_size=64, seq_len=64, chunk_size=16)
    docs = [0, 1, 3, 20, 21, 50, 64]  # the GPU test's pattern: 1- and 2-token documents
    ref, eager, fla = run_jobs(1, [(_mixer_worker, (cfg, docs))])[0][0]
    for k in ref:
        e, f = _rel(eager[k], ref[k]), _rel(fla[k], ref[k])
        assert torch.isfinite(fla[k]).all(), k
        # the GPU test's fp32 bounds
        assert f < 1e-4 and f <= 2 * e + 1e-5, (k, f, e)
        assert _rel(fla[k], eager[k]) < 5e-5, (k, _rel(fla[k], eager[k]))  # fp32 rounding apart


def _mixer_cp_worker(rank, world, cfg, docs, halo="padded"):
    """The mixer at CP = world with FLA's conv (the halo as initial state, or over the
    halo-padded slice: MDN_CP_CONV_HALO) and FLA's gated norm, fp32 on CPU: this rank's output
    slice and input gradient, and the CP-summed parameter gradients; beside them the eager
    mixer on the whole sequence (CP = 1 reference, same weights) in float64."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ["MDN_CP_CONV_HALO"] = halo

    case = _MixerCase(cfg, docs, cp=world)
    S = case.x.shape[0] // world
    ref_mixer = case.build("eager", torch.float64)
    with ref_mixer.without_context_parallel():
        ref = case.run(ref_mixer, torch.float64)
    fused = case.build("fla", torch.float32)
    fused.load_state_dict(case.build("eager", torch.float32).state_dict())
    assert fused.cp_group.size() == world
    mine = slice(rank * S, (rank + 1) * S)
    got = case.run(fused, torch.float32, mine)
    for k, v in got.items():
        if k not in ("y", "dx"):
            dist.all_reduce(v, group=ps.get_context_parallel_group())
    case.mp.undo()
    return ref, got, mine


@pytest.mark.parametrize("docs", [[0, 1, 3, 20, 30, 33, 34, 50, 64], [0, 5, 32, 40, 64], None],
                         ids=["starts_in_halo", "starts_at_rank", "unpacked"])
@pytest.mark.parametrize("halo", ["state", "padded"])
def test_fla_conv_under_cp2_matches_cp1(docs, halo):
    """CP = 2 over gloo: FLA's conv over [halo | slice] with mdn_kernels.cp.padded_doc_offsets
    (the default), or with the previous rank's rows as the first document's initial state
    (mdn_kernels.cp.halo_state_offsets, MDN_CP_CONV_HALO=state), gives the CP = 1 mixer's outputs and gradients —
    documents that start inside rank 1's halo (global 30: a history of 2 of the 3 rows),
    1-token documents right after the rank boundary (33), a document starting on the boundary
    (32: no history), and one unpacked sequence (no offsets: the halo is plain context)."""
    from model_dist import run_jobs

    cfg = dict(hidden_size=64, num_layers=1, num_heads=2, head_k_dim=16, vocab_size=61,
               ffn_hidden_size=64, seq_len=64, chunk_size=16)
    ranks = run_jobs(2, [(_mixer_cp_worker, (cfg, docs, halo))])[0]
    ref = ranks[0][0]
    for _, got, sl in ranks:
        for k in ("y", "dx"):
            assert _rel(got[k], ref[k][sl]) < 1e-5, (k, sl, _rel(got[k], ref[k][sl]))
    for k in ref:
        if k not in ("y", "dx"):
            for _, got, _ in ranks:
                assert torch.isfinite(got[k]).all(), k
                assert _rel(got[k], ref[k]) < 1e-5, (k, _rel(got[k], ref[k]))
