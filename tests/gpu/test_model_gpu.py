"""Model layouts on GPUs (NCCL): what the CPU suite cannot run. Written on a machine without a
GPU: not yet run at the time of writing.

Sequence parallelism: Megatron's SP scatter/gather allocate on CUDA, so TP=2 + SP is only
checkable here. Same float64 exactness as tests/model (torch backend of mdn_chunk)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model"))

pytestmark = pytest.mark.gpu

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
            vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=16, backend="torch")
HYBRID = dict(TINY, attention_every=2, num_attention_heads=2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_sequence_parallel_tp2_matches_tp1():
    import model_workers as w
    from model_dist import run_ranks

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (2, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    cases = [("mdn", TINY, ids, labels, None), ("hybrid", HYBRID, ids, labels, None)]
    refs = run_ranks(w.reference_worker, 1, cases, backend="nccl")[0]
    results = run_ranks(w.tp_worker, 2, cases, refs, (False, True), backend="nccl")
    for rank_out in results:
        for (name, sp), r in rank_out.items():
            ref = refs[name]
            torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
            for k in ref["grads"]:
                torch.testing.assert_close(r["grads"][k], ref["grads"][k], rtol=1e-9, atol=1e-11,
                                           msg=lambda m: f"{name} sp={sp} {k}: {m}")
            assert r["disagree"] == [], r["disagree"]


def schedule_worker(rank, world, cfg, batches, ref_weights):
    """Megatron's own forward/backward schedule (1F1B when PP > 1) over the micro-batches;
    returns the per-micro-batch losses (last stage) and the canonical grads."""

    import model_workers as w
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from mdn_scale.model.sharding import load_full_state_dict

    w.init_parallel(pp=world)
    model = w.make_model(cfg, seed=1)
    if ref_weights is not None:
        load_full_state_dict(model, ref_weights)
    dev = w.device()

    def loss_func(output_tensor):
        s = output_tensor.sum()
        return s, {"loss_sum": s.detach()}

    def forward_step(data_iterator, model):
        ids, labels = (t.to(dev) for t in next(data_iterator))
        return model(ids, None, None, labels=labels), loss_func

    B, S = batches[0][0].shape
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=S, micro_batch_size=B, forward_only=False)
    from mdn_scale.model.sharding import gather_full_state_dict
    out = dict(losses=[x["loss_sum"].cpu() for x in losses] if ps.is_pipeline_last_stage() else None,
               grads=w.full_grads(model))
    if ref_weights is None:
        out["weights"] = gather_full_state_dict(model)
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_pp2_megatron_schedule_matches_pp1():
    """PP=2 with Megatron's 1F1B schedule (4 micro-batches) gives the PP=1 losses and grads."""
    from model_dist import run_ranks

    cfg = dict(HYBRID, num_layers=4, attention_every=4)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 61, (2, 16), generator=g)
        batches.append((ids, torch.roll(ids, -1, 1)))
    ref = run_ranks(schedule_worker, 1, cfg, batches, None, backend="nccl")[0]
    got = run_ranks(schedule_worker, 2, cfg, batches, ref["weights"], backend="nccl")
    last = got[1]
    assert len(last["losses"]) == 4
    for a, b in zip(last["losses"], ref["losses"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # Megatron's CE runs in fp32
    for k, v in ref["grads"].items():
        torch.testing.assert_close(got[0]["grads"][k], v, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_chunked_loss_sequence_parallel_tp2():
    """The chunked LM-head loss under TP = 2 with sequence parallelism (the hidden states are
    gathered over the sequence first, their gradient reduce-scattered): the same per-token loss
    and gradients as a float64 cross entropy of the logits, chunk sizes not dividing T
    (tests/model/test_chunked_loss.py covers TP = 1, 2 without SP on CPU)."""
    import model_workers as w
    from model_dist import run_ranks

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (2, 16), generator=g)
    labels = torch.randint(0, 61, (2, 16), generator=g)
    tw = torch.rand(2, 16, generator=g, dtype=torch.float64)
    chunks = (5, 7, 32)
    got = run_ranks(w.chunked_loss_worker, 2, 2, TINY, ids, labels, tw, chunks, True, backend="nccl")
    for rank, r in enumerate(got):
        ref_loss, ref_grads = r["ref"]
        for chunk in chunks:
            loss, grads = r[chunk]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
            for name, gr in ref_grads.items():
                torch.testing.assert_close(grads[name], gr, rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"rank {rank} chunk {chunk} {name}: {m}")


def test_fla_conv_with_trainer_offsets_needs_no_host_sync():
    """FLA's conv on documents whose offsets came as the trainer copies them
    (device_copy_of_host): our chunk indices (mixer_kernels.conv_chunk_indices) spare FLA the
    repeat_interleave that read its size back, so a forward and backward raise nothing under
    torch's sync debug mode; the result is FLA's own with its indices (bitwise) and matches the
    eager conv."""
    import torch.nn.functional as F

    from mdn_kernels.mdn.layout import device_copy_of_host
    from mdn_scale.model import mixer_kernels as mk
    from mdn_scale.model.mixer import causal_conv

    from fla.modules.causal_conv1d import causal_conv1d

    g = torch.Generator().manual_seed(0)
    docs = torch.tensor([0, 5, 70, 64 * 5 + 3, 1000, 4096], dtype=torch.int32)
    x = torch.randn(1, 4096, 96, generator=g).cuda().requires_grad_(True)
    w = (torch.rand(96, 4, generator=g) - 0.5).cuda().requires_grad_(True)
    ct = torch.randn(1, 4096, 96, generator=g).cuda()
    mk.conv_silu_fla(x[:, :128], w, device_copy_of_host(torch.tensor([0, 128], dtype=torch.int32),
                                                        "cuda")).sum().backward()   # compile first
    x.grad = w.grad = None
    cu = device_copy_of_host(docs, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = mk.conv_silu_fla(x, w, cu)
        (y * ct).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_fla, _ = causal_conv1d(x, w, activation="silu", cu_seqlens=docs.cuda())
    (y_fla * ct).sum().backward()
    assert torch.equal(y, y_fla) and torch.equal(dx, x.grad) and torch.equal(dw, w.grad)
    y_eager = F.silu(causal_conv(x.double(), w.double(), cu_seqlens=docs.cuda()))
    assert ((y.double() - y_eager).norm() / y_eager.norm()).item() < 1e-5
