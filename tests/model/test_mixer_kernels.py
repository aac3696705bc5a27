"""model.mixer_kernels (mdn_scale/model/mixer_kernels.py): the config value, which path a call
takes on CPU (always eager: FLA's kernels cannot run here, DESIGN §9), the error when FLA is
forced where it cannot run, and the memory estimate's counts of both paths by hand. The fused
path's numbers against the eager ones run on the GPU: tests/gpu/test_mixer_kernels_gpu.py."""
import pytest
import torch

from model_dist import run_jobs
from mdn_scale.model import ModelConfig
from mdn_scale.model import mixer_kernels as mk
from mdn_scale.train.memory import Layout, estimate, fused_mixer, layer_activation_terms

CFG = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61, seq_len=64,
           ffn_hidden_size=64, chunk_size=8)


def test_config_values():
    assert ModelConfig().mixer_kernels == "auto"
    for ok in ("auto", "fla", "eager"):  # "fla" is checked where the model is built, not here
        assert ModelConfig(mixer_kernels=ok).mixer_kernels == ok
    for bad in ("triton", "FLA", 1, None):
        with pytest.raises(ValueError, match="model.mixer_kernels"):
            ModelConfig(mixer_kernels=bad)


def test_dispatch_on_cpu(monkeypatch):
    x = torch.zeros(1, 4, 8)
    assert not mk.use_fla("auto", x) and not mk.use_fla("eager", x)
    with pytest.raises(ValueError, match="model.mixer_kernels=fla"):
        mk.use_fla("fla", x)
    mk.check_fla_usable("auto", cuda=False)
    mk.check_fla_usable("eager", cuda=False)
    monkeypatch.setattr(mk, "fla_import_error", lambda: None)  # as if fla-core imports
    assert not mk.use_fla("auto", x)  # still eager: a CPU tensor
    with pytest.raises(ValueError, match="model.mixer_kernels=fla needs CUDA"):
        mk.check_fla_usable("fla", cuda=False)
    mk.check_fla_usable("fla", cuda=True)
    monkeypatch.setattr(mk, "fla_import_error", lambda: "ImportError: No module named 'fla'")
    with pytest.raises(ValueError, match="model.mixer_kernels=fla needs fla-core.*No module named"):
        mk.check_fla_usable("fla", cuda=True)


