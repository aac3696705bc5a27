"""The chunked LM-head loss (mdn_scale/model/loss.py): the same per-token loss and the same
gradients of every parameter as the whole-sequence path, at TP = 1 and TP = 2 (real gloo
processes), chunk sizes that do not divide the token count, and B > 1 (tokens flattened in
[s b] order). float64: the chunked path computes its softmax in the products' dtype (fp64
here), so it is checked tightly against a float64 cross entropy of the logits; Megatron's
vocab-parallel cross entropy (the path it replaces) casts to fp32, so that comparison is at fp32
rounding. Sequence parallelism needs CUDA collectives (gloo has no all_gather_into_tensor):
tests/gpu/test_model_gpu.py covers it.

Also here (sharing the spawned processes): the memory estimate's per-token activation counts
(mdn_scale/train/memory.py) against what autograd actually saves. Saved-tensor hooks count the
unique storages one forward with labels saves, bf16 autocast, the MDN op's fused 16-bit Triton
path (interpreter on CPU; the same kernels, dtypes and shapes as on the GPU). Differences over T
and over layers cancel the T-independent pieces (conv weight, per-head parameters, the conv's
W − 1 padding rows), so the per-token counts must agree exactly."""

import pytest
import torch

from model_dist import run_jobs
import model_workers as workers
from mdn_scale.model import ModelConfig
from mdn_scale.model.loss import ChunkedLMLoss
from mdn_scale.train.memory import Layout, layer_activation_terms

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
            vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=8)
CHUNKS = (5, 7, 32, 100)  # T = 2 · 16 = 32 tokens
MEM = dict(hidden_size=64, num_heads=2, head_k_dim=16, expand_v=2, ffn_hidden_size=128,
           vocab_size=257, vocab_pad_multiple=64, chunk_size=16, backend="triton")
RUNS = [(1, 32, 16), (2, 32, 16), (1, 64, 16), (2, 64, 16), (1, 32, 0)]  # (layers, T, loss chunk)


@pytest.fixture(scope="module")
def spawned():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (2, 16), generator=g)
    labels = torch.randint(0, 61, (2, 16), generator=g)
    w = torch.rand(2, 16, generator=g, dtype=torch.float64)
    jobs = [(workers.chunked_loss_worker, (tp, TINY, ids, labels, w, CHUNKS)) for tp in (1, 2)]
    jobs.append((workers.saved_bytes_worker, (MEM, RUNS)))
    jobs.append((workers.saved_bytes_fused_gates_worker, (MEM, RUNS[:4])))
    return run_jobs(2, jobs)


@pytest.fixture(scope="module")
def results(spawned):
    return {1: spawned[0], 2: spawned[1]}


@pytest.fixture(scope="module")
def counts(spawned):
    return spawned[2][0]


