"""Checkpoints through torch.distributed.checkpoint with the model's sharding metadata
(mdn_scale.model.dcp_layout): saved under one layout, loaded exactly under another."""
import torch

from model_dist import run_jobs

CFG = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
           vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=8, attention_every=2,
           num_attention_heads=2)


def save_worker(rank, world, path, tp, pp, seed):
    import torch.distributed.checkpoint as dcp
    from mdn_scale.model.dcp_layout import dcp_state_dict
    from mdn_scale.model.sharding import gather_full_state_dict
    from model_workers import init_parallel, make_model
    init_parallel(tp=tp, pp=pp)
    m = make_model(CFG, seed=seed)
    dcp.save({"model": dcp_state_dict(m, for_save=True)}, checkpoint_id=path)
    return gather_full_state_dict(m)


def load_worker(rank, world, path, tp, pp):
    import torch.distributed.checkpoint as dcp
    from mdn_scale.model.dcp_layout import dcp_state_dict
    from mdn_scale.model.sharding import gather_full_state_dict
    from model_workers import init_parallel, make_model
    init_parallel(tp=tp, pp=pp)
    m = make_model(CFG, seed=99)
    with torch.no_grad():
        dcp.load({"model": dcp_state_dict(m)}, checkpoint_id=path)
    return gather_full_state_dict(m)


def test_dcp_checkpoint_reshards(tmp_path):
    tp2, pp2 = str(tmp_path / "tp2"), str(tmp_path / "pp2")
    saved_tp2, saved_pp2, as_dp2, as_tp2 = (r[0] for r in run_jobs(2, [
        (save_worker, (tp2, 2, 1, 0)),
        (save_worker, (pp2, 1, 2, 1)),
        (load_worker, (tp2, 1, 1)),   # TP=2 -> DP=2 (replicas on load)
        (load_worker, (pp2, 2, 1)),   # PP=2 -> TP=2
    ]))
    (as_one,) = run_jobs(1, [(load_worker, (tp2, 1, 1))])[0]  # TP=2 -> one process
    assert not all(torch.equal(saved_tp2[k], saved_pp2[k]) for k in saved_tp2)  # different seeds
    for got, want in ((as_dp2, saved_tp2), (as_tp2, saved_pp2), (as_one, saved_tp2)):
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