def _mixer_worker(rank, world, cfg):
    """Build the mixer under each setting; forward + backward where it builds. On CPU "auto" and
    "eager" must be the same code, so the same bits."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.spec_utils import build_module
    from mdn_scale.model import to_transformer_config
    from mdn_scale.model.specs import mdn_mixer_spec
    from model_workers import init_parallel

    init_parallel()
    out = {}
    x = torch.randn(12, 1, cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    for kernels in ("fla", "auto", "eager"):
        mc = ModelConfig(**dict(cfg, mixer_kernels=kernels))
        torch.manual_seed(0)
        try:
            mixer = build_module(mdn_mixer_spec(mc), config=to_transformer_config(mc), layer_number=1)
        except ValueError as e:
            out[kernels] = str(e)
            continue
        xi = x.clone().requires_grad_(True)
        y, _ = mixer(xi, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                            cu_seqlens_kv=cu))
        y.square().sum().backward()
        out[kernels] = dict(y=y.detach(), dx=xi.grad, grads={n: p.grad for n, p in mixer.named_parameters()})
    return out


def test_mixer_build_and_dispatch_on_cpu():
    res = run_jobs(1, [(_mixer_worker, (CFG,))])[0][0]
    assert isinstance(res["fla"], str) and "model.mixer_kernels=fla" in res["fla"], res["fla"]
    a, e = res["auto"], res["eager"]
    assert torch.equal(a["y"], e["y"]) and torch.equal(a["dx"], e["dx"])
    for n in e["grads"]:
        assert torch.equal(a["grads"][n], e["grads"][n]), n


# d=64, H=2, K=16, V=32, F=128, W=4, C=64: P_qkv = 2·(32 + 32) = 128, in-projection rows per
# token P_in = 128 + H·V (g) + 4·H (a, b, m, e) = 200
EST = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, head_k_dim=16, expand_v=2,
                  ffn_hidden_size=128, vocab_size=257, vocab_pad_multiple=64, chunk_size=64)


def test_estimate_fused_vs_eager_by_hand():
    bf16 = dict(precision="bf16")
    eager = layer_activation_terms(EST, Layout(**bf16, fused_mixer=False))
    fused = layer_activation_terms(EST, Layout(**bf16, fused_mixer=True))
    # conv: eager 2·P_qkv + 2W (padded input, mask; mixer.causal_conv_silu recomputes the conv,
    # the composite kept its fp32 output too, 4·P_qkv) = 264; fused: the in-projection output
    # FLA's saved input view keeps, 2·P_in = 400 (more than the eager path now)
    # gated norm: eager 18·H·V + 4H = 1160; fused bf16 o, g copy, output 6·H·V + fp32 rstd 4H = 392
    assert eager["around_op"] - fused["around_op"] == (264 - 400) + (1160 - 392)
    assert eager["after_op"] - fused["after_op"] == 1160 - 392
    for k in ("op_chunk_tensors", "op_state_pairs", "op_backward"):
        assert eager[k] == fused[k], k
    # CP > 1: FLA's conv keeps the halo-padded copy, 2·P_qkv = 256 (mixer._conv_qkv), no mask
    cp = layer_activation_terms(EST, Layout(**bf16, cp=2, fused_mixer=True))
    cp_eager = layer_activation_terms(EST, Layout(**bf16, cp=2, fused_mixer=False))
    assert cp_eager["around_op"] - cp["around_op"] == (264 - 256) + (1160 - 392)
    # GDN: no m rows, P_in = 198 + 2 zero alignment rows (model.in_proj_row_multiple: 8) = 200;
    # 198 without them
    for multiple, p_in in ((8, 200), (1, 198)):
        gdn = ModelConfig(**{**EST.to_dict(), "mixer": "gdn", "in_proj_row_multiple": multiple})
        g_e = layer_activation_terms(gdn, Layout(**bf16, fused_mixer=False))
        g_f = layer_activation_terms(gdn, Layout(**bf16, fused_mixer=True))
        assert g_e["around_op"] - g_f["around_op"] == (264 - 2 * p_in) + (1160 - 392)
    # fp32: the coarse count, the same for both
    assert (layer_activation_terms(EST, Layout(precision="fp32", fused_mixer=True))
            == layer_activation_terms(EST, Layout(precision="fp32", fused_mixer=False)))
    # the whole estimate: kept activations shrink by exactly that per token and layer
    lay = dict(seq_len=1024, precision="bf16")
    e, f = estimate(EST, Layout(**lay, fused_mixer=False)), estimate(EST, Layout(**lay, fused_mixer=True))
    assert e["activations_kept"] - f["activations_kept"] == 2 * 1024 * (-136 + 768)


def test_estimate_fused_gates_by_hand():
    """The Triton gates keep the op's 4 fp32 inputs and a bf16 copy of a | b | e | m (measured
    on CPU in tests/model/test_chunked_loss.py, on the GPU in tests/gpu/test_mixer_kernels_gpu.py)
    instead of the eager math's 15 fp32 [T, H] tensors (12 for GDN)."""
    from mdn_scale.train.memory import fused_gates

    bf16 = dict(precision="bf16", fused_mixer=False)
    for mixer, eager_gates, fused in (("mdn", 15 * 4 * 2, 16 * 2 + 8 * 2), ("gdn", 12 * 4 * 2, 16 * 2 + 6 * 2)):
        cfg = ModelConfig(**{**EST.to_dict(), "mixer": mixer})
        e = layer_activation_terms(cfg, Layout(**bf16, fused_gates=False))
        f = layer_activation_terms(cfg, Layout(**bf16, fused_gates=True))
        assert e["around_op"] - f["around_op"] == eager_gates - fused, mixer
        assert e["after_op"] == f["after_op"]
    for kernels, want in (("eager", False), ("fla", True)):
        assert fused_gates(ModelConfig(**{**EST.to_dict(), "mixer_kernels": kernels}), Layout()) is want
    assert fused_gates(EST, Layout()) is torch.cuda.is_available()  # auto: where CUDA runs
    assert fused_gates(EST, Layout(fused_gates=True)) is True  # explicit wins


