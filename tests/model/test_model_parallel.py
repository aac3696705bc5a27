"""Layouts reproduce the single-process model: TP (with and without SP), CP, PP stages.

Real gloo processes; float64 so that "same to rounding" is tight.
"""

import pytest
import torch

from model_dist import run_jobs, run_ranks
import model_workers as workers

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
            vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=8)
HYBRID = dict(TINY, num_layers=2, attention_every=2, num_attention_heads=2)
TRANSFORMER = dict(TINY, mixer="transformer", num_attention_heads=4)
GDN = dict(TINY, mixer="gdn")


def _batch(B, S, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    return ids, torch.roll(ids, -1, 1)


PP_HYBRID = dict(HYBRID, num_layers=4, attention_every=4)


def _cases():
    ids, labels = _batch(2, 16, 61, 0)
    pids, plabels = _batch(1, 16, 61, 1)
    return [("mdn", TINY, ids, labels, None),
            ("hybrid", HYBRID, ids, labels, None),
            ("gdn", GDN, ids, labels, None),
            ("hybrid_packed", HYBRID, pids, plabels, [0, 5, 11, 16])]


def _cp_cases():
    ids, labels = _batch(2, 16, 61, 2)
    pids, plabels = _batch(1, 16, 61, 3)
    return [("tf", TRANSFORMER, ids, labels, None),
            ("tf_packed", TRANSFORMER, pids, plabels, [0, 3, 10, 16])]


def _cp_mdn_cases():
    ids, labels = _batch(2, 16, 61, 0)
    pids, plabels = _batch(1, 16, 61, 1)
    return [("mdn", TINY, ids, labels, None),
            ("hybrid", HYBRID, ids, labels, None),
            ("gdn", GDN, ids, labels, None),
            ("hybrid_packed", HYBRID, pids, plabels, [0, 5, 11, 16]),
            ("mdn_packed_at_boundary", TINY, pids, plabels, [0, 8, 16])]


def _pp_case():
    ids, labels = _batch(2, 16, 61, 4)
    return ("pp_hybrid", PP_HYBRID, ids, labels, None)


@pytest.fixture(scope="module")
def refs():
    """Single-process results of every case, computed in one spawned process."""
    cases = {c[0]: c for c in _cases() + _cp_cases() + _cp_mdn_cases() + [_pp_case()]}
    return run_ranks(workers.reference_worker, 1, list(cases.values()))[0]


@pytest.fixture(scope="module")
def two_ranks(refs):
    """Every 2-process layout run in one pair of processes: {job name: per-rank results}."""
    name, cfg, ids, labels, _ = _pp_case()
    jobs = {"tp": (workers.tp_worker, (_cases(), refs, (False,))),
            "cp_tf": (workers.cp_worker, (_cp_cases(), refs)),
            "pp": (workers.pp_worker, (cfg, ids, labels, refs[name]["weights"])),
            "cp_mdn": (workers.cp_worker, (_cp_mdn_cases(), refs))}
    return dict(zip(jobs, run_jobs(2, list(jobs.values()))))


def _close(a, b, what):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


def _close_loss(a, b, what):
    # Megatron's cross-entropy runs in fp32 whatever the logits' dtype.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _check_grads(got, ref, what):
    assert set(got) == set(ref), f"{what}: keys differ {set(got) ^ set(ref)}"
    for k in ref:
        _close(got[k], ref[k], f"{what} grad {k}")


def test_tp2_matches_tp1(refs, two_ranks):
    """TP=2 gives TP=1's logits, loss and gradients, for MDN, GDN, a hybrid stack and packed
    documents; TP-replicated grads agree across ranks. (Sequence parallelism: Megatron's SP
    scatter/gather allocate on CUDA, so SP is checked in tests/gpu/test_model_sp.py.)"""
    results = two_ranks["tp"]
    for rank_out in results:
        for (name, sp), r in rank_out.items():
            what = f"{name} sp={sp}"
            ref = refs[name]
            V = ref["logits"].shape[-1]
            _close(r["logits"][..., :V], ref["logits"], f"{what} logits")
            _close_loss(r["loss"], ref["loss"], f"{what} loss")
            _check_grads(r["grads"], ref["grads"], what)
            assert r["disagree"] == [], f"{what}: replicated grads differ across TP: {r['disagree']}"
            for k, w in ref["weights"].items():  # the load + re-gather round trip is exact
                assert torch.equal(r["weights"][k], w), k


def test_cp2_transformer_matches_cp1(refs, two_ranks):
    """Softmax attention under CP=2 (K/V all-gather with global causal + document masks, RoPE
    positions continued across ranks), plain and packed."""
    results = two_ranks["cp_tf"]
    for rank_out in results:
        for name, r in rank_out.items():
            ref, rank = refs[name], r["cp_rank"]
            sl = slice(rank * 8, rank * 8 + 8)
            _close(r["logits"], ref["logits"][:, sl], f"{name} logits rank {rank}")
            _close_loss(r["loss"], ref["loss"][:, sl], f"{name} loss rank {rank}")
            _check_grads(r["grads"], ref["grads"], f"{name} rank {rank}")


def test_cp2_mdn_and_hybrid_match_cp1(refs, two_ranks):
    """MDN and hybrid models under CP=2 (mdn_chunk's state exchange + conv halo), plain and
    packed documents whose boundaries do and do not fall on the rank boundary."""
    results = list(two_ranks["cp_mdn"])
    # and the hybrid under TP=2 × CP=2 (4 processes)
    results += run_ranks(workers.cp_worker, 4, _cp_mdn_cases()[1:2], refs, 2)
    for rank_out in results:
        for name, r in rank_out.items():
            ref, rank = refs[name], r["cp_rank"]
            sl = slice(rank * 8, rank * 8 + 8)
            _close(r["logits"], ref["logits"][:, sl], f"{name} logits rank {rank}")
            _close_loss(r["loss"], ref["loss"][:, sl], f"{name} loss rank {rank}")
            _check_grads(r["grads"], ref["grads"], f"{name} rank {rank}")


def test_pp2_stage_assignment_and_loss(refs, two_ranks):
    """PP=2 of a 4-layer hybrid (attention at layer 3): layers 0-1 + embedding on stage 0,
    layers 2-3 + final norm + LM head on stage 1, global layer numbers in checkpoint keys, and
    a hand-driven two-stage forward gives the PP=1 loss."""
    name, cfg, ids, labels, _ = _pp_case()
    ref = refs[name]
    s0, s1 = two_ranks["pp"]
    assert s0["layers"] == [0, 1] and s1["layers"] == [2, 3]
    assert s0["layer_types"] == ["MDNMixer", "MDNMixer"]
    assert s1["layer_types"] == ["MDNMixer", "SelfAttention"]
    assert (s0["embedding"], s0["output_layer"], s0["final_norm"]) == (True, False, False)
    assert (s1["embedding"], s1["output_layer"], s1["final_norm"]) == (False, True, True)
    assert set(s0["keys"]) | set(s1["keys"]) == set(ref["weights"])
    assert not set(s0["keys"]) & set(s1["keys"])
    assert any(k.startswith("decoder.layers.3.") for k in s1["keys"])
    _close_loss(s1["loss"], ref["loss"], "PP=2 loss")


def test_pp2_init_equals_pp1(refs, two_ranks):
    """The two stages, built fresh at the reference's seed, hold exactly the PP=1 weights: every
    layer, the embedding and the LM head draw from an RNG keyed by their global name, not from
    the stream of whatever the stage built before (specs.SeededTransformerLayer)."""
    name = _pp_case()[0]
    fresh, ref = two_ranks["pp"][0]["fresh"], refs[name]["weights"]
    assert fresh.keys() == ref.keys()
    for k in ref:
        assert torch.equal(fresh[k], ref[k]), k


def test_gpu_cp_model_harness_on_cpu():
    """tests/gpu/test_model_cp_gpu.py's worker (the trainer's model at CP = 2 against CP = 1 and
    the fp32 model) on gloo with a tiny fp32 model: the harness itself is right, so a failure on
    the GPU is the GPU path's."""
    from tests.gpu.test_model_cp_gpu import _worker
    docs = {"one_doc": [0, 64], "docs": [0, 5, 33, 34, 64]}
    res = run_jobs(2, [(_worker, (["fp32"], docs, dict(TINY)))])[0]
    assert res[0].keys() == {("fp32", "one_doc"), ("fp32", "docs")}
    for rank_out in res:
        for key, r in rank_out.items():
            assert r["nonfinite"] == [], key
            assert r["loss"]["cp_vs_cp1"] < 1e-6 and r["loss"]["cp1_vs_fp32"] == 0, (key, r["loss"])
            for name, e in r["grads"].items():
                assert e["cp_vs_cp1"] < 1e-5 and e["norm_cp"] > 0, (key, name, e)
