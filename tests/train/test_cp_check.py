"""train/cp_check.py (the startup check of CP on this machine) in real gloo processes: it passes
where CP is right (fp32, the model's own CP path), stops every rank with an error naming a
parameter when the CP path is broken (the conv halo replaced by zeros: rank 1 loses rank 0's
last tokens) or the CP ranks hold different weights, and leaves no gradient behind. The trainer runs it under CP (its log line), and
the CP = 2 trainer run of test_train_equivalence.py still matches one process to 1e-6."""
import json

from train_dist_util import run_workers, tiny_run_config, train_with_synthetic_data


def _check(rank, world, out, broken, weights_differ=False):
    import torch
    from megatron.core import parallel_state as ps

    from mdn_scale.train import trainer
    from mdn_scale.train.cp_check import CPCheckError, check_cp_layer, check_tokens
    from mdn_scale.train.distributed import init_distributed

    cfg = tiny_run_config(["parallel.context=2"])
    layout = init_distributed(tensor=1, pipeline=1, context=2)
    trainer.seed_everything(cfg.seed, layout)   # as the trainer: the same weights on every CP rank
    model = trainer.build_model(cfg, layout)
    if weights_differ and rank == 1:   # e.g. an init that is not the same on every CP rank
        with torch.no_grad():
            model.decoder.layers[0].self_attention.A_log.add_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if broken:   # what a wrong CP path looks like: the halo exchange returns zeros
        import mdn_kernels.cp as cp

        def zero_halo(x, width, group):
            return torch.cat([x.new_zeros(x.shape[0], width - 1, x.shape[2]), x], 1)
        cp.conv_halo = zero_halo
    tokens = check_tokens(256, 2, cfg.model.chunk_size)
    try:
        res = check_cp_layer(model, ps.get_context_parallel_group(), tokens=tokens,
                             vocab_size=cfg.model.vocab_size, precision="fp32",
                             device=torch.device("cpu"))
    except CPCheckError as e:
        res = {"error": str(e)}
    res["grads_left"] = [n for n, p in model.named_parameters() if p.grad is not None]
    res["params_changed"] = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    res["tokens"] = tokens
    json.dump(res, open(f"{out}/rank{rank}.json", "w"))
    ps.destroy_model_parallel()


def _results(tmp_path, broken, weights_differ=False):
    run_workers(_check, 2, str(tmp_path), broken, weights_differ)
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]


def test_passes_where_cp_is_right(tmp_path):
    for r in _results(tmp_path, broken=False):
        assert "error" not in r, r
        assert r["checked"] and r["worst"] and 0 <= r["worst_error"] < 1e-5, r
        assert r["world_worst_error"] < 1e-5 and r["tokens"] == 256
        assert r["grads_left"] == [] and r["params_changed"] == []


def test_stops_every_rank_when_cp_is_wrong(tmp_path):
    res = _results(tmp_path, broken=True)
    for r in res:
        assert "context parallelism gives other gradients than one rank" in r["error"], r
        assert "train.cp_check=false" in r["error"]
    # rank 0's own slice needs no halo, yet it stops too (one agreement over the world)
    assert "decoder.layers.0" in res[1]["error"] or "worst here" in res[1]["error"]


def test_stops_when_cp_ranks_hold_different_weights(tmp_path):
    for r in _results(tmp_path, broken=False, weights_differ=True):
        assert "context parallelism gives other gradients than one rank" in r["error"], r


def test_check_tokens():
    from mdn_scale.train.cp_check import check_tokens
    assert check_tokens(1 << 20, 4, 64) == 8192
    assert check_tokens(1000, 2, 64) == 896
    assert check_tokens(64, 4, 64) == 256   # never below one chunk per rank


def _train(rank, world, out):
    cfg = tiny_run_config(["parallel.context=2", "train.steps=1", "train.global_batch=2",
                           "train.micro_batch=2", f"logging.dir={out}"])
    train_with_synthetic_data(cfg)


def test_trainer_runs_the_check_under_cp(tmp_path, capfd):
    run_workers(_train, 2, str(tmp_path))
    assert "[cp-check] layer 0 under CP = 2 against one rank" in capfd.readouterr().out