def test_estimate_follows_the_config(monkeypatch):
    lay = Layout(precision="bf16")
    for kernels, want in (("eager", False), ("fla", True)):
        assert fused_mixer(ModelConfig(**{**EST.to_dict(), "mixer_kernels": kernels}), lay) is want
    auto = ModelConfig(**EST.to_dict())
    monkeypatch.setattr(mk, "fla_import_error", lambda: None)
    assert fused_mixer(auto, lay) is True
    monkeypatch.setattr(mk, "fla_import_error", lambda: "ImportError")
    assert fused_mixer(auto, lay) is False
    assert fused_mixer(auto, Layout(precision="bf16", fused_mixer=True)) is True  # explicit wins


def _graph_nodes(fn) -> list[str]:
    """Names of every autograd node reachable from fn."""
    todo, seen, names = [fn], set(), []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        todo += [f for f, _ in node.next_functions]
    return names


def _old_split(self, proj):
    # session 22's forward: every part split off, q|k|v taken again as a slice for the conv
    pieces = dict(zip([n for n, _ in self.parts], torch.split(proj, [r for _, r in self.parts], -1)))
    H, K, V = self.heads, self.K, self.V
    return dict(pieces, qkv=proj[..., :H * (2 * K + V)])


def _projection_split_worker(rank, world, cfg):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.spec_utils import build_module
    from mdn_scale.model import to_transformer_config
    from mdn_scale.model.mixer import MDNMixer
    from mdn_scale.model.specs import mdn_mixer_spec
    from model_workers import init_parallel

    init_parallel()
    x = torch.randn(12, 1, cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    mc = ModelConfig(**cfg)
    torch.manual_seed(0)
    mixer = build_module(mdn_mixer_spec(mc), config=to_transformer_config(mc), layer_number=1)
    out = {}
    new_split = MDNMixer._split_projection
    for name, split in (("new", new_split), ("old", _old_split)):
        MDNMixer._split_projection = split
        try:
            xi = x.clone().requires_grad_(True)
            y, _ = mixer(xi, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                                cu_seqlens_kv=cu))
            nodes = _graph_nodes(y.grad_fn)
            mixer.zero_grad(set_to_none=True)
            y.square().sum().backward()
        finally:
            MDNMixer._split_projection = new_split
        out[name] = dict(y=y.detach(), dx=xi.grad, nodes=nodes,
                         grads={n: p.grad.clone() for n, p in mixer.named_parameters()})
    return out


@pytest.mark.parametrize("mixer", ["mdn", "gdn"])
def test_projection_split_once(mixer):
    """The in-projection's output is split once, q|k|v as one piece (MDNMixer._split_projection):
    no slice of it in the graph any more (its backward zero-filled a full-size gradient and added
    it to the split's), and every output and gradient is the earlier forward's bit for bit
    (adding those zeros was exact)."""
    res = run_jobs(1, [(_projection_split_worker, (dict(CFG, mixer=mixer),))])[0][0]
    new, old = res["new"], res["old"]
    assert old["nodes"].count("SliceBackward0") == new["nodes"].count("SliceBackward0") + 1
    assert new["nodes"].count("SplitWithSizesBackward0") == old["nodes"].count("SplitWithSizesBackward0")
    assert torch.equal(new["y"], old["y"]) and torch.equal(new["dx"], old["dx"])
    assert new["grads"].keys() == old["grads"].keys()
    for n, g in new["grads"].items():
        assert torch.equal(g, old["grads"][n]), n