@pytest.fixture(scope="module")
def counts_fused_gates(spawned):
    return spawned[3][0]


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_loss_matches_whole_sequence(results, tp):
    for rank, r in enumerate(results[tp]):
        ref_loss, ref_grads = r["ref"]
        meg_loss, meg_grads = r["megatron"]
        assert meg_loss.dtype == torch.float32
        torch.testing.assert_close(meg_loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        for chunk in CHUNKS:
            loss, grads = r[chunk]
            what = f"tp={tp} rank={rank} chunk={chunk}"
            assert loss.shape == ref_loss.shape == (2, 16), what
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
            torch.testing.assert_close(loss.float(), meg_loss, rtol=1e-5, atol=1e-5)
            assert set(grads) == set(ref_grads)
            for name, gr in ref_grads.items():
                assert gr.abs().sum() > 0 or "bias" in name, f"{what}: {name} has no gradient"
                torch.testing.assert_close(grads[name], gr, rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"{what} grad {name}: {m}")
                torch.testing.assert_close(grads[name], meg_grads[name], rtol=2e-4, atol=1e-7,
                                           msg=lambda m: f"{what} grad {name} vs Megatron: {m}")


def test_function_vocab_shard_and_autocast():
    """ChunkedLMLoss alone: a vocabulary shard (labels outside it contribute no target logit)
    against a float64 reference, and bf16 autocast against autocast's own linear + fp32 CE."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(10, 6, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 10, (13,), generator=g)
    loss = ChunkedLMLoss.apply(h, w, labels, 4, 0, None)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    cot = torch.rand(13, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((loss * cot).sum(), (h, w))
    want = torch.autograd.grad((ref * cot).sum(), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # bf16 autocast (CPU): products in bf16, softmax in fp32, gradients in the inputs' dtypes
    hf, wf = (t.detach().float().requires_grad_() for t in (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ChunkedLMLoss.apply(hf, wf, labels, 5, 0, None)
        ref = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hf, wf).float(), labels, reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(loss.sum(), (hf, wf))
    want = torch.autograd.grad(ref.sum(), (hf, wf))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_config_flag():
    assert ModelConfig().loss_chunk_tokens == 0
    assert ModelConfig(loss_chunk_tokens=8192).loss_chunk_tokens == 8192
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="model.loss_chunk_tokens"):
            ModelConfig(loss_chunk_tokens=bad)


def test_layer_saved_bytes_match_the_estimate(counts):
    cfg = ModelConfig(**dict(MEM, num_layers=2))
    t = layer_activation_terms(cfg, Layout(precision="bf16", fused_mixer=False))  # CPU: eager
    per_token = t["around_op"] + t["op_chunk_tensors"] + t["op_state_pairs"]
    layer = {T: counts[(2, T, 16)] - counts[(1, T, 16)] for T in (32, 64)}
    assert (layer[64] - layer[32]) / 32 == per_token
    # by hand for this model (d=64, H=2, K=16, V=32, C=16, F=128, W=4, P_qkv=128): norms 2·644,
    # conv + SiLU 2·128 + 8 (the padded input and the mask: mixer.causal_conv_silu recomputes
    # the conv; the composite also kept its fp32 output, 4·128), bf16 q|k|v 256 (the op reads k
    # and v as slices of it: no copies since session 15),
    # gates 120, gated norm 18·64 + 8, MLP 1280; the op per head 2K (the corrected q: the raw
    # q, k kept, MDN_RAW_QK; k is a view of q|k|v) + 8K + 8C + 28 + 2V (W) + 12/C = 380.75; no
    # per-chunk pairs (StateOutput recomputes them); the chunk bounds are shared by the layers
    # (not per layer)
    assert per_token == 2 * 644 + 264 + 256 + 120 + 1160 + 1280 + 2 * 380.75 == 5129.5


def test_layer_saved_bytes_fused_gates_match_the_estimate(counts_fused_gates):
    """The Triton gate kernels (gate_kernels.py, as CUDA runs them; here under the interpreter):
    the op's 4 fp32 inputs and the kernel's bf16 copy of a | b | e | m, 16·2 + 8·2 = 48 bytes per
    token instead of the eager gate math's 120."""
    counts = counts_fused_gates
    cfg = ModelConfig(**dict(MEM, num_layers=2))
    t = layer_activation_terms(cfg, Layout(precision="bf16", fused_mixer=False, fused_gates=True))
    per_token = t["around_op"] + t["op_chunk_tensors"] + t["op_state_pairs"]
    layer = {T: counts[(2, T, 16)] - counts[(1, T, 16)] for T in (32, 64)}
    assert (layer[64] - layer[32]) / 32 == per_token == 5129.5 - 120 + 48


def test_loss_saved_bytes_match_the_estimate(counts):
    """Megatron's loss keeps the fp32 softmax (4 · Vp) + the target mask and index (9); the
    chunked loss keeps the labels (8) and the log-sum-exp (4) per token (no T-independent part)."""
    assert (counts[(1, 32, 0)] - counts[(1, 32, 16)]) / 32 == (4 * 320 + 9) - 12
