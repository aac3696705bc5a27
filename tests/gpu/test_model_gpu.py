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
