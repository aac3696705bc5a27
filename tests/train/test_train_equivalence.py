"""Same seed and data → the same loss curve under TP=2, CP=2, DP=2 (ZeRO) and another microbatch split
of the same global batch (DESIGN.md §8), in real gloo processes. Data comes from the synthetic
loader of train_dist_util (the data package's tests cover the real loader); the model is the
model package's MDN (its CP path is the cp package's state exchange and conv halo)."""

import json
import shutil

import pytest

from train_dist_util import run_workers, tiny_run_config, train_with_synthetic_data

STEPS = 3
COMMON = [f"train.steps={STEPS}", "train.global_batch=4"]


def _runs(rank, world, out, runs):
    results = {}
    for name, ov in runs.items():
        cfg = tiny_run_config(COMMON + ov + [f"logging.dir={out}/{name}"])
        results[name], summary = train_with_synthetic_data(cfg)
        results[name + ".summary"] = summary
    if rank == 0:
        json.dump(results, open(f"{out}/{'_'.join(runs)}.json", "w"))
    return results


def run(out, world, runs):
    run_workers(_runs, world, out, runs)
    return json.load(open(f"{out}/{'_'.join(runs)}.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("equiv"))
    one = run(out, 1, {"ref": ["train.micro_batch=2"], "micro1": ["train.micro_batch=1"],
                       "micro4": ["train.micro_batch=4"],
                       "recompute": ["train.micro_batch=2", "train.recompute=true"],
                       "unfused_wgrad": ["train.micro_batch=2", "train.fuse_wgrad=false"],
                       "recompute_offload": ["train.micro_batch=2", "train.recompute=true",
                                             "train.recompute_offload=true"],
                       "nonfinite": ["train.micro_batch=2", "train.lr=1e30", "train.warmup_steps=0"]})
    one = {k: v for k, v in one.items() if not k.endswith(".summary") or k == "nonfinite.summary"}
    ref = one.pop("ref")
    assert len(ref) == STEPS
    assert len(set(ref.values())) == STEPS  # the loss moves: the comparisons mean something
    return out, ref, one


def assert_same(losses: dict, ref: dict, name: str):
    assert losses.keys() == ref.keys(), name
    for step in ref:
        assert losses[step] == pytest.approx(ref[step], rel=1e-6, abs=0), (name, step, losses, ref)


@pytest.mark.slow
def test_microbatch_split_and_recompute_give_the_same_losses(reference):
    _, ref, one = reference
    for name in ("micro1", "micro4", "recompute", "recompute_offload"):
        assert_same(one[name], ref, name)


@pytest.mark.slow
def test_unfused_weight_gradients_give_the_same_losses(reference):
    """train.fuse_wgrad (the default) adds each linear's weight gradient into .grad in its
    backward (train/wgrad.py): on the CPU bit for bit the unfused gradient, so the same losses."""
    _, ref, one = reference
    assert one["unfused_wgrad"] == ref


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(reference):
    """lr = 1e30 blows the weights up in step 1; in every later step the loss or the gradient
    norm is not finite, so its update is skipped (counted; a non-finite loss is logged as null)
    and the run goes on. Which of the two overflows depends on the weights: the RMSNorms' x²
    overflows to inf and zeroes the normalised activations, after which the logits may tie
    (a finite loss of log V, only the gradients non-finite; so with the layout-keyed init of
    session 3) or not (a non-finite loss; so before)."""
    _, ref, one = reference
    losses, summary = one["nonfinite"], one["nonfinite.summary"]
    assert losses["1"] == pytest.approx(ref["1"], rel=1e-6)  # step 1 itself was normal
    assert sorted(losses) == [str(s) for s in range(1, STEPS + 1)], losses  # the run went on
    assert summary["skipped_steps"] == STEPS - 1 and summary["skipped_by_step"] == STEPS - 1


@pytest.mark.slow
def test_tp_cp_dp_give_the_same_losses_and_checkpoints_reshard(reference):
    out, ref, _ = reference
    two = run(out, 2, {"tp2": ["parallel.tensor=2", "train.micro_batch=2",
                               f"checkpoint.dir={out}/tp2/ckpt", "checkpoint.interval=2"],
                       "cp2": ["parallel.context=2", "train.micro_batch=2"],
                       # the layers' kept inputs in host memory under CP (the recompute repeats
                       # the halo exchange and the all-gather in the backward)
                       "cp2_offload": ["parallel.context=2", "train.micro_batch=2", "train.recompute=true",
                                       "train.recompute_offload=true"],
                       # the CP op's maps kept from the forward for the recompute
                       "cp2_keep_maps": ["parallel.context=2", "train.micro_batch=2", "train.recompute=true",
                                         "train.recompute_keep_cp_maps=true"],
                       "dp2_zero": ["train.micro_batch=1", "parallel.distributed_optimizer=true",
                                    f"checkpoint.dir={out}/dp2_zero/ckpt", "checkpoint.interval=2"]})
    for name in ("tp2", "cp2", "cp2_offload", "cp2_keep_maps", "dp2_zero"):
        assert_same(two[name], ref, name)

    # The step-2 checkpoints of TP=2 and of DP=2 with ZeRO (optimizer state sharded over the
    # two ranks) resume in one process (TP=1, plain optimizer) to the same step-3 loss.
    runs = {}
    for src, name in (("tp2", "tp1_from_tp2"), ("dp2_zero", "dp1_from_zero")):
        shutil.copytree(f"{out}/{src}/ckpt/step_00000002", f"{out}/{name}/ckpt/step_00000002")
        runs[name] = ["train.micro_batch=2", "checkpoint.interval=2", f"checkpoint.dir={out}/{name}/ckpt"]
    one = run(out, 1, runs)
    for name in ("tp1_from_tp2", "dp1_from_zero"):
        assert list(one[name]) == [str(STEPS)], name
        assert one[name][str(STEPS)] == pytest.approx(ref[str(STEPS)], rel=1e-6, abs=0), name
