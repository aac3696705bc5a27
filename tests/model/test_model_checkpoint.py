"""Checkpoints through torch.distributed.checkpoint with the model's sharding metadata
(mdn_scale.model.dcp_layout): saved under one layout, loaded exactly under another."""
import pytest
import torch

from model_dist import run_jobs

CFG = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
           vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=8, attention_every=2,
           num_attention_heads=2)


def pad_rows(m) -> list:
    """Each recurrent layer's in-projection alignment rows (model.in_proj_row_multiple)."""
    return [mod.in_proj.weight[mod.in_proj.weight.shape[0] - mod.in_proj.weight.pad_rows:]
            for mod in m.modules() if hasattr(mod, "in_proj")]


def save_worker(rank, world, path, tp, pp, seed, cfg=CFG):
    import torch.distributed.checkpoint as dcp
    from mdn_scale.model.dcp_layout import dcp_state_dict
    from mdn_scale.model.sharding import gather_full_state_dict
    from model_workers import init_parallel, make_model
    init_parallel(tp=tp, pp=pp)
    m = make_model(cfg, seed=seed)
    dcp.save({"model": dcp_state_dict(m, for_save=True)}, checkpoint_id=path)
    return gather_full_state_dict(m)


def load_worker(rank, world, path, tp, pp, cfg=CFG):
    import torch.distributed.checkpoint as dcp
    from mdn_scale.model.dcp_layout import dcp_state_dict
    from mdn_scale.model.sharding import gather_full_state_dict
    from model_workers import init_parallel, make_model
    init_parallel(tp=tp, pp=pp)
    m = make_model(cfg, seed=99)
    with torch.no_grad():
        dcp.load({"model": dcp_state_dict(m)}, checkpoint_id=path)
    pads = pad_rows(m)
    assert all(p.numel() == 0 or not p.any() for p in pads)
    return gather_full_state_dict(m), [p.shape[0] for p in pads]


@pytest.mark.parametrize("mixer", ["mdn", "gdn"])
def test_dcp_checkpoint_reshards(tmp_path, mixer):
    """d = 32, H = 2, K = 8: MDN has 104 in-projection rows (52 per rank at TP = 2, padded to 56),
    the GDN mode 102 (padded to 104; 51 per rank at TP = 2, padded to 56). The pads are not in
    the checkpoint, so it reshards between layouts with different pads, and they load as zeros."""
    cfg = dict(CFG, mixer=mixer)
    tp2, pp2 = str(tmp_path / "tp2"), str(tmp_path / "pp2")
    saved_tp2, saved_pp2, (as_dp2, pads_dp2), (as_tp2, pads_tp2) = (r[0] for r in run_jobs(2, [
        (save_worker, (tp2, 2, 1, 0, cfg)),
        (save_worker, (pp2, 1, 2, 1, cfg)),
        (load_worker, (tp2, 1, 1, cfg)),   # TP=2 -> DP=2 (replicas on load)
        (load_worker, (pp2, 2, 1, cfg)),   # PP=2 -> TP=2
    ]))
    ((as_one, pads_one),) = run_jobs(1, [(load_worker, (tp2, 1, 1, cfg))])[0]  # TP=2 -> one process
    assert pads_tp2 == ([4] if mixer == "mdn" else [5]) and pads_dp2 == pads_one == ([0] if mixer == "mdn" else [2])
    assert not any(k.endswith(".pad") for k in saved_tp2)
    assert not all(torch.equal(saved_tp2[k], saved_pp2[k]) for k in saved_tp2)  # different seeds
    for got, want in ((as_dp2, saved_tp2), (as_tp2, saved_pp2), (as_one, saved_tp2)):
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_split_factory_leaves_skipped_parts_out_and_merges_them_as_zeros():
    """What Megatron's own dist_checkpointing does with the mixer's factory: build() stores the
    parts but not the pad; merge() of the loaded parts gives the fused local tensor back, with
    zero rows where the pad was (rank 1 of 2 along dim 0)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mdn_scale.model.sharding import split_sharded_tensor

    local = torch.arange(1.0, 1 + 7 * 3).reshape(7, 3)
    sh = ShardedTensor.from_rank_offsets("w", local, (0, 1, 2))
    factory = split_sharded_tensor(sh, [2, 4, 1], ["q", "k", "pad"], skip=("pad",))
    built = factory.build()
    assert [(p.key, tuple(p.global_shape), tuple(p.global_offset)) for p in built] == [
        ("w.q", (4, 3), (2, 0)), ("w.k", (8, 3), (4, 0))]
    merged = factory.merge_fn([p.data.clone() for p in built])
    assert torch.equal(merged[:6], local[:6]) and torch.equal(merged[6:], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="do not add up"):
        split_sharded_tensor(sh, [2, 4], ["q", "k"])


def old_weights_worker(rank, world):
    from mdn_scale.train.deepspeed_checkpoint import load_weights_into
    from model_workers import init_parallel, make_model
    init_parallel()
    cfg = dict(CFG, mixer="gdn", attention_every=0)
    src, dst = make_model(cfg, seed=3), make_model(cfg, seed=4)
    # full weights by parameter name as a DeepSpeed checkpoint holds them, written before the
    # in-projection had alignment rows: 102 rows, not 104
    old = {n: p.detach().clone() for n, p in src.named_parameters()}
    for n in [n for n in old if n.endswith("in_proj.weight")]:
        old[n] = old[n][:102]
    with torch.no_grad():
        for p in dst.parameters():
            p.fill_(7.0)
    load_weights_into(dst, old, "old-ckpt")
    same = all(torch.equal(p, q) for p, q in zip(src.parameters(), dst.parameters()))
    bad = dict(old)
    key = next(n for n in bad if n.endswith("in_proj.weight"))
    bad[key] = bad[key][:101]
    try:
        load_weights_into(dst, bad, "cut-ckpt")
        err = None
    except ValueError as e:
        err = str(e)
    return same, err


def test_deepspeed_weights_without_alignment_rows_load():
    """Full weights saved before model.in_proj_row_multiple (the GDN mode's 102 rows, no pad)
    load into today's model with zero pad rows; a weight cut short otherwise is still refused."""
    ((same, err),) = run_jobs(1, [(old_weights_worker, ())])[0]
    assert same
    assert err is not None and "cut-ckpt does not fit the model" in err and "(101, 32)" in err
